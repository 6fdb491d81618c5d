"""The sinkscope dashboard (Dash): ``sinkscope dashboard`` or ``create_app()`` in Python. See docs/dashboard.md."""

from .app import create_app, run
from .state import DashboardError, Limits

__all__ = ["DashboardError", "Limits", "create_app", "run"]
