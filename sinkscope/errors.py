"""Errors that mean "the user asked for something that can't be done".

The CLI turns every :class:`SinkscopeError` into one line on stderr and a non-zero exit; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class SinkscopeError(Exception):
    """Base class: a user-facing problem with a message that says what to do."""

    exit_code = 2


class ModelNotFoundError(SinkscopeError):
    """The model source names nothing that can be loaded (unknown name, missing path, missing package)."""


class ModelLoadError(SinkscopeError):
    """The model source exists but can't be loaded (corrupt file, unsupported format, hub unreachable)."""


class CaptureError(SinkscopeError):
    """Attention can't be captured from this model (no hookable attention modules, no probabilities)."""


class PromptError(SinkscopeError):
    """A prompt is missing, empty, binary, not UTF-8, or too short for the analysis."""


class OutputError(SinkscopeError):
    """An output location can't be written."""


class ConfigError(SinkscopeError):
    """An option is out of range (a token limit, a K, a dtype, a device)."""
