"""KV-cache memory from a model's shape: dense cache vs a sink + window cache, over stream length.

Per layer and stored token the cache holds one key and one value vector per KV head:
``kv_heads x (qk_head_dim + v_head_dim) x dtype_bytes`` (``2 x kv_heads x head_dim x dtype_bytes`` where keys
and values have one head dim). A dense cache stores every token in full-attention layers; a sliding-window
layer (Gemma-3's local layers) never stores more than ``sliding_window - 1`` past tokens, which is what
transformers' ``DynamicSlidingWindowLayer`` keeps between steps. A :class:`SinkCache` stores at most
``sinks + window - 1`` tokens between steps in full-attention layers (the next token makes ``sinks + window``
keys) and leaves sliding layers as they are.

Given the model (``model=``), the figures are per layer, from its
:class:`~sinkscope.scheme.AttentionScheme`: each layer's own KV heads and key/value head dims (Gemma-4's
sliding layers have head dim 8 and its full layers 16) and its own window. Three kinds of layer store no
tokens and count 0 bytes per token:

* **linear-attention layers** (Qwen3-Next): they hold a fixed-size conv and recurrent state that doesn't
  grow with the stream, the same under a dense cache and a SinkCache, so it is left out of these
  tokens-proportional figures (as :meth:`SinkCache.nbytes` leaves it out);
* layers that reuse another layer's keys and values (KV sharing, Gemma-3n): transformers stores nothing for
  them;
* multi-head latent attention (DeepSeek-V3) is counted as transformers caches it, the compressed latent
  (``kv_lora_rank``) plus the rotary key part (``qk_rope_head_dim``) once per token, not per head.

Without the model the spec's model-wide ``n_kv_heads`` and ``head_dim`` are used for every attention layer
(``2 x kv_heads x head_dim x dtype_bytes``), with the spec's layer types and sliding window; layers outside
``spec.attention_layers`` (linear attention) count 0.
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
    """Bytes one stored token costs in one layer, model-wide: 2 x kv heads x head dim x dtype size."""
    return 2 * spec.n_kv_heads * spec.head_dim * dtype_bytes(dtype or spec.dtype)


def layer_bytes_per_token(spec: ModelSpec, dtype: str | None = None, *, model: Any = None) -> list[int]:
    """Bytes one stored token costs in each layer (0 for layers that store no tokens; module docstring).

    With ``model`` each layer's own KV heads x (key + value head dims) from its AttentionScheme; without it
    :func:`bytes_per_token_per_layer` for every attention layer of the spec.
    """
    if model is None:
        per = bytes_per_token_per_layer(spec, dtype)
        attends = set(spec.attention_layers) if spec.attention_layers else None
        return [per if attends is None or i in attends else 0 for i in range(spec.n_layers)]
    from ..scheme import attention_scheme

    size = dtype_bytes(dtype or spec.dtype)
    out = []
    for ly in attention_scheme(model).layers:
        if not ly.attends or ly.shared_kv:
            out.append(0)
        elif ly.kv_latent_dim:  # MLA: transformers caches the latent, not per-head keys and values
            out.append(ly.kv_latent_dim * size)
        else:
            out.append(int(ly.n_kv_heads or 0) * (int(ly.qk_head_dim or 0) + int(ly.v_head_dim or ly.qk_head_dim or 0))
                   * size)
    return out


def _layer_caps(spec: ModelSpec, model: Any = None) -> list[int | None]:
    """Tokens each layer stores at most in a dense cache (None: unbounded; 0 for layers storing no tokens)."""
    if model is not None:
        from ..scheme import CHUNKED, SLIDING, attention_scheme

        # transformers' dynamic caches keep the last `window - 1` tokens of sliding and chunked layers alike
        return [ly.window - 1 if ly.kind in (SLIDING, CHUNKED) and ly.window else None
                for ly in attention_scheme(model).layers]
    types = spec.layer_types or ("full_attention",) * spec.n_layers
    return [spec.sliding_window - 1 if t == "sliding_attention" and spec.sliding_window else None for t in types]


def kv_bytes(spec: ModelSpec, n_tokens: int, *, sinks: int | None = None, window: int | None = None,
             dtype: str | None = None, model: Any = None) -> int:
    """Bytes of K/V stored between steps after ``n_tokens`` tokens: dense (no ``window``) or a SinkCache.

    ``model``: per-layer figures from its AttentionScheme (module docstring); else the spec's model-wide shape.
    """
    if n_tokens < 0:
        raise ValueError("n_tokens must be >= 0")
    per_layer = layer_bytes_per_token(spec, dtype, model=model)
    budget = None if window is None else (sinks or 0) + window - 1
    total = 0
    for per, cap in zip(per_layer, _layer_caps(spec, model), strict=True):
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
                   dtype: str | None = None, model: Any = None) -> list[MemoryRow]:
    """Dense and sink-cache K/V bytes at each stream length (a table or a plot's data)."""
    return [MemoryRow(n, kv_bytes(spec, n, dtype=dtype, model=model),
                      kv_bytes(spec, n, sinks=sinks, window=window, dtype=dtype, model=model))
            for n in lengths]


def format_bytes(n: float) -> str:
    """Human-readable bytes: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
