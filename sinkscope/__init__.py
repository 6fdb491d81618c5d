"""sinkscope: where a transformer LLM parks its attention, and how many sink tokens to keep when streaming.

Notebook use::

    import sinkscope
    lm = sinkscope.load_model("smollm2-135m")
    profile = sinkscope.analyze(lm, "Some text to look at ...")
    profile                       # summary table in a notebook
    profile.plot_heatmap()        # plotly figure

Long prompts (past 1024 tokens) are measured in statistics mode: the same numbers, computed block by block
without any T x T attention map (``sinkscope.capture_stats``). ``sinkscope.attention_scheme(model)`` says
how a model attends and which modes serve it; ``sinkscope.check_model(model)`` holds each mode to an
independent reference (``docs/models.md``).
"""

from .analysis import PromptResult, Recommendation, SinkPosition, SinkProfile, analyze
from .capture import (
    Capture,
    GeometryCapture,
    HeadOutputCapture,
    StatsCapture,
    capture,
    capture_geometry,
    capture_head_outputs,
    capture_stats,
)
from .checks import SupportRow, check_model
from .errors import SinkscopeError
from .inputs import InputSensitivity, InputVariant, input_sensitivity
from .models import LoadedModel, ModelSpec
from .models import load as load_model
from .prompts import Prompt
from .scheme import AttentionScheme, attention_scheme
from .streaming import SinkCache, Streamer
from .streaming.evaluate import StreamEval, evaluate_stream

__version__ = "0.1.0"

__all__ = [
    "AttentionScheme",
    "Capture",
    "GeometryCapture",
    "HeadOutputCapture",
    "InputSensitivity",
    "InputVariant",
    "LoadedModel",
    "ModelSpec",
    "Prompt",
    "PromptResult",
    "Recommendation",
    "SinkCache",
    "SinkPosition",
    "SinkProfile",
    "SinkscopeError",
    "StatsCapture",
    "StreamEval",
    "Streamer",
    "SupportRow",
    "analyze",
    "attention_scheme",
    "capture",
    "capture_geometry",
    "capture_head_outputs",
    "capture_stats",
    "check_model",
    "evaluate_stream",
    "input_sensitivity",
    "load_model",
]
