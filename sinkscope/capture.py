"""Capture per-layer, per-head attention: whole maps with forward hooks, or exact statistics without them.

Two ways in:

* :func:`capture` (whole maps). Fast attention kernels (SDPA, flash) never form the probability matrix, so
  while hooks are installed the model is switched to the eager implementation, which returns it as the second
  output of every attention module. Keep maps (whole, or pooled to at most ``pool`` x ``pool`` for display)
  in :attr:`Capture.maps`, or pass ``on_layer``, a reduction called with each layer's probabilities as soon as
  that layer has run. Eager attention costs O(heads x T^2) memory per layer and is slow past a few thousand
  tokens.
* :func:`capture_stats` (statistics mode, for long prompts). A registered attention function receives each
  layer's rotated queries, keys and values and computes the probabilities one block of query rows at a
  time: :meth:`sinkscope.metrics.ChunkedStats.add_scores` turns each block of scores into probabilities
  and keeps their statistics (a fused C pass on the CPU, see :mod:`sinkscope._native`), and the block
  multiplied by the values gives the layer's output (so the forward costs one attention, not SDPA's plus
  ours). Nothing of size T x T is ever held; the metrics are the same numbers as from whole maps (exact,
  not sampled). It takes what the model passes to the attention interface as eager attention does:
  soft-capped logits (Gemma-2's ``softcap``), learned per-head sink logits (gpt-oss's ``s_aux``: one more
  outcome of every softmax, measured as the learned-sink mass), value heads narrower than the keys
  (DeepSeek's MLA). Layers left out of ``layers`` run plain SDPA, or, where SDPA would be wrong (``s_aux``)
  or refuses (``softcap``), the same exact blocked attention without statistics. On a CUDA device the
  layers go through the GPU row pass instead (:mod:`sinkscope._gpu`: attention with its log-sum-exp, then
  one Triton kernel for every statistic); where it can't serve a call (no Triton, a padding mask, ...) the
  torch path runs, and each layer's ``LayerStats.row_pass`` says which ran and why.

Either way the user's attention implementation is restored when the block exits, also on error.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _gpu, _native
from .errors import CaptureError
from .metrics import (
    LOCAL_WINDOW,
    ChunkedStats,
    HeadOutputs,
    KeyGeometry,
    LayerActivations,
    LayerStats,
    activations_on_host,
    head_outputs,
    key_geometry,
    layer_activation_parts,
)
from .scheme import attention_modules, attention_scheme, check_layer_count, decoder_layers, head_projections

LayerCallback = Callable[[int, torch.Tensor], None]


def find_attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> self-attention module, for every layer with softmax attention, in layer order.

    Hybrid models (Qwen3-Next) have linear-attention layers too; they have no attention map and are left out.
    Raises :class:`CaptureError` when the model has no recognisable stack of decoder layers.
    """
    return attention_modules(model)


def _n_heads(model: nn.Module) -> int:
    scheme = attention_scheme(model)
    return max((ly.n_heads or 0) for ly in scheme.layers)


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
    scheme = attention_scheme(model)
    scheme.require("maps")
    modules = find_attention_modules(model)
    selected = scheme.select_layers(layers)
    head_idx = list(heads) if heads is not None else None
    if head_idx is not None:
        n_heads = _n_heads(model)
        if not head_idx or min(head_idx) < 0 or max(head_idx) >= n_heads:
            raise CaptureError(f"heads must be a non-empty list of head indices in [0, {n_heads})")
    cap = Capture(layers=selected, heads=head_idx, pool=pool)
    seen_missing: list[int] = []
    seen: set[int] = set()

    def make_hook(idx: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            seen.add(idx)
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
            f"{scheme.family}: attention modules of layers {sorted(set(seen_missing))[:5]} returned no "
            "probabilities under eager attention; whole maps can't be captured from this model"
        )
    if seen:  # a forward ran: every selected layer must have been seen (nothing slipped past the hooks)
        check_layer_count(scheme, seen, selected, "maps")


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eager attention inside the block and restore its own choice afterwards."""
    with _attention_implementation(model, "eager"):
        yield


@contextmanager
def _attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    config = model.config
    original = getattr(config, "_attn_implementation", None)
    if original == name or (original is None and name == "eager"):
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise CaptureError(f"{type(model).__name__} can't switch its attention implementation to {name}")
    try:
        setter(name)
    except (ValueError, ImportError, KeyError) as exc:
        raise CaptureError(f"can't switch {type(model).__name__} to {name} attention: {exc}") from exc
    try:
        if getattr(config, "_attn_implementation", None) != name:  # transformers may only warn (Falcon)
            raise CaptureError(f"{type(model).__name__} ignored the switch to {name} attention; load it with "
                               f"attn_implementation='{name}'" if name == "eager" else
                               f"{type(model).__name__} ignored the switch to {name} attention")
        yield
    finally:
        setter(original)


# -------------------------------------------------------------------------------------- massive activations


@dataclass
class ActivationCapture:
    """What a :func:`capture_activations` block measured: ``layers[i]`` for every decoder layer ``i``; or, for
    a model whose layers don't return one residual stream ``[1, T, hidden]``, why not (``unavailable``)."""

    layers: dict[int, LayerActivations] = field(default_factory=dict)
    unavailable: str | None = None


@contextmanager
def capture_activations(model: nn.Module) -> Iterator[ActivationCapture]:
    """Summarise each decoder layer's output (the residual stream) during a forward pass in the block: token
    norms and the largest activations (:func:`sinkscope.metrics.layer_activations`), reduced on the device as
    soon as the layer has run and brought to the host when the block ends (no wait for the GPU per layer).
    Combines with :func:`capture` and :func:`capture_stats` in the same forward; one sequence.

    Example::

        with sinkscope.capture_activations(model) as acts:
            model.model(input_ids=ids)
        acts.layers[5].norms[0]  # the first token's residual norm after layer 5
    """
    layers = decoder_layers(model)
    cap = ActivationCapture()
    pending: dict[int, tuple[torch.Tensor, ...]] = {}

    def make_hook(idx: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if cap.unavailable:
                return
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
                cap.unavailable = (f"its decoder layers return {shape}, not one residual stream [batch, T, hidden] "
                                   "(several streams, as Gemma-3n's AltUp keeps?)")
                pending.clear()
                return
            if hidden.shape[0] != 1:
                raise CaptureError(f"activation capture takes one sequence per forward pass, got {hidden.shape[0]}")
            pending[idx] = layer_activation_parts(hidden[0])
        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()
    if not cap.unavailable:
        cap.layers.update({i: activations_on_host(parts) for i, parts in sorted(pending.items())})
    if cap.layers and not cap.unavailable and len(cap.layers) != len(layers):
        missing = sorted(set(range(len(layers))) - set(cap.layers))
        raise CaptureError(f"decoder layers {missing[:5]} did not run during the forward pass")


@dataclass
class HeadOutputCapture:
    """What a :func:`capture_head_outputs` block measured: ``layers[i]`` for every attention layer ``i``; or,
    for a model whose attention has no output projection to read per head, why not (``unavailable``)."""

    layers: dict[int, HeadOutputs] = field(default_factory=dict)
    unavailable: str | None = None


@contextmanager
def capture_head_outputs(model: nn.Module, *, k_max: int = 8) -> Iterator[HeadOutputCapture]:
    """Measure what each head writes into the residual stream during a forward pass in the block
    (:func:`sinkscope.metrics.head_outputs`, from the input of each attention layer's output projection, the
    heads side by side). Combines with :func:`capture` and :func:`capture_stats` in the same forward.

    Example::

        with sinkscope.capture_head_outputs(model, k_max=8) as heads:
            model.model(input_ids=ids)
        heads.layers[3].output_norm  # [heads]: mean norm of each head's projected output
    """
    projections = head_projections(model)
    cap = HeadOutputCapture(unavailable=projections if isinstance(projections, str) else None)

    def make_hook(idx: int, weight: torch.Tensor, n_heads: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                return
            if x.shape[0] != 1:
                raise CaptureError(f"head-output capture takes one sequence per forward pass, got {x.shape[0]}")
            cap.layers[idx] = head_outputs(x[0], weight, n_heads, k_max)
        return hook

    handles = [] if isinstance(projections, str) else [
        p.module.register_forward_pre_hook(make_hook(i, p.weight, p.n_heads)) for i, p in projections.items()]
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------ statistics mode

STATS_IMPLEMENTATION = "sinkscope_stats"
CPU_BLOCK_BYTES = 8 * 2**20  # scores + probabilities of one block: cache-sized blocks were fastest on CPU
GPU_BLOCK_BYTES = 2**30  # on a GPU, big blocks: each block costs a dozen kernel launches


def default_block_bytes(device: torch.device | str) -> int:
    """Memory for one block of query rows in statistics mode: small on CPU, large (within free memory) on GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return int(max(CPU_BLOCK_BYTES, min(GPU_BLOCK_BYTES, free // 8)))
    return CPU_BLOCK_BYTES


@dataclass
class StatsCapture:
    """What a :func:`capture_stats` block measured: ``stats[layer]`` for every captured layer.

    Layers measured by the GPU row pass stay on the device until ``stats`` is read (or the block exits), then
    come to the host in one copy: a copy per layer would stall the GPU once per layer."""

    layers: list[int]
    k_max: int
    tokens: int | None = None
    _stats: dict[int, LayerStats] = field(default_factory=dict, repr=False)
    _pending: list[Any] = field(default_factory=list, repr=False)
    _on_layer: Callable[[int, LayerStats], None] | None = field(default=None, repr=False)

    @property
    def stats(self) -> dict[int, LayerStats]:
        """Layer index -> its statistics, for the last forward pass run inside the block."""
        self.flush()
        return self._stats

    def add(self, layer: int, stats: LayerStats) -> None:
        """Record one layer's finished statistics (and tell ``on_layer``)."""
        self._stats[layer] = stats
        self.tokens = len(stats.received.total)
        if self._on_layer is not None:
            self._on_layer(layer, stats)

    def flush(self) -> None:
        """Bring the GPU row pass's pending layers to the host (one copy per device)."""
        if self._pending:
            pending = list(self._pending)
            self._pending.clear()  # in place: the layers' jobs hold this list's append
            for item, stats in zip(pending, _gpu.finish(pending), strict=True):
                self.add(item.layer, stats)


class _Buffers:
    """Float32 scratch buffers shared by the layers of one capture (layers run one after another)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.device != device or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return buf

    def shaped(self, device: torch.device) -> Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]:
        """``get`` as a lender of shaped tensors on ``device`` (for :class:`ChunkedStats`)."""
        def lend(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return self.get(name, math.prod(shape), device, dtype)[: math.prod(shape)].view(shape)
        return lend


class _LayerJob:
    """Statistics of one attention module for the forward pass in flight."""

    def __init__(self, layer: int, k_max: int, map_size: int | None, local: int, block_bytes: int | None,
                 done: Callable[[int, LayerStats], None], buffers: _Buffers | None = None, kind: str = "full",
                 window: int | None = None, defer: Callable[[Any], None] | None = None) -> None:
        self.layer, self.k_max, self.map_size, self.local = layer, k_max, map_size, local
        self.block_bytes, self.done = block_bytes, done
        self.buffers = buffers or _Buffers()
        self.kind, self.window = kind, window  # the layer's kind and sliding window, from the scheme
        # Takes the GPU row pass's statistics while they are still on the device (default: finish at once).
        self.defer = defer or (lambda pending: self.done(self.layer, _gpu.finish([pending])[0]))
        self.geometry: Callable[[int, KeyGeometry], None] | None = None  # also measure key geometry (O(T x K))

    def observe(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scaling: float | None, softcap: float | None, sink: torch.Tensor | None = None) -> torch.Tensor:
        """Measure the layer and return its attention output ``[1, T, heads, D_v]`` (what eager attention
        gives): the probabilities are formed anyway, so one more product gives the output and SDPA is not needed.

        ``softcap``: attention logit soft-capping (Gemma-2), ``tanh(s / cap) * cap`` before the mask.
        ``sink``: learned sink logits ``[heads]`` (gpt-oss's ``s_aux``), one more outcome of every row's softmax
        that belongs to no key. The value head dim may differ from the query/key one (DeepSeek's MLA).
        """
        b, h, t_q, d = query.shape
        h_kv, t, d_v = key.shape[1], key.shape[2], value.shape[-1]
        if t_q != t:
            raise CaptureError("statistics capture needs the whole prompt in one forward pass without a KV cache "
                               f"(got {t_q} queries against {t} keys)")
        if b != 1:
            raise CaptureError(f"statistics capture takes one sequence per forward pass, got a batch of {b}")
        if t <= self.k_max:
            raise CaptureError(f"the prompt has {t} tokens; statistics need at least K + 1 = {self.k_max + 1}")
        group = h // h_kv
        scale = scaling if scaling is not None else d ** -0.5
        if self.geometry is not None:
            self.geometry(self.layer, key_geometry(query[0], key[0], value[0], self.k_max, scale=scale,
                                                   softcap=softcap, window=self.window))
        bins = pool_bins(t, self.map_size) if self.map_size else None
        why_not = _gpu.unusable(query, key, value, mask, self.kind, self.window)
        if why_not is None:  # the GPU row pass: attention with its LSE, then one kernel for the statistics
            try:
                out, pending = _gpu.row_pass(query, key, value, scale=scale, softcap=softcap, window=self.window,
                                             sink=sink, k_max=self.k_max, local=self.local, bins=bins,
                                             layer=self.layer)
            except Exception as exc:  # a kernel this GPU or Triton can't build: measure with the torch path
                why_not = _gpu.broken(exc)
            else:
                self.defer(pending)
                return out
        acc = ChunkedStats(h, t, self.k_max, local=self.local, bins=bins, device=query.device,
                           scratch=self.buffers.shaped(query.device))
        # [kv heads, D, T], scaled: a contiguous GEMM operand, and a third of the copy that scaling the
        # queries would make.
        keys_t = torch.mul(key[0].float().transpose(-1, -2), scale,
                           out=torch.empty(h_kv, d, t, dtype=torch.float32, device=key.device))
        values = value[0].float()
        queries = query[0].float().view(h_kv, group, t, d)
        sink = sink.detach().float().reshape(h).contiguous() if sink is not None else None
        out = torch.empty(t, h, d_v, dtype=query.dtype, device=query.device)
        block = self.block_bytes if self.block_bytes is not None else default_block_bytes(query.device)
        floats = max(h * t, block // 8)  # two float32 blocks (scores, probabilities); one row at least
        # Two buffers reused for every block: a fresh allocation of this size per block costs more in page
        # faults than the softmax itself.
        score_buf = self.buffers.get("scores", floats, query.device)
        prob_buf = self.buffers.get("probs", floats, query.device)
        low = torch.finfo(torch.float32).min  # a finite "minus infinity": 0 * low stays 0 in the entropy sum
        budget = floats // h
        q0 = 0
        while q0 < t:
            # Causal blocks only need keys up to their last row, so early blocks can take more rows: the
            # largest c with c * (q0 + c) <= floats / h.
            c = max(1, min(t - q0, int((math.isqrt(q0 * q0 + 4 * budget) - q0) // 2)))
            q1 = q0 + c
            q = queries[:, :, q0:q1].reshape(h_kv, group * c, d)
            scores = score_buf[: h * c * q1].view(h_kv, group * c, q1)
            torch.matmul(q, keys_t[:, :, :q1], out=scores)  # query heads of a KV group share its keys
            scores = scores.view(h, c, q1)
            if softcap is not None:
                scores.div_(softcap).tanh_().mul_(softcap)
            if mask is not None:
                m = mask[0, :, q0:q1, :q1]
                scores.masked_fill_(~m if m.dtype == torch.bool else m < low / 2, low)
            probs = acc.add_scores(scores, q0, prob_buf[: h * c * q1].view(h, c, q1), causal=mask is None,
                                   sink_logits=sink)
            o = torch.matmul(probs.view(h_kv, group * c, q1), values[:, :q1])  # [kv, group * c, D_v]
            out[q0:q1] = o.view(h, c, d_v).transpose(0, 1)
            q0 = q1
        stats = acc.finish()
        stats.row_pass = _native.describe(query.device)
        if why_not and why_not != "not on a CUDA device":
            stats.row_pass += f": the GPU row pass can't serve it ({why_not})"
        self.done(self.layer, stats)
        return out.unsqueeze(0)

    @staticmethod
    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scaling: float | None, softcap: float | None, sink: torch.Tensor | None, dropout: float = 0.0,
               block_bytes: int | None = None) -> torch.Tensor:
        """Exact attention output ``[B, T_q, heads, D_v]`` without statistics, one block of query rows at a
        time: for calls that SDPA can't serve (soft-capping, which it refuses; learned sinks, which it would
        ignore) in layers that are not measured. Any batch, KV cache or mask; differentiable."""
        b, h, t_q, d = query.shape
        h_kv, t, d_v = key.shape[1], key.shape[2], value.shape[-1]
        group = h // h_kv
        scale = scaling if scaling is not None else d ** -0.5
        keys_t = key.float().transpose(-1, -2) * scale  # [B, kv heads, D, T]
        values = value.float()
        low = torch.finfo(torch.float32).min
        sink_col = sink.float().reshape(1, h, 1) if sink is not None else None
        block = block_bytes if block_bytes is not None else default_block_bytes(query.device)
        rows = max(1, block // (8 * b * h * t))  # scores and probabilities of one block, float32
        outs = []
        for q0 in range(0, t_q, rows):
            q1 = min(t_q, q0 + rows)
            c = q1 - q0
            # Without a mask transformers means causal, aligned at the end (the queries are the last T_q).
            n_keys = t if mask is not None else min(t, q1 + t - t_q)
            q = query[:, :, q0:q1].float().reshape(b, h_kv, group * c, d)
            scores = torch.matmul(q, keys_t[..., :n_keys]).view(b, h, c, n_keys)
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            if mask is not None:
                m = mask[:, :, q0:q1, :n_keys]
                scores = scores.masked_fill(~m, low) if m.dtype == torch.bool else scores + m.float()
            else:
                rows_at = torch.arange(q0, q1, device=query.device)[:, None] + (t - t_q)
                scores = scores.masked_fill(torch.arange(n_keys, device=query.device)[None, :] > rows_at, low)
            if sink_col is not None:  # the sink is one more outcome of the softmax, dropped from the output
                log_z = torch.logaddexp(torch.logsumexp(scores, -1), sink_col)
                probs = torch.exp(scores - log_z[..., None])
            else:
                probs = torch.softmax(scores, -1)
            if dropout > 0:
                probs = nn.functional.dropout(probs, p=dropout, training=True)
            o = torch.matmul(probs.view(b, h_kv, group * c, n_keys), values[:, :, :n_keys])
            outs.append(o.view(b, h, c, d_v).transpose(1, 2))
        return torch.cat(outs, 1).to(query.dtype)


_jobs: dict[int, _LayerJob] = {}  # id(attention module) -> job, for the modules inside a capture_stats block
_jobs_lock = threading.Lock()
_registered: set[str] = set()


@contextmanager
def routed_attention(model: nn.Module, implementation: str, registry: dict[int, Any], lock: threading.Lock,
                     mine: dict[int, Any], what: str) -> Iterator[None]:
    """Inside the block, the attention modules in ``mine`` (``id(module)`` -> job) find their job in
    ``registry`` and ``model`` runs ``implementation``; both are undone on exit, also on error."""
    with lock:
        if set(mine) & set(registry):
            raise CaptureError(f"this model is already inside {what} (in another thread?)")
        registry.update(mine)
    try:
        with _attention_implementation(model, implementation):
            yield
    finally:
        with lock:
            for key in mine:
                registry.pop(key, None)


def register_attention(name: str, function: Callable[..., Any], mask: Callable[..., Any]) -> None:
    """Register an attention function and its mask builder with transformers under ``name``, once."""
    if name in _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, mask)
    _registered.add(name)


def _stats_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Statistics and output for modules inside a :func:`capture_stats` block; for the others plain SDPA, or
    :meth:`_LayerJob.attend` where SDPA would be wrong (learned sinks, ``s_aux``) or refuses (``softcap``)."""
    job = _jobs.get(id(module))
    softcap, sink = kwargs.get("softcap"), kwargs.get("s_aux")
    if isinstance(job, _GeometryJob):  # geometry only: measure, then attend as any other module
        with torch.no_grad():
            job.observe(query.detach(), key.detach(), value.detach(), scaling, softcap)
        job = None
    if job is not None and not (module.training and dropout > 0):
        with torch.no_grad():
            out = job.observe(query.detach(), key.detach(), value.detach(), attention_mask, scaling, softcap,
                              None if sink is None else sink.detach())
        return out, None
    if softcap is not None or sink is not None:
        block = job.block_bytes if job is not None else None
        return _LayerJob.attend(query, key, value, attention_mask, scaling, softcap, sink,
                                dropout if module.training else 0.0, block), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _register() -> None:
    from transformers.masking_utils import sdpa_mask

    # The same masks as SDPA: none at all for plain causal attention, so SDPA keeps its fast causal kernels.
    register_attention(STATS_IMPLEMENTATION, _stats_attention, sdpa_mask)


def stats_supported(model: nn.Module) -> str | None:
    """Why :func:`capture_stats` can't run on ``model`` (None when it can): the model's scheme decides."""
    scheme = attention_scheme(model)
    support = scheme.support()["stats"]
    return None if support.ok else support.message(scheme.family, "stats")


@contextmanager
def capture_stats(model: nn.Module, *, k_max: int = 8, layers: Sequence[int] | None = None,
                  map_size: int | None = None, local: int = LOCAL_WINDOW, block_bytes: int | None = None,
                  on_layer: Callable[[int, LayerStats], None] | None = None,
                  on_geometry: Callable[[int, KeyGeometry], None] | None = None) -> Iterator[StatsCapture]:
    """Statistics mode: exact per-head sink metrics of a forward pass in the block, no T x T maps kept.

    ``StatsCapture.stats[layer]`` holds the numbers of the last forward pass run inside the block (run one
    forward per block, or read them between passes).

    Args:
        model: a Hugging Face causal LM whose attention goes through transformers' attention interface
            (Llama, Gemma, Mistral, Qwen, GPT-2 ...). Run one sequence per forward pass, without a KV cache.
        k_max: K, the number of leading tokens measured (see :mod:`sinkscope.metrics`).
        layers: layer indices to measure (default: all). Negative indices count from the end.
        map_size: also pool every head's map to at most this many bins per side (:func:`pool_map`'s bins).
        local: queries this close to a key are left out of the received mass.
        block_bytes: memory for one block of query rows (scores and probabilities); smaller is leaner, not
            less exact (default: :func:`default_block_bytes` of each layer's device; at least one row).
        on_layer: called as ``on_layer(layer, stats)`` as soon as a layer is done (layers of the GPU row pass:
            when the forward's statistics come to the host, as the block exits or ``stats`` is read).
        on_geometry: also measure each layer's key geometry (:func:`sinkscope.metrics.key_geometry`, from the same
            queries and keys) and call ``on_geometry(layer, geometry)``.

    Example::

        with sinkscope.capture_stats(model, k_max=8) as cap:
            model.model(input_ids=ids, use_cache=False)
        cap.stats[0].first_token_mass  # [heads]
    """
    scheme = attention_scheme(model)
    scheme.require("stats")
    if block_bytes is not None and block_bytes < 1:
        raise CaptureError(f"block_bytes must be positive, got {block_bytes}")
    modules = find_attention_modules(model)
    selected = scheme.select_layers(layers)
    cap = StatsCapture(layers=selected, k_max=k_max, _on_layer=on_layer)
    _register()
    buffers = _Buffers()
    mine = {id(modules[i]): _LayerJob(i, k_max, map_size, local, block_bytes, cap.add, buffers,
                                      scheme.layers[i].kind, scheme.layers[i].window, cap._pending.append)
            for i in selected}
    for job in mine.values():
        job.geometry = on_geometry
    with routed_attention(model, STATS_IMPLEMENTATION, _jobs, _jobs_lock, mine, "a capture_stats block"):
        yield cap
    if cap.stats:  # a forward ran: every selected layer must have reached the attention function
        check_layer_count(scheme, set(cap.stats), selected, "stats")


class _GeometryJob:
    """Key geometry of one attention module for the forward pass in flight (the module then attends as usual)."""

    def __init__(self, layer: int, k_max: int, out: dict[int, KeyGeometry], window: int | None = None) -> None:
        self.layer, self.k_max, self.out, self.window = layer, k_max, out, window

    def observe(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                softcap: float | None) -> None:
        if query.shape[0] != 1:
            raise CaptureError(f"geometry capture takes one sequence per forward pass, got a batch of {query.shape[0]}")
        if query.shape[2] != key.shape[2]:
            raise CaptureError("geometry capture needs the whole prompt in one forward pass without a KV cache")
        self.out[self.layer] = key_geometry(query[0], key[0], value[0], self.k_max, scale=scaling, softcap=softcap,
                                            window=self.window)


@dataclass
class GeometryCapture:
    """What a :func:`capture_geometry` block measured: ``layers[i]`` for every selected layer."""

    layers: dict[int, KeyGeometry] = field(default_factory=dict)


@contextmanager
def capture_geometry(model: nn.Module, *, k_max: int = 8, layers: Sequence[int] | None = None
                     ) -> Iterator[GeometryCapture]:
    """Measure how each head's rotated queries meet the first token's key during a forward pass in the block
    (:func:`sinkscope.metrics.key_geometry`); attention itself runs as SDPA (or exact blocked attention for
    soft-capped and learned-sink models), as in statistics mode's unmeasured layers. The model must go through
    transformers' attention interface (what statistics mode needs; :func:`stats_supported` says why not).

    Example::

        with sinkscope.capture_geometry(model, k_max=8) as geo, torch.no_grad():
            model.model(input_ids=ids, use_cache=False)
        geo.layers[3].sink_key_cos  # [heads]
    """
    scheme = attention_scheme(model)
    scheme.require("stats")
    modules = find_attention_modules(model)
    cap = GeometryCapture()
    mine = {id(modules[i]): _GeometryJob(i, k_max, cap.layers, scheme.layers[i].window)
            for i in scheme.select_layers(layers)}
    _register()
    with routed_attention(model, STATS_IMPLEMENTATION, _jobs, _jobs_lock, mine, "a capture_geometry block"):
        yield cap


def bin_edges(length: int, size: int) -> list[tuple[int, int]]:
    """Split ``range(length)`` into at most ``size`` contiguous bins of near-equal width."""
    size = max(1, min(size, length))
    edges = torch.linspace(0, length, size + 1).round().long().tolist()
    return [(edges[i], edges[i + 1]) for i in range(size)]


def pool_bins(length: int, size: int) -> list[tuple[int, int]]:
    """The bins of :func:`pool_map`: one per token up to ``size`` tokens, else position 0 alone and
    ``size - 1`` near-equal bins over the rest."""
    if length <= size:
        return [(i, i + 1) for i in range(length)]
    return [(0, 1), *[(a + 1, b + 1) for a, b in bin_edges(length - 1, size - 1)]]


def pool_map(probs: torch.Tensor, size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pool ``[..., q, k]`` attention to at most ``size`` x ``size`` bins.

    Queries are averaged within a bin and keys summed, so every pooled row still sums to 1 and a cell reads
    as "share of attention that the queries of this bin give to the keys of that bin". Position 0 keeps a
    bin of its own so that the first-token sink is never blurred into its neighbours.
    """
    t_q, t_k = probs.shape[-2], probs.shape[-1]
    if t_q != t_k:
        raise CaptureError("pool_map expects square (self-attention) maps")
    bins = pool_bins(t_q, size)
    if len(bins) == t_q:
        return probs, bins
    # Bin-membership matrices: summing keys and averaging queries are two matrix products, which BLAS does
    # fast and without a T x T temporary.
    member = torch.zeros(len(bins), t_q, dtype=probs.dtype, device=probs.device)
    for i, (a, b) in enumerate(bins):
        member[i, a:b] = 1.0
    keys = probs @ member.T  # [..., q, bins]
    pooled = (member / member.sum(-1, keepdim=True)) @ keys  # [..., bins, bins]
    return pooled, bins
