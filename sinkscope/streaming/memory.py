"""KV-cache memory from a model's shape: dense cache vs a sink + window cache, over stream length.

Per layer and stored token the cache holds one key and one value vector per KV head:
``2 x kv_heads x head_dim x dtype_bytes``. A dense cache stores every token in full-attention layers; a
sliding-window layer (Gemma-3's local layers) never stores more than ``sliding_window - 1`` past tokens,
which is what transformers' ``DynamicSlidingWindowLayer`` keeps between steps. A :class:`SinkCache` stores
at most ``sinks + window - 1`` tokens between steps in full-attention layers (the next token makes
``sinks + window`` keys) and leaves sliding layers as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..models import ModelSpec

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name such as ``float32``."""
    try:
        return _DTYPE_BYTES[dtype.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


def bytes_per_token_per_layer(spec: ModelSpec, dtype: str | None = None) -> int:
    """Bytes one stored token costs in one layer: 2 x kv heads x head dim x dtype size."""
    return 2 * spec.n_kv_heads * spec.head_dim * dtype_bytes(dtype or spec.dtype)


def _layer_caps(spec: ModelSpec) -> list[int | None]:
    """Tokens each layer stores at most in a dense cache (None: unbounded)."""
    types = spec.layer_types or ("full_attention",) * spec.n_layers
    return [spec.sliding_window - 1 if t == "sliding_attention" and spec.sliding_window else None for t in types]


def kv_bytes(spec: ModelSpec, n_tokens: int, *, sinks: int | None = None, window: int | None = None,
             dtype: str | None = None) -> int:
    """Bytes of K/V stored between steps after ``n_tokens`` tokens: dense (no ``window``) or a SinkCache."""
    if n_tokens < 0:
        raise ValueError("n_tokens must be >= 0")
    per = bytes_per_token_per_layer(spec, dtype)
    budget = None if window is None else (sinks or 0) + window - 1
    total = 0
    for cap in _layer_caps(spec):
        limit = cap if cap is not None else budget  # a sliding layer keeps its own window whatever the policy
        total += (n_tokens if limit is None else min(n_tokens, limit)) * per
    return total


@dataclass(frozen=True)
class MemoryRow:
    """Dense vs sink-cache K/V bytes at one stream length."""

    tokens: int
    dense_bytes: int
    sink_bytes: int

    @property
    def ratio(self) -> float:
        """dense / sink: how many times less memory the sink cache needs."""
        return self.dense_bytes / self.sink_bytes if self.sink_bytes else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def memory_profile(spec: ModelSpec, lengths: Iterable[int], *, sinks: int, window: int,
                   dtype: str | None = None) -> list[MemoryRow]:
    """Dense and sink-cache K/V bytes at each stream length (a table or a plot's data)."""
    return [MemoryRow(n, kv_bytes(spec, n, dtype=dtype), kv_bytes(spec, n, sinks=sinks, window=window,
                                                                  dtype=dtype))
            for n in lengths]


def format_bytes(n: float) -> str:
    """Human-readable bytes: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
