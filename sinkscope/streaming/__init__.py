"""Streaming past the trained context: StreamingLLM's attention-sink cache (Xiao et al., 2023).

:class:`SinkCache` keeps the first ``sinks`` tokens and a window of recent ones in a transformers KV cache,
with positions re-assigned inside the cache; see :mod:`sinkscope.streaming.cache` for the exact semantics.
:class:`Streamer` streams through it one token at a time with per-token statistics, drift flags and a live
sink switch; :mod:`sinkscope.streaming.memory` gives the KV memory of dense and sink caches.
"""

from .cache import SinkCache
from .streamer import DriftConfig, DriftDetector, Streamer, TokenStats

__all__ = ["DriftConfig", "DriftDetector", "SinkCache", "Streamer", "TokenStats"]
