"""The GPU row pass of statistics mode: attention with its log-sum-exp, then one Triton kernel for the statistics.

The torch path (:meth:`sinkscope.capture._LayerJob.observe`) writes every block of float32 scores and reads
it about ten times. On a GPU the forward's own attention kernels can return each row's log-sum-exp (LSE) at
no extra cost; with it every probability is ``exp(s - lse)``, so one more kernel that recomputes Q K^T tile by
tile (:func:`sinkscope._gpu.kernels.stats_kernel`) keeps every statistic without a softmax pass:

1. attention output and LSE from the fastest backend that returns them for the layer: cuDNN, else flash
   attention (also sliding windows), else memory-efficient attention, else our own Triton forward (soft-capped
   logits, float32 with a window); :func:`row_pass` says which ran;
2. learned sinks (gpt-oss's ``s_aux``) join the LSE afterwards: ``lse' = logaddexp(lse, sink)``, the output
   scaled by ``exp(lse - lse')``;
3. the statistics kernel, then a few small float64 reductions here.

It serves one sequence (batch of one, no padding), causal attention with an optional sliding window, any
GQA grouping, soft-capping, learned sinks, bfloat16, float16 and float32 (fp32 products in IEEE precision, not
TF32). Anything else (Triton missing, another dtype, a mask that is not the layer's causal or sliding-window
pattern, chunked attention) gets :func:`unusable`'s reason and the torch path, which stays the reference.

``SINKSCOPE_GPU_ROWS``: ``0`` turns the GPU row pass off; ``1`` also runs it on CPU tensors when Triton's
interpreter is on (``TRITON_INTERPRET=1``): that is how the tests check the kernels' logic without a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..metrics import LayerStats, ReceivedMass, distant_queries

log = logging.getLogger(__name__)
ENV = "SINKSCOPE_GPU_ROWS"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256

_failed: dict[tuple[str, Any], str] = {}  # (backend, configuration) -> why it refused: not tried again
# id(mask) -> (the mask, its version, window, verdict): masks are built once per forward and shared by its layers.
_masks: dict[int, tuple[weakref.ref[torch.Tensor], int, int | None, bool]] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_missing() -> str | None:
    """Why Triton can't be used (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'sinkscope[gpu]')"
    return None


_broken: str | None = None  # why the kernels failed to build or run in this process (then not tried again)


def broken(exc: BaseException) -> str:
    """Record that the GPU row pass failed with ``exc`` (a kernel this GPU or Triton version can't build) and
    return the reason that statistics mode reports; later calls go to the torch path at once."""
    global _broken
    first = str(exc).strip().splitlines()
    _broken = f"it failed here ({type(exc).__name__}: {first[0][:160] if first else ''})"
    log.warning("statistics mode: the GPU row pass %s; using the torch path", _broken)
    return _broken


def unusable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
             kind: str, window: int | None) -> str | None:
    """Why the GPU row pass can't serve this attention call (None when it can), as a short clause."""
    setting = os.environ.get(ENV, "auto")
    if setting == "0":
        return f"turned off by {ENV}=0"
    if not query.is_cuda and not (setting == "1" and _interpreting()):
        return "not on a CUDA device"
    missing = triton_missing()
    if missing:
        return missing
    if _broken:
        return _broken
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"{query.dtype} is not bfloat16, float16 or float32"
    if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM}"
    if query.shape[1] % key.shape[1]:
        return "query heads are not a multiple of key heads"
    if kind not in ("full", "sliding"):
        return f"{kind} attention layers"
    t = query.shape[2]
    if t * max(query.stride(2), key.stride(2), value.stride(2)) >= 2**31:  # (heads' offsets are 64-bit)
        return f"{t} tokens at these strides: past the kernels' 32-bit row offsets"
    return mask_unusable(mask, query.shape[2], window if kind == "sliding" else None)


def mask_unusable(mask: torch.Tensor | None, t: int, window: int | None) -> str | None:
    """Why ``mask`` is not the layer's causal (``window`` None) or sliding-window pattern (None when it is).

    No mask is transformers' way of saying plain causal. A mask tensor is compared with the expected pattern
    once (in blocks of rows, never a second T x T tensor); the verdict is kept for that tensor object."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        return "an additive (float) attention mask"
    if mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[-2] != t or mask.shape[-1] != t:
        return f"an attention mask of shape {tuple(mask.shape)}"
    seen = _masks.get(id(mask))
    if seen is not None and seen[0]() is mask and seen[1:3] == (mask._version, window):
        ok = seen[3]
    else:
        ok = _matches(mask, t, window)
        for key in [key for key, entry in _masks.items() if entry[0]() is None]:
            del _masks[key]
        _masks[id(mask)] = (weakref.ref(mask), mask._version, window, ok)
    if ok:
        return None
    what = f"sliding window of {window}" if window else "causal"
    return f"an attention mask that is not the layer's {what} pattern (padding?)"


def _matches(mask: torch.Tensor, t: int, window: int | None) -> bool:
    keys = torch.arange(t, device=mask.device)
    step = max(1, 2**26 // max(t, 1))
    for q0 in range(0, t, step):
        rows = torch.arange(q0, min(t, q0 + step), device=mask.device)[:, None]
        want = keys[None, :] <= rows
        if window:
            want &= keys[None, :] > rows - window
        if not bool((mask[0, :, q0: q0 + step] == want).all()):
            return False
    return True


# ------------------------------------------------------------------------------------ attention and its LSE


def _grouped(op: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any,
             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``op`` (a raw SDPA op, which wants as many key heads as query heads) with the key and value heads repeated
    to the query heads' count; its output as ``[1, T, heads, D_v]`` and its LSE."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out, lse = op(q, k, v, *args, **kwargs)[:2]
    return out.transpose(1, 2), lse


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None,
           softcap: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    if window or softcap or q.dtype == torch.float32:
        return None
    return _grouped(torch.ops.aten._scaled_dot_product_cudnn_attention, q, k, v, None, True, 0.0, True, False,
                    scale=scale)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None,
           softcap: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    if softcap or q.dtype == torch.float32:
        return None
    t = q.shape[2]
    extra = {"window_size_left": window - 1, "window_size_right": 0} if window else {}
    out, lse = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, t, t, 0.0, True, False,
        scale=scale, **extra)[:2]
    return out, lse


def _efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None,
               softcap: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    # Not for float32: its LSE there is off by up to 1e-5 (measured on an H200), which the entropy and the
    # received mass inherit; float32 models get the Triton forward, in IEEE float32.
    if window or softcap or q.dtype == torch.float32:
        return None
    return _grouped(torch.ops.aten._scaled_dot_product_efficient_attention, q, k, v, None, True, 0.0, True,
                    scale=scale)


# The statistics kernel's (query rows per tile, keys per program, warps, stages) on a GPU; benchmarks/capture_gpu.py
# --tiles tries others.
TILES = (64, 128, 4, 3)  # the fastest of those tried at 8k and 32k on an H200 (docs/performance.md)


def _blocks(device: torch.device) -> tuple[int, int, int, int]:
    """(rows, keys, warps, stages) of the kernels' tiles: small ones under the interpreter (each is numpy work)."""
    if device.type != "cuda":
        return 16, 16, 1, 1
    return TILES


def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None,
                    softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    from . import kernels

    _, h, t, d = q.shape
    h_kv, d_v = k.shape[1], v.shape[-1]
    out = torch.empty(t, h, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(h, t, dtype=torch.float32, device=q.device)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    # The forward keeps a [rows, D_v] accumulator: 64 rows fit the registers. Small tiles under the interpreter.
    bm, bn, stages = (64, 64, 3) if q.is_cuda else (16, 16, 1)
    grid = (math.ceil(t / bm), h)
    kernels.forward_kernel[grid](
        q, k, v, out, lse, t, h // h_kv, scale, softcap or 1.0, window or 0,
        q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        D=d, DP=_pow2(d), DV=d_v, DVP=_pow2(d_v), BM=bm, BN=bn, DOT_F32=_dot_f32(q), SOFTCAP=softcap is not None,
        HAS_WINDOW=bool(window), num_warps=4 if q.is_cuda else 1, num_stages=stages)
    return out.unsqueeze(0), lse


BACKENDS = (("cuDNN", _cudnn), ("flash attention", _flash), ("memory-efficient attention", _efficient))


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None,
                       softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Causal attention (optional sliding window and soft-cap) of one sequence: output ``[1, T, heads, D_v]``,
    the LSE of every row ``[heads, T]`` (float32, natural log of the sum of ``exp(scale * q.k)``) and the
    backend that computed them. ``q`` ``[1, heads, T, D]``, ``k``/``v`` ``[1, kv heads, T, D]``."""
    t = q.shape[2]
    if q.is_cuda:
        config = (q.dtype, q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], bool(window), softcap is not None)
        for name, backend in BACKENDS:
            if (name, config) in _failed:
                continue
            try:
                got = backend(q, k, v, scale, window, softcap)
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                _failed[(name, config)] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.info("GPU row pass: %s refused %s: %s", name, config, _failed[(name, config)])
                continue
            if got is None:
                continue
            out, lse = got
            return out.reshape(1, t, q.shape[1], v.shape[-1]), lse.reshape(q.shape[1], -1)[:, :t].float(), name
    out, lse = _triton_forward(q, k, v, scale, window, softcap)
    return out, lse, "Triton forward (sinkscope)"


# ------------------------------------------------------------------------------------------------ statistics


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _dot_f32(q: torch.Tensor) -> bool:
    # float32 products in IEEE precision (not TF32); Triton's interpreter also multiplies bfloat16 wrongly, so
    # there every product is taken in float32.
    return q.dtype == torch.float32 or not q.is_cuda


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass
class PendingStats:
    """One layer's statistics still on its device (float64 tensors): :func:`finish` copies many layers at once,
    so a forward pass synchronises with the host once, not once per layer."""

    layer: int
    row_pass: str
    t: int
    k_max: int
    local: int
    bins: list[tuple[int, int]] | None
    parts: dict[str, torch.Tensor]  # first_token_mass, sink_mass, entropy, received, local, [learned, pooled]


def finish(pending: list[PendingStats]) -> list[LayerStats]:
    """The :class:`LayerStats` of ``pending`` layers: one device-to-host copy per device, into pinned memory.

    The arrays are views of that pinned buffer (each holds it alive: the allocator reuses it only once they
    are all gone), not copies: a copy of a 32-layer model's pooled maps (75 MB) cost more than the copy from
    the GPU (65 ms against 4 ms at 8k tokens, on an H200's host)."""
    by_device: dict[torch.device, list[PendingStats]] = {}
    for item in pending:
        by_device.setdefault(next(iter(item.parts.values())).device, []).append(item)
    host: dict[int, dict[str, np.ndarray]] = {}
    for device, items in by_device.items():
        flat = torch.cat([x.reshape(-1) for item in items for x in item.parts.values()])
        if device.type == "cuda":
            buf = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            buf.copy_(flat)
        else:
            buf = flat
        values, at = buf.numpy(), 0
        for item in items:
            arrays = {}
            for name, x in item.parts.items():
                arrays[name] = values[at: at + x.numel()].reshape(tuple(x.shape))
                at += x.numel()
            host[id(item)] = arrays
    out = []
    for item in pending:
        a = host[id(item)]
        queries = distant_queries(item.t, item.k_max, item.local)
        total = a["received"]
        total[queries == 0] = 0.0
        out.append(LayerStats(first_token_mass=a["first_token_mass"], sink_mass=a["sink_mass"],
                              entropy=a["entropy"], received=ReceivedMass(total=total, queries=queries,
                                                                          heads=len(a["entropy"])),
                              pooled=a.get("pooled"), bins=item.bins, learned_sink_mass=a.get("learned"),
                              row_pass=item.row_pass, local_mass=a["local"]))
    return out


_BIN_CACHE: dict[tuple, tuple] = {}


def _cached(key: tuple, make: Any) -> Any:
    got = _BIN_CACHE.get(key)
    if got is None:
        if len(_BIN_CACHE) > 64:
            _BIN_CACHE.clear()
        got = _BIN_CACHE[key] = make()
    return got


def _bin_tensors(bins: list[tuple[int, int]], t: int, device: torch.device
                 ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(bin of each position, the bins' edges on ``device`` as int32, bin widths float64 on ``device``), made once
    per length: a host-to-device copy per layer would stall the GPU's queue."""
    def make() -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        bin_of = np.empty(t, dtype=np.int64)
        for i, (a, b) in enumerate(bins):
            bin_of[a:b] = i
        edges = torch.tensor([a for a, _ in bins] + [bins[-1][1]], dtype=torch.int32)
        width = torch.tensor([b - a for a, b in bins], dtype=torch.float64)
        return bin_of, edges.to(device), width.to(device)
    return _cached(("bins", t, len(bins), str(device)), make)


def _tile_bins(bin_of: np.ndarray, t: int, step: int, device: torch.device
               ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(the most bins one block of ``step`` positions spans, the first and the last bin of each block as int32 on
    ``device``), blocks starting at multiples of ``step``; once per length."""
    def make() -> tuple[int, torch.Tensor, torch.Tensor]:
        starts = np.arange(0, t, step)
        first, last = bin_of[starts], bin_of[np.minimum(starts + step, t) - 1]
        return (int((last - first).max()) + 1, torch.from_numpy(first.astype(np.int32)).to(device),
                torch.from_numpy(last.astype(np.int32)).to(device))
    return _cached(("tiles", t, int(bin_of[-1]) + 1, step, str(device)), make)


def layer_stats(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scale: float, softcap: float | None,
                window: int | None, sink: torch.Tensor | None, k_max: int, local: int,
                bins: list[tuple[int, int]] | None, layer: int = 0, row_pass: str = "") -> PendingStats:
    """One layer's statistics (on its device: :func:`finish` brings them to the host) from its queries
    ``[1, heads, T, D]``, keys ``[1, kv heads, T, D]`` and the LSE ``[heads, T]`` over every outcome of each row
    (keys and the learned sink, if any)."""
    from . import kernels

    _, h, t, d = q.shape
    dev = q.device
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    bq, bk, warps, stages = _blocks(dev)
    nb = len(bins) if bins else 0
    tfirst = tlast = edges = torch.zeros(1, dtype=torch.int32, device=dev)
    qb = 1
    if bins:
        bin_of, edges, width = _bin_tensors(bins, t, dev)
        qb, tfirst, tlast = _tile_bins(bin_of, t, bq, dev)
        if qb > 8 and q.is_cuda:  # narrow bins (short prompts): smaller tiles, fewer bins per tile to unroll
            bq = 16
            qb, tfirst, tlast = _tile_bins(bin_of, t, bq, dev)
    ent = torch.empty(h, t, dtype=torch.float32, device=dev)
    recv = torch.empty(h, t, dtype=torch.float32, device=dev)
    first = torch.empty(h, k_max, dtype=torch.float32, device=dev)
    near = torch.empty(h, t, dtype=torch.float32, device=dev)
    # Column sums per query bin [heads, bins, T]: each program stores its own columns, no atomics.
    pool = torch.zeros((h, nb, t) if bins else (1,), dtype=torch.float32, device=dev)
    grid = (math.ceil(t / bk), h)
    kernels.stats_kernel[grid](
        q, k, lse.contiguous(), ent, recv, first, pool, tfirst, tlast, edges, t, nb, h // k.shape[1], scale,
        softcap or 1.0, window or 0, k_max, local, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
        D=d, DP=_pow2(d), BQ=bq, BK=bk, DOT_F32=_dot_f32(q), SOFTCAP=softcap is not None, HAS_WINDOW=bool(window),
        BINS=bool(bins), QB=qb, num_warps=warps, num_stages=stages)
    rows = 64 if q.is_cuda else 16
    kernels.local_kernel[(math.ceil(t / rows), h)](
        q, k, lse.contiguous(), near, t, h // k.shape[1], scale, softcap or 1.0, window or 0, k_max, q.stride(1),
        q.stride(2), k.stride(1), k.stride(2), D=d, DP=_pow2(d), BQ=rows, LOCAL=local,
        DOT_F32=_dot_f32(q), SOFTCAP=softcap is not None, HAS_WINDOW=bool(window), num_warps=4 if q.is_cuda else 1)
    n = t - k_max
    # Entropy of the rows q >= K: log Z - sum(p s) per row, less the learned sink's p s below.
    entropy = lse[:, k_max:].double().sum(1) - ent.double().sum(1)
    parts: dict[str, torch.Tensor] = {}
    if sink is not None:
        sink_d = sink.double().reshape(h, 1).to(dev)
        sink_p = torch.exp(sink_d - lse.double())[:, k_max:]
        entropy -= (sink_p * sink_d).sum(1)
        parts["learned"] = sink_p.sum(1) / n
    firsts = first.double() / n
    parts.update(first_token_mass=firsts[:, 0], sink_mass=firsts.cumsum(-1), entropy=entropy / n,
                 received=recv.double().sum(0).clamp_min_(0), local=near[:, k_max:].double().sum(1) / n)
    if bins:
        # Column sums per query bin -> key bins (float32 sums of at most a bin's width of columns).
        cells = torch.empty(h, nb, nb, dtype=torch.float32, device=dev)
        rows, block = (4, 128) if q.is_cuda else (min(1024, _pow2(h * nb)), 16)
        kernels.pool_kernel[(math.ceil(h * nb / rows), nb)](pool, cells, edges, t, nb, h * nb, ROWS=rows,
                                                             BLOCK=block)
        parts["pooled"] = cells.double() / width[None, :, None]
    return PendingStats(layer=layer, row_pass=row_pass, t=t, k_max=k_max, local=local, bins=bins, parts=parts)


def row_pass(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float, softcap: float | None,
             window: int | None, sink: torch.Tensor | None, k_max: int, local: int,
             bins: list[tuple[int, int]] | None, layer: int = 0) -> tuple[torch.Tensor, PendingStats]:
    """Statistics mode for one layer on the GPU: ``(output [1, T, heads, D_v], statistics still on the device)``;
    :func:`finish` turns the second into :class:`LayerStats` (``row_pass`` says what ran).

    Call :func:`unusable` first: this assumes a batch of one, causal attention with ``window`` (None: none),
    and a dtype of :data:`DTYPES`. ``sink``: learned sink logits ``[heads]`` or None."""
    out, lse, backend = attention_with_lse(query, key, value, scale, window, softcap)
    if sink is not None:
        sink32 = sink.detach().float().reshape(-1, 1).to(lse.device)
        total = torch.logaddexp(lse, sink32)
        keep = torch.exp(lse - total)  # the keys' share of each row: the output loses the sink's
        out = (out.float() * keep.t()[None, :, :, None]).to(query.dtype)
        lse = total
    what = f"Triton statistics kernel (sinkscope/_gpu), attention and LSE by {backend}"
    return out, layer_stats(query, key, lse, scale=scale, softcap=softcap, window=window, sink=sink, k_max=k_max,
                            local=local, bins=bins, layer=layer, row_pass=what)
