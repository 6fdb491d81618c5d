"""Capture per-layer, per-head attention probabilities with forward hooks.

Fast attention kernels (SDPA, flash) never form the probability matrix, so while hooks are installed the
model is switched to the eager implementation, which returns it as the second output of every attention
module; the user's implementation is restored when the block exits, also on error.

Two ways to consume what the hooks see:

* keep maps (whole, or pooled to at most ``pool`` x ``pool`` for display) in :attr:`Capture.maps`;
* pass ``on_layer``, a reduction called with each layer's probabilities as soon as that layer has run,
  and keep nothing: memory then holds one layer's maps at a time instead of all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CaptureError

LayerCallback = Callable[[int, torch.Tensor], None]
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order.

    Raises :class:`CaptureError` when the model has no recognisable stack of layers with attention.
    """
    n_layers = _n_layers(model)
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    for stack in stacks:
        found = [_attention_child(layer) for layer in stack]
        if all(m is not None for m in found):
            return found  # type: ignore[return-value]
    raise CaptureError(
        f"can't find hookable self-attention modules in {type(model).__name__}: sinkscope needs a transformer "
        f"with {n_layers} decoder layers, each with a child named one of {', '.join(_ATTN_NAMES)} "
        "(Llama, Gemma, GPT-2, Mistral, Qwen ...)"
    )


def _n_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n:
        raise CaptureError(f"{type(model).__name__} has no config with a layer count; is it a transformers model?")
    return int(n)


def _n_heads(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0))


def _attention_child(layer: nn.Module) -> nn.Module | None:
    for name in _ATTN_NAMES:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


@dataclass
class Capture:
    """What a :func:`capture` block collected.

    ``maps[layer]`` is a float32 tensor ``[batch, heads, queries, keys]`` (pooled if ``pool`` was given);
    ``bins`` gives, for pooled maps, the ``(start, end)`` token range of each row/column bin.
    """

    layers: list[int]
    heads: list[int] | None
    pool: int | None
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    bins: list[tuple[int, int]] | None = None
    calls: int = 0


@contextmanager
def capture(model: nn.Module, *, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
            keep_maps: bool = True, pool: int | None = None,
            on_layer: LayerCallback | None = None) -> Iterator[Capture]:
    """Install attention hooks for the duration of a ``with`` block.

    Args:
        model: a Hugging Face causal LM (any attention implementation).
        layers: layer indices to capture (default: all). Negative indices count from the end.
        heads: query-head indices to keep in maps (default: all). Reductions always see all heads.
        keep_maps: store each layer's probabilities in ``Capture.maps``.
        pool: if set, store maps pooled to at most ``pool`` bins per side (see :func:`pool_map`).
        on_layer: called as ``on_layer(layer, probs)`` with ``probs`` ``[batch, heads, q, k]`` float32.

    Example::

        with sinkscope.capture(model, layers=[0, -1]) as cap:
            model(**inputs)
        cap.maps[0].shape  # (1, n_heads, T, T)
    """
    modules = find_attention_modules(model)
    n = len(modules)
    selected = sorted({_check_index(i, n, "layer") for i in layers}) if layers is not None else list(range(n))
    head_idx = list(heads) if heads is not None else None
    if head_idx is not None:
        n_heads = _n_heads(model)
        if not head_idx or min(head_idx) < 0 or max(head_idx) >= n_heads:
            raise CaptureError(f"heads must be a non-empty list of head indices in [0, {n_heads})")
    cap = Capture(layers=selected, heads=head_idx, pool=pool)
    seen_missing: list[int] = []

    def make_hook(idx: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                seen_missing.append(idx)
                return
            cap.calls += 1
            probs = probs.detach().float()
            if on_layer is not None:
                on_layer(idx, probs)
            if keep_maps:
                kept = probs
                if head_idx is not None:
                    kept = kept[:, head_idx]
                if pool is not None:
                    kept, cap.bins = pool_map(kept, pool)
                cap.maps[idx] = kept  # eager attention never writes to its probabilities afterwards
        return hook

    handles = []
    with eager_attention(model):
        try:
            for idx in selected:
                handles.append(modules[idx].register_forward_hook(make_hook(idx)))
            yield cap
        finally:
            for h in handles:
                h.remove()
    if seen_missing:
        raise CaptureError(
            f"attention modules of layers {sorted(set(seen_missing))[:5]} returned no probabilities even in "
            f"eager mode; {type(model).__name__} is not supported by capture"
        )


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eager attention inside the block and restore its own choice afterwards."""
    config = model.config
    original = getattr(config, "_attn_implementation", None)
    if original in (None, "eager"):
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise CaptureError(f"{type(model).__name__} can't switch to eager attention to expose probabilities")
    try:
        setter("eager")
    except (ValueError, ImportError) as exc:
        raise CaptureError(f"can't switch {type(model).__name__} to eager attention: {exc}") from exc
    try:
        yield
    finally:
        setter(original)


def _check_index(i: int, n: int, what: str) -> int:
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise CaptureError(f"{what} {i} out of range: the model has {n} {what}s")
    return j


def bin_edges(length: int, size: int) -> list[tuple[int, int]]:
    """Split ``range(length)`` into at most ``size`` contiguous bins of near-equal width."""
    size = max(1, min(size, length))
    edges = torch.linspace(0, length, size + 1).round().long().tolist()
    return [(edges[i], edges[i + 1]) for i in range(size)]


def pool_map(probs: torch.Tensor, size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pool ``[..., q, k]`` attention to at most ``size`` x ``size`` bins.

    Queries are averaged within a bin and keys summed, so every pooled row still sums to 1 and a cell reads
    as "share of attention that the queries of this bin give to the keys of that bin". Position 0 keeps a
    bin of its own so that the first-token sink is never blurred into its neighbours.
    """
    t_q, t_k = probs.shape[-2], probs.shape[-1]
    if t_q != t_k:
        raise CaptureError("pool_map expects square (self-attention) maps")
    if t_q <= size:
        return probs, [(i, i + 1) for i in range(t_q)]
    bins = [(0, 1), *[(a + 1, b + 1) for a, b in bin_edges(t_q - 1, size - 1)]]
    # Bin-membership matrices: summing keys and averaging queries are two matrix products, which BLAS does
    # fast and without a T x T temporary.
    member = torch.zeros(len(bins), t_q, dtype=probs.dtype, device=probs.device)
    for i, (a, b) in enumerate(bins):
        member[i, a:b] = 1.0
    keys = probs @ member.T  # [..., q, bins]
    pooled = (member / member.sum(-1, keepdim=True)) @ keys  # [..., bins, bins]
    return pooled, bins
