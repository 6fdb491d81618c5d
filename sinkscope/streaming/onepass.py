"""Token-by-token StreamingLLM in one pass: the NLL of every token under ``SinkCache(S, W)``, from chunked forwards.

Why one pass is exact
---------------------
Streamed token by token through :class:`~sinkscope.streaming.SinkCache`, token ``t`` is computed once, when
it is fed, and its keys and values are never recomputed. At that moment its query, at every global layer,
attends to

* the window keys ``max(S, t - W + 1) .. t`` at their true distances (they move down together), and
* the sink keys ``j < S`` (``j <= t``) at distance ``min(t, S + W - 1) - j``: the query sits at in-cache
  position ``min(t, S + W - 1)``, the sinks at ``0 .. S-1``.

Before the first eviction (``t < S + W``) that is every earlier token at its true distance: the dense
model. A local (sliding-window) layer attends to its own last ``sliding_window`` keys at true distances, as
``SinkCache`` keeps them, and no sinks. Every hidden state of token ``t`` therefore depends only on the
tokens before it through this attention, so one forward over the whole text with this attention in place of
the model's gives every token's logits exactly as the stream does. With RoPE a score depends on the query's
and key's positions only through their difference, and rotations compose: the sink scores use the query
re-rotated by ``min(t, S + W - 1) - p(t)`` (``p(t)`` its position in the forward), the band uses the
positions as they are.

How it runs
-----------
The text goes through the model in chunks (bounded logits and activations), each a forward of the model
with a registered attention function (:data:`ONEPASS_IMPLEMENTATION`, like statistics mode) and a
:class:`BandCache` that carries, per layer, the last ``W - 1`` (local layers: ``sliding_window - 1``) keys
and values into the next chunk and keeps the ``S`` sink keys. Attention is computed one block of query
rows at a time over the sink columns plus the band of keys the block needs, sinks and band merged in one
softmax (with gpt-oss's learned sink logit as one more outcome and Gemma-2's soft-cap on the scores): memory
is O(rows x (W + S)) per block, never a T x T tensor.

Pinned positions
----------------
``pins`` generalise the sinks: the cache keeps the last ``W`` tokens and every kept position (``0 .. S-1`` and
the pins) that has left them, in order, each at its rank: a kept key ``p_i`` (the i-th kept position) sits
at slot ``i`` once ``p_i <= t - W``, and query ``t`` at slot (kept positions out of the window) +
``min(t, W - 1)``. With no pins that is ``SinkCache``'s layout above. No cache shipped elsewhere pins later
positions; the evaluation measures whether pinning secondary sinks would pay (``sinkscope.pins``).

Positions are local to each chunk: its first token sits at position ``L`` (the tail it carries, at most
``max(W, sliding_window) - 1``) and the carried keys are re-rotated from the position they arrived at to
this chunk's frame, once each time, in float32. So no query or key is ever rotated by a large absolute
position, and a 100k-token stream keeps float32 precision (RoPE of position 10^5 in float32 alone would
err by ~10^-2 radians in its fastest frequency).

What it serves is the model's :class:`~sinkscope.scheme.AttentionScheme` mode ``onepass``: what
``SinkCache`` serves, for models whose attention goes through transformers' attention interface with RoPE
or no positions. The others (ALiBi, GPT-J, Falcon: their attention code bypasses the interface) are
refused with the reason; ``eval-stream`` then streams them token by token.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

from ..errors import CaptureError, ConfigError
from ..scheme import FULL, LINEAR, SLIDING, AttentionScheme, attention_scheme, check_layer_count, text_config
from .cache import _linear_states, _max_positions
from .rope import LayerRope, layer_ropes, rerotate

__all__ = ["ONEPASS_IMPLEMENTATION", "BandCache", "onepass_nll"]

ONEPASS_IMPLEMENTATION = "sinkscope_onepass"
BLOCK_FLOATS = 2**20  # scores of one block of query rows (x heads), float32: 4 MiB, cache-friendly on a CPU
_LOW = torch.finfo(torch.float32).min


class _BandLayer(CacheLayerMixin):
    """One softmax-attention layer: the sink keys, the tail carried between chunks, the chunk in flight.

    ``band``: keys each query sees at true distances, itself included (``W``, or a local layer's window);
    ``pins``: the positions the cache keeps once they leave the band, ascending (global layers: ``0 .. S-1``
    and any pinned later positions; local layers: none).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, index: int, rope: LayerRope | None, pins: Sequence[int], band: int, local: bool):
        super().__init__()
        self.index, self.rope, self.band = index, rope, band
        self.pins = tuple(pins)
        self.is_sliding = local
        self.seen: set[int] = set()  # shared by the layers of one evaluation: which attended in this forward
        self.reset()

    def reset(self) -> None:
        self.sink_k = self.sink_v = None  # [1, kv heads, <= len(pins), D], pin i rotated to cache slot i
        self.tail_k = self.tail_v = None  # as they arrived
        self.tail_off: torch.Tensor | None = None  # arrival position - global index, per tail key
        self.start = 0  # global index of the chunk's first token
        self.frame = 0  # its position in this chunk's forward
        self.flight: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _moved(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.rope is None or k.shape[-2] == 0:
            return k
        return rerotate(k, delta, self.rope.inv_freq, self.rope.layout)

    def tail_length(self) -> int:
        return 0 if self.tail_k is None else int(self.tail_k.shape[-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[0] != 1:
            raise ConfigError(f"the one-pass evaluation streams one sequence, got a batch of {key_states.shape[0]}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, c0, frame = key_states.shape[-2], self.start, self.frame
        dev = key_states.device
        if self.tail_k is None:
            keys, values, g0 = key_states, value_states, c0
            all_k, all_v = key_states, value_states
            all_off = torch.full((n,), frame - c0, dtype=torch.long, device=dev)
        else:
            L = self.tail_length()
            # A tail key's position in this frame minus the one it was rotated at.
            delta = (frame - c0) - self.tail_off
            keys = torch.cat([self._moved(self.tail_k, delta), key_states], dim=-2)
            values = torch.cat([self.tail_v, value_states], dim=-2)
            g0 = c0 - L
            all_k = torch.cat([self.tail_k, key_states], dim=-2)
            all_v = values
            all_off = torch.cat([self.tail_off, torch.full((n,), frame - c0, dtype=torch.long, device=dev)])
        have = 0 if self.sink_k is None else int(self.sink_k.shape[-2])
        # Pins that arrive in this chunk: kept from now on, pin i rotated to its cache slot i.
        mine = [(i, p) for i, p in enumerate(self.pins) if i >= have and c0 <= p < c0 + n]
        if mine:
            at = torch.tensor([p - c0 for _, p in mine], dtype=torch.long, device=dev)
            sk = self._moved(key_states[..., at, :],
                             torch.tensor([i - (p - c0 + frame) for i, p in mine], dtype=torch.long, device=dev))
            sv = value_states[..., at, :]
            self.sink_k = sk if self.sink_k is None else torch.cat([self.sink_k, sk], dim=-2)
            self.sink_v = sv if self.sink_v is None else torch.cat([self.sink_v, sv], dim=-2)
        cut = max(0, all_k.shape[-2] - (self.band - 1))  # the next chunk needs the last band - 1 keys
        self.tail_k, self.tail_v, self.tail_off = all_k[..., cut:, :], all_v[..., cut:, :], all_off[cut:]
        self.flight = (keys, values, g0)
        return keys, values

    def attend(self, query: torch.Tensor, scaling: float | None, softcap: float | None,
               s_aux: torch.Tensor | None) -> torch.Tensor:
        """The layer's attention output ``[1, C, heads, D_v]`` for the chunk in flight (module docstring)."""
        if self.flight is None:
            raise CaptureError(f"layer {self.index}: attention ran before its keys reached the one-pass cache")
        keys, values, g0 = self.flight
        self.flight = None
        _, h, n_q, d = query.shape
        h_kv, d_v = keys.shape[1], values.shape[-1]
        group = h // h_kv
        scale = scaling if scaling is not None else d ** -0.5
        c0, frame, band = self.start, self.frame, self.band
        dev = query.device
        q = query[0].float()
        k_t = keys[0].float().transpose(-1, -2) * scale  # [kv heads, D, keys]
        v = values[0].float()
        t = torch.arange(c0, c0 + n_q, device=dev)  # global index of each query
        n_s = 0 if self.sink_k is None else int(self.sink_k.shape[-2])
        if n_s:
            # Query t sees pin i as a pin once it has left the band (p_i <= t - W); it sits in cache slot
            # (pins out of the band) + min(t, W - 1): the sink scores take the query rotated there.
            pins = torch.tensor(self.pins[:n_s], dtype=torch.long, device=dev)
            out_of_band = torch.searchsorted(pins, t - band, right=True)
            delta = out_of_band + torch.clamp(t, max=band - 1) - (t - c0 + frame)
            q_s = self._moved(query.float(), delta)[0]
            sink_t = self.sink_k[0].float().transpose(-1, -2) * scale
            sink_v = self.sink_v[0].float()
        sink_col = s_aux.detach().float().reshape(h, 1, 1) if s_aux is not None else None
        out = torch.empty(n_q, h, d_v, dtype=query.dtype, device=dev)
        # Rows per block: c query rows see at most c + band - 1 band keys plus the sinks.
        width = self.band + n_s
        rows = max(1, min(n_q, int((math.isqrt(width * width + 4 * BLOCK_FLOATS // h) - width) // 2)))
        for r0 in range(0, n_q, rows):
            r1 = min(n_q, r0 + rows)
            c = r1 - r0
            tq = t[r0:r1]
            lo = max(c0 + r0 - band + 1, g0)
            hi = c0 + r1  # exclusive
            qb = q[:, r0:r1].reshape(h_kv, group * c, d)
            parts = []
            if n_s:
                ss = torch.matmul(q_s[:, r0:r1].reshape(h_kv, group * c, d), sink_t).view(h, c, n_s)
                parts.append(ss)
            if hi > lo:
                bs = torch.matmul(qb, k_t[:, :, lo - g0:hi - g0]).view(h, c, hi - lo)
                parts.append(bs)
            scores = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            cols = torch.arange(lo, max(lo, hi), device=dev)
            allowed = (cols[None, :] <= tq[:, None]) & (cols[None, :] > tq[:, None] - band)
            if n_s:  # a pin, once out of the band (in it, the band has it at its true distance)
                allowed = torch.cat([pins[None, :] <= tq[:, None] - band, allowed], -1)
            scores = scores.masked_fill(~allowed, _LOW)
            if sink_col is not None:  # gpt-oss: one more outcome of the softmax, attached to no value
                log_z = torch.logaddexp(torch.logsumexp(scores, -1, keepdim=True), sink_col.expand(h, c, 1))
                probs = torch.exp(scores - log_z)
            else:
                probs = torch.softmax(scores, -1)
            o = torch.zeros(h_kv, group * c, d_v, device=dev)
            if n_s:
                o += torch.matmul(probs[..., :n_s].reshape(h_kv, group * c, n_s), sink_v)
            if hi > lo:
                o += torch.matmul(probs[..., n_s:].reshape(h_kv, group * c, hi - lo), v[:, lo - g0:hi - g0])
            out[r0:r1] = o.view(h, c, d_v).transpose(0, 1)
        return out.unsqueeze(0)

    def get_seq_length(self) -> int:
        return self.frame

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tail_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class BandCache(Cache):
    """The state of a one-pass evaluation between chunks: per layer the sink keys and the carried tail.

    Built from the model (its scheme must serve mode ``onepass``); :func:`onepass_nll` drives it. Global
    layers keep ``sinks`` sinks (and the ``pins``, later positions kept once they leave the window) and a band of
    ``window`` keys, local layers their own sliding window, linear attention layers (Qwen3-Next) their recurrent
    state as transformers keeps it.
    """

    def __init__(self, model: nn.Module, sinks: int, window: int, pins: Sequence[int] = ()):
        if not (isinstance(sinks, int) and isinstance(window, int) and sinks >= 0 and window >= 1):
            raise ConfigError(f"one-pass evaluation needs sinks >= 0 and window >= 1 (integers); got sinks={sinks!r}, "
                              f"window={window!r}")
        if not all(isinstance(p, int | np.integer) and p >= 0 for p in pins):
            raise ConfigError(f"pinned positions must be whole numbers >= 0, got {list(pins)!r}")
        kept = sorted(set(range(sinks)) | {int(p) for p in pins})
        scheme = attention_scheme(model)
        scheme.require("onepass", name=scheme.architecture)
        text = text_config(model)
        ropes = layer_ropes(model, text, scheme, scheme.architecture, meta=False)
        layers: list[Any] = []
        for ly in scheme.layers:
            rope = ropes.get(ly.index)
            if ly.kind == FULL:
                layers.append(_BandLayer(ly.index, rope, kept, window, local=False))
            elif ly.kind == SLIDING and ly.window:
                layers.append(_BandLayer(ly.index, rope, (), int(ly.window), local=True))
            elif ly.kind == LINEAR:
                layers.append(LinearAttentionLayer(number_of_states=_linear_states(text, ly.index)))
            else:  # the scheme refuses these
                raise ConfigError(f"{scheme.architecture}: one pass can't serve layer {ly.index} ({ly.kind})")
        super().__init__(layers=layers)
        self.sinks, self.window, self.scheme, self.pins = sinks, window, scheme, tuple(kept[sinks:])

    @property
    def band_layers(self) -> list[_BandLayer]:
        return [ly for ly in self.layers if isinstance(ly, _BandLayer)]

    @property
    def carry(self) -> int:
        """Keys the next chunk's frame must make room for: the longest tail."""
        return max(ly.tail_length() for ly in self.band_layers)

    def begin(self, start: int) -> int:
        """Set up the chunk starting at global token ``start``; returns its first position in the forward."""
        frame = self.carry
        for ly in self.band_layers:
            ly.start, ly.frame = start, frame
        return frame



# ------------------------------------------------------------------------------------- the attention function

_jobs: dict[int, _BandLayer] = {}  # id(attention module) -> its layer, inside a one-pass block
_jobs_lock = threading.Lock()


def _onepass_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    layer = _jobs.get(id(module))
    if layer is None:
        raise CaptureError(f"{type(module).__name__} runs under sinkscope's one-pass attention outside a one-pass "
                           "evaluation; restore the model's attention implementation")
    layer.seen.add(layer.index)
    with torch.no_grad():
        return layer.attend(query, scaling, kwargs.get("softcap"), kwargs.get("s_aux")), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The band and the sinks are masked inside the attention function: no mask tensor is built at all."""
    return None


@contextmanager
def onepass_attention(model: nn.Module, cache: BandCache) -> Iterator[set[int]]:
    """Route every attention layer of ``model`` to ``cache``'s band and sink attention inside the block.

    Yields the set of layers that attended (cleared by the caller per forward). The model's attention
    implementation is restored on exit, also on error.
    """
    from ..capture import register_attention, routed_attention
    from ..scheme import attention_modules

    register_attention(ONEPASS_IMPLEMENTATION, _onepass_attention, _no_mask)
    modules = attention_modules(model)
    seen: set[int] = set()
    mine: dict[int, _BandLayer] = {}
    for layer in cache.band_layers:
        layer.seen = seen
        mine[id(modules[layer.index])] = layer
    with routed_attention(model, ONEPASS_IMPLEMENTATION, _jobs, _jobs_lock, mine, "a one-pass evaluation"):
        yield seen


# ----------------------------------------------------------------------------------------------------- driver


def onepass_nll(model: nn.Module, ids: Sequence[int] | torch.Tensor, sinks: int, window: int, *, chunk: int = 1024,
                on_forward: Callable[[int], None] | None = None, pins: Sequence[int] = ()) -> np.ndarray:
    """NLL of every token streamed through ``SinkCache(sinks, window)``, in one pass: ``[T]``, ``nan`` at 0.

    Equal to feeding the tokens one by one through :class:`~sinkscope.streaming.SinkCache` (module
    docstring), in forwards of ``chunk`` tokens. ``on_forward(1)`` after each forward. ``pins``: later
    positions the cache also keeps once they leave the window (secondary sinks), beside the first ``sinks``:
    the cache holds the kept tokens in order, each at its rank (module docstring, "Pinned positions").

    Raises:
        ConfigError: the model's scheme doesn't serve mode ``onepass`` (the message says what works instead),
            bad sizes, or a chunk that would take positions past the model's range.
    """
    scheme: AttentionScheme = attention_scheme(model)
    cache = BandCache(model, sinks, window, pins)
    x = torch.as_tensor(ids if isinstance(ids, torch.Tensor) else list(ids), dtype=torch.long)
    x = x.reshape(-1).to(next(model.parameters()).device)
    n = int(x.shape[0])
    if chunk < 1:
        raise ConfigError(f"chunk must be a whole number >= 1, got {chunk}")
    mp = _max_positions(text_config(model))
    longest = max(ly.band for ly in cache.band_layers)
    if mp is not None:  # positions of a forward: the carried tail plus the chunk
        chunk = max(1, min(chunk, mp - (longest - 1)))
    out = np.full(n, np.nan)
    expected = scheme.attention_layers
    last: torch.Tensor | None = None
    with onepass_attention(model, cache) as seen, torch.no_grad():
        for start in range(0, n, chunk):
            part = x[start:start + chunk]
            frame = cache.begin(start)
            pos = torch.arange(frame, frame + len(part), device=x.device)[None]
            seen.clear()
            logits = model(input_ids=part[None], position_ids=pos, past_key_values=cache, use_cache=True).logits[0]
            check_layer_count(scheme, seen, expected, "onepass")
            rows = logits[:-1] if last is None else torch.cat([last[None], logits[:-1]])
            first = start + (1 if last is None else 0)
            tgt = x[first:start + len(part)]
            if len(tgt):
                out[first:start + len(part)] = torch.nn.functional.cross_entropy(
                    rows.float(), tgt, reduction="none").double().cpu().numpy()
            last = logits[-1]
            if on_forward:
                on_forward(1)
    return out
