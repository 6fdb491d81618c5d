"""``SinkCache``: a StreamingLLM key/value cache (Xiao et al. 2023) for Hugging Face causal LMs.

The cache keeps, per attention layer, the first ``S`` tokens of the stream (the *sinks*) and the most recent
ones, and re-assigns positions inside the cache, so that a stream runs far past the trained context at
constant memory.

Terms
-----
``S`` = ``sinks``, ``W`` = ``window``. A query attends to ``S`` sinks plus the ``W`` most recent tokens,
itself included: ``S + W`` keys, as in the reference implementation (whose ``cache_size`` is ``S + W``).
Between two forwards a global layer therefore stores ``S + W - 1`` tokens (:attr:`SinkCache.capacity`),
making room for the next one, exactly like transformers' ``DynamicSlidingWindowLayer`` stores
``sliding_window - 1``. ``S = 0`` is plain window eviction.

Positions
---------
Positions live in the cache, not in the stream. The stored tokens of a global layer always sit at positions
``0 .. stored-1`` (sinks first, then the window), and :meth:`SinkCache.get_seq_length` reports ``stored``,
which is how transformers derives the positions of new tokens: a query's position is below ``S + W``
however long the stream. When window tokens are evicted, the tokens after them move down by the number
evicted. Keys arrive already rotated by RoPE, and rotations compose (``R(a) R(b) = R(a + b)``), so moving a
key is re-rotating it by ``-shift`` with the model's own inverse frequencies (per layer type: Gemma-3's local
and global layers use different bases). The cache keeps every key as it arrived, with its arrival position,
and rotates it to its current position in one step, in float32, each time attention reads it; re-rotating
stored keys step after step would pile up rounding error (badly so in bfloat16).

What SinkCache serves, and what it refuses
------------------------------------------
Whether a model is served, and how each layer's keys move, is decided by the model's
:class:`~sinkscope.scheme.AttentionScheme` (:mod:`sinkscope.scheme`), not here: the cache calls
``require("cache")`` and takes each layer's kind, positions, rotary dimensions and the RoPE layout from it.
A cache built from a config derives the scheme from the model instantiated on the meta device.

* **RoPE, either layout.** ``half`` (transformers' ``rotate_half``: Llama, Gemma, Qwen, ...) and
  ``interleaved`` (adjacent pairs: Cohere, GPT-J). Only the first ``rotary_dim`` dimensions of a key head
  rotate (partial rotary: Phi, StableLM, GPT-NeoX, Qwen3-Next); the rest pass through untouched. The
  convention is not assumed: at construction the cache rotates a probe with the model's own rotation (its
  rotary module and ``apply_rotary_pos_emb``; GPT-J, which has no rotary module, with the sinusoidal
  ``embed_positions`` table of its attention and its ``apply_rotary_pos_emb(tensor, sin, cos)``), re-rotates
  it with its own code and refuses the model if the two disagree. Attention scaling factors (YaRN, ...)
  multiply the rotated key once and rotations keep them, so the static RoPE types
  (:data:`sinkscope.scheme.STATIC_ROPE`: default, linear, llama3, yarn, proportional, and dynamic NTK, which
  is static below ``max_position_embeddings``, where the cache keeps every position) are exact; Gemma-4's
  proportional RoPE has zero frequencies on the dimensions it doesn't rotate, which re-rotate by nothing.
* **ALiBi** (MPT, BLOOM, Falcon with ``alibi=True``): keys carry no rotation, so nothing is re-rotated
  (Falcon builds a rotary module even then and never uses it); the bias is built from the keys the cache
  returns, so it follows in-cache distances. BLOOM and Falcon build it from the 2-D attention mask, so a
  2-D all-ones mask passed with a SinkCache (what ``generate`` passes) is replaced by ones over the stored
  plus new tokens; MPT slices a static table by the number of keys.
* **Layers without RoPE** (SmolLM3's NoPE layers): their keys are never re-rotated; their attention sees no
  positions at all apart from the causal mask, so eviction is exact.
* **Hybrid linear attention** (Qwen3-Next): the softmax-attention layers get sinks + window; the
  linear-attention layers keep their fixed-size conv and recurrent state exactly as transformers'
  ``LinearAttentionLayer`` does (they see every token, nothing to evict). :meth:`SinkCache.get_seq_length`
  reports the attention layers' positions.
* **Per-layer head dims** (Gemma-4: sliding layers of head dim 8, full layers 16) come from the scheme.
* **Refused**, each with the scheme's one-line reason and what works instead: learned absolute positions
  (GPT-2, OPT: they can't be re-assigned), multi-head latent attention (DeepSeek-V3: part of each key carries
  no rotation and is shared across heads), chunked attention and attention scaled by absolute position
  (Llama-4), layers reusing another layer's keys and values (Gemma-3n), and RoPE types whose frequencies
  change with the sequence length (``longrope``).

Multi-token forwards (prefill)
------------------------------
A forward of ``n`` tokens sees its whole context: the stored tokens plus all ``n`` new ones, under the
usual causal (or sliding-window) mask, and its tokens take positions ``stored .. stored + n - 1``, which go
past ``S + W - 1`` when ``n`` is large; after the forward the cache is trimmed to the sinks plus the last
``W - 1`` tokens, re-rotated down to ``S ..``. A first prefill on an empty cache is therefore exactly the
dense model. The only limit is that positions stay below ``max_position_embeddings``: a forward that would
go past it raises :class:`~sinkscope.errors.ConfigError` before anything is stored, and a long prompt is
fed in chunks of at most :attr:`SinkCache.max_forward_tokens` tokens. Token-by-token streaming (``n = 1``)
is StreamingLLM exactly.

Gemma-3 (hybrid local/global)
-----------------------------
Sliding-window layers keep their own trained semantics: the last ``sliding_window - 1`` tokens, no sinks,
as transformers' ``DynamicSlidingWindowLayer`` does. They report the same position counter as the global
layers (transformers takes every query position from layer 0, a local layer in Gemma-3), and their keys
are shifted with the global frame, so that query/key distances stay the true token distances. Their oldest
keys may then sit at negative positions; RoPE only sees differences, and transformers' masks only compare
indices, so that is exact. :meth:`_LocalLayer.get_mask_sizes` reports the negative offset so the sliding
mask that transformers builds matches the keys the layer returns.

The sink switch
---------------
:meth:`SinkCache.set_sinks` toggles, between two forwards, between exactly the two caches that
``sinkscope eval-stream`` compares: ``S`` sinks + window ``W``, and a plain window ``W`` (``S = 0``).

* Off: the ``S`` sinks are dropped at once and the window tokens move down by ``S`` positions; from the next
  token on the budget is ``W - 1`` stored tokens, as in ``SinkCache(model, 0, W)``. The memory is freed.
* On: the stream's original first ``S`` tokens are *re-prefilled*: one forward of those ``S`` token ids at
  positions ``0 .. S-1`` on an empty cache. The first tokens of a stream only ever attend to each other, so
  this recomputes their keys and values exactly (not an approximation); they are put back in front of the
  window, which moves up by ``S``, and the budget returns to ``S + W - 1``. The alternative, *re-pinning*
  the oldest window tokens as new sinks, was measured and rejected: window tokens were computed with a
  long context and don't act as sinks (SmolLM2, window 64: the loss stayed as high as with no sinks).
  Re-prefilling needs the ids of the first ``S`` tokens, which :class:`~sinkscope.streaming.Streamer`
  keeps (``S`` integers), and the model, so the cache must have been built from the model. Linear-attention
  layers are not touched by the switch: their state summarises the whole stream either way.

Why a ``transformers.Cache`` with custom layers
----------------------------------------------
``generate`` only accepts ``Cache`` instances, and transformers' mask builders ask the cache per layer
(``get_mask_sizes``, ``get_query_offset``, ``is_sliding``); a layer object per model layer lets global and
local layers follow different storage rules under one position frame, and the base class supplies beam
reordering, batch selection and offloading.

Transformers quirks handled here
--------------------------------
* ``generate`` passes ``position_ids`` counted from the attention mask: absolute stream positions, which
  would bypass the cache's positions and break after the first eviction, and a 2-D attention mask as long as
  the whole stream, from which BLOOM and Falcon build their ALiBi bias. Built from a model, the cache
  installs (once per model) a forward pre-hook on the module that holds the decoder layers (GPT-J's
  ``GPTJModel`` included); whenever a ``SinkCache`` is the ``past_key_values`` of a call it replaces
  ``position_ids`` with the cache's positions (any ``position_ids`` passed alongside a ``SinkCache`` are
  replaced; the cache owns positions) and a 2-D all-ones mask by ones over the stored plus new tokens. Built
  from a config it can't, so ``generate`` refuses it (detected when ``generate`` marks the cache
  user-defined).
* ``generate`` slices a resumed prompt by ``get_seq_length()``, which counts cache positions, not tokens
  seen; after an eviction that slice is wrong, so ``generate`` refuses a cache that has evicted.
* Padded batches are refused (a 2-D attention mask with zeros): transformers indexes the padding mask with
  cache positions, which stop being token indices after the first eviction.
* ``crop`` (assisted decoding) is refused: evicted tokens can't be restored.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, LinearAttentionLayer

from ..errors import ConfigError, SinkscopeError
from ..scheme import (
    FULL,
    LINEAR,
    SLIDING,
    attention_scheme,
    meta_model,
    stack_owner,
)
from .rope import LayerRope, layer_ropes, rerotate

__all__ = ["SinkCache"]

# ---------------------------------------------------------------------------------------------- layers


class _StreamLayer(CacheLayerMixin):
    """What global and local layers share: arrival-frame storage, the position counter, the batch check.

    ``rope`` is None for layers whose keys carry no rotation (ALiBi, NoPE): they are never re-rotated.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, rope: LayerRope | None, capacity: int, max_positions: int | None):
        super().__init__()
        self.rope = rope
        self.capacity = capacity  # global frame: tokens stored between forwards, S + W - 1
        self.max_positions = max_positions
        self.arrival: torch.Tensor | None = None  # position each stored key was rotated at
        self.position = 0  # position of the next token = what get_seq_length reports
        self.seen = 0
        self.batch_size: int | None = None
        self._moved = False  # some stored key is no longer at its arrival position

    @property
    def inv_freq(self) -> torch.Tensor | None:
        """The inverse frequencies this layer's keys are re-rotated with (None: never re-rotated)."""
        return None if self.rope is None else self.rope.inv_freq

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, value_states.shape[1], 0, value_states.shape[-1]))
        self.arrival = torch.empty(0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def _check(self, b: int, n: int) -> None:
        """Refuse, before anything changes, a batch-size change or positions past the model's range."""
        if self.batch_size is not None and b != self.batch_size:
            raise ConfigError(f"this SinkCache holds a stream of batch size {self.batch_size} and got a batch of "
                              f"{b}; call cache.reset() or use a new SinkCache")
        if self.max_positions is not None and self.position + n > self.max_positions:
            raise ConfigError(
                f"a forward of {n} tokens on a SinkCache at position {self.position} would use positions up to "
                f"{self.position + n - 1}, past the model's {self.max_positions} positions; feed at most "
                f"{self.max_positions - self.position} tokens per forward (split long prompts into chunks)"
            )

    def stored(self) -> int:
        """Tokens stored now."""
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def current_positions(self) -> torch.Tensor:
        """The positions the stored keys sit at now (what attention sees)."""
        raise NotImplementedError

    def current_keys(self) -> torch.Tensor:
        """The stored keys rotated to their current positions."""
        if self.rope is None or not self._moved or self.stored() == 0:
            return self.keys
        delta = self.current_positions().to(self.arrival.device) - self.arrival
        return rerotate(self.keys, delta, self.rope.inv_freq, self.rope.layout)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Validate, then return (keys for attention, values for attention, all keys / values / arrivals)."""
        self._check(key_states.shape[0], key_states.shape[-2])
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.batch_size = key_states.shape[0]
        n = key_states.shape[-2]
        new_pos = torch.arange(self.position, self.position + n, device=self.arrival.device)
        full_k = torch.cat([self.current_keys(), key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        all_k = torch.cat([self.keys, key_states], dim=-2)
        arrival = torch.cat([self.arrival, new_pos])
        return full_k, full_v, all_k, arrival, n

    def _advance(self, n: int) -> int:
        """Move the position counter past ``n`` new tokens; returns how many window tokens the frame evicts."""
        total = self.position + n
        shift = max(0, total - self.capacity)
        self.position = total - shift
        self.seen += n
        if shift:
            self._moved = True
        return shift

    def get_seq_length(self) -> int:
        return self.position

    def reset(self) -> None:
        self.keys = self.values = self.arrival = None
        self.is_initialized = False
        self.position = self.seen = 0
        self.batch_size = None
        self._moved = False

    def crop(self, tokens_to_remove: int) -> None:
        raise ConfigError(_NO_CROP)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
        if self.batch_size is not None:
            self.batch_size *= repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]
            self.batch_size = int(self.keys.shape[0])


_NO_CROP = "a SinkCache can't be cropped: evicted tokens are gone (assisted or speculative decoding isn't supported)"


class _SinkLayer(_StreamLayer):
    """A global attention layer: sinks plus a window, stored at positions ``0 .. stored-1``."""

    def __init__(self, rope: LayerRope | None, sinks: int, window: int, max_positions: int | None):
        super().__init__(rope, sinks + window - 1, max_positions)
        self.sinks = sinks
        self.window = window
        self.sinks_enabled = True

    def current_positions(self) -> torch.Tensor:
        return torch.arange(self.stored(), device=self.arrival.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        full_k, full_v, all_k, arrival, n = self._append(key_states, value_states)
        all_v = full_v
        shift = self._advance(n)
        if shift:
            s = self.sinks if self.sinks_enabled else 0
            all_k = torch.cat([all_k[..., :s, :], all_k[..., s + shift:, :]], dim=-2)
            all_v = torch.cat([all_v[..., :s, :], all_v[..., s + shift:, :]], dim=-2)
            arrival = torch.cat([arrival[:s], arrival[s + shift:]])
        self.keys, self.values, self.arrival = all_k, all_v, arrival
        return full_k, full_v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.position + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity + 1


class _LocalLayer(_StreamLayer):
    """A sliding-window layer (Gemma-3 local): the last ``sliding_window - 1`` tokens, no sinks, in the shared frame."""

    is_sliding = True

    def __init__(self, rope: LayerRope | None, sliding_window: int, capacity: int, max_positions: int | None):
        super().__init__(rope, capacity, max_positions)
        self.sliding_window = sliding_window

    def current_positions(self) -> torch.Tensor:
        stored = self.stored()
        return torch.arange(self.position - stored, self.position, device=self.arrival.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        full_k, full_v, all_k, arrival, n = self._append(key_states, value_states)
        keep = self.sliding_window - 1
        # The frame shift needs no work here: positions are derived from the counter, arrivals are kept.
        self._advance(n)
        if keep > 0:
            self.keys, self.values, self.arrival = all_k[..., -keep:, :], full_v[..., -keep:, :], arrival[-keep:]
        else:
            self.keys, self.values, self.arrival = all_k[..., :0, :], full_v[..., :0, :], arrival[:0]
        return full_k, full_v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The returned keys start `stored` positions before the query; the offset may be negative.
        stored = self.stored()
        return stored + query_length, self.position - stored

    def get_max_length(self) -> int:
        return self.sliding_window


# ----------------------------------------------------------------------------------------------- cache


def _stream_inputs_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: a call with a SinkCache takes positions and mask length from the cache (module docstring)."""
    # Models are called with keywords; positional arguments are mapped by name but left positional, because
    # transformers' forward decorators add keywords of their own.
    names = module._sinkscope_forward_params
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    cache = given.get("past_key_values")
    if not isinstance(cache, SinkCache):
        return None
    x = given.get("input_ids")
    if x is None:
        x = given.get("inputs_embeds")
    if x is None:
        return None
    if given.get("use_cache") is False:
        raise ConfigError("a SinkCache was passed with use_cache=False: generate() then feeds the whole sequence "
                          "again at every step (MPT's config defaults to use_cache=False); pass use_cache=True")
    batch, n = x.shape[0], x.shape[1]
    start = cache.get_seq_length()
    cache._first._check(batch, n)
    new: dict[str, torch.Tensor] = {}
    if "position_ids" in names:
        new["position_ids"] = torch.arange(start, start + n, device=x.device).unsqueeze(0).expand(batch, -1)
    mask = given.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if not bool(mask.bool().all()):
            raise ConfigError("SinkCache doesn't serve padded batches (an attention_mask with zeros): the padding "
                              "mask is indexed by cache positions, which stop being token indices after an "
                              "eviction; stream each sequence on its own, unpadded")
        # As long as the keys the cache returns (ALiBi bias of BLOOM and Falcon is built from this mask).
        new["attention_mask"] = mask.new_ones((batch, start + n))
    args = tuple(new.pop(name) if name in new else a for name, a in zip(names, args, strict=False))
    return args, {**kwargs, **new}


def _stack_owner(model: nn.Module) -> nn.Module | None:
    """The module that holds the decoder layers and is called with ``past_key_values`` (``GPTJModel``, ...)."""
    try:
        return stack_owner(model)[0]
    except SinkscopeError:
        return None


def _install_stream_hook(owner: nn.Module, needs_positions: bool) -> bool:
    """Install the pre-hook once per module; whether calls with a SinkCache get the cache's positions."""
    if getattr(owner, "_sinkscope_position_hook", None) is None:
        params = list(inspect.signature(owner.forward).parameters)
        if "past_key_values" not in params:
            return False
        owner._sinkscope_forward_params = params
        owner._sinkscope_position_hook = owner.register_forward_pre_hook(_stream_inputs_hook, with_kwargs=True)
    return not needs_positions or "position_ids" in owner._sinkscope_forward_params


class SinkCache(Cache):
    """StreamingLLM cache: ``sinks`` first tokens plus a window of ``window`` recent tokens per query.

    Args:
        model_or_config: the model (preferred: needed for ``generate``; its own rotation is checked and reused)
            or its config (manual token loops only; the scheme comes from the model built on the meta device).
        sinks: ``S >= 0`` tokens pinned at the start of the cache.
        window: ``W >= 1`` most recent tokens each query attends to, itself included.

    Every query sees ``S + W`` keys at most, at positions below ``S + W``; global layers store
    :attr:`capacity` ``= S + W - 1`` tokens between forwards, Gemma-3 local layers ``sliding_window - 1``,
    linear-attention layers their fixed-size state. See the module docstring for positions, the families
    served, prefill, the sink switch and Gemma-3.

    Raises:
        ConfigError: bad sizes, ``S + W`` past the model's positions, or an architecture the cache can't
            serve exactly (the model's :class:`~sinkscope.scheme.AttentionScheme` says why; e.g. learned
            absolute positions, MLA, chunked attention, KV sharing, frequency-switching RoPE).
    """

    def __init__(self, model_or_config: nn.Module | PreTrainedConfig, sinks: int, window: int):
        if not (_is_int(sinks) and _is_int(window) and sinks >= 0 and window >= 1):
            raise ConfigError(f"SinkCache needs sinks >= 0 and window >= 1 (integers); got sinks={sinks!r}, "
                              f"window={window!r}")
        if isinstance(model_or_config, PreTrainedConfig):
            model, config = None, model_or_config
        elif isinstance(getattr(model_or_config, "config", None), PreTrainedConfig):
            model, config = model_or_config, model_or_config.config
        else:
            raise ConfigError(f"SinkCache needs a transformers model or config, not {type(model_or_config).__name__}")
        text = config.get_text_config(decoder=True)
        try:
            described = model if model is not None else meta_model(config)
            scheme = attention_scheme(described)
        except SinkscopeError as exc:  # a model sinkscope can't read at all (no decoder stack)
            raise ConfigError(str(exc)) from exc
        arch = scheme.architecture
        scheme.require("cache", name=arch)
        max_pos = _max_positions(text)
        if max_pos is not None and sinks + window > max_pos:
            raise ConfigError(f"sinks + window = {sinks + window} is more than {arch}'s {max_pos} positions; "
                              f"use sinks + window <= {max_pos}")

        ropes = layer_ropes(described, text, scheme, arch, meta=model is None)
        capacity = sinks + window - 1
        layers: list[Any] = []
        for ly in scheme.layers:
            if ly.kind == FULL:
                layers.append(_SinkLayer(ropes.get(ly.index), sinks, window, max_pos))
            elif ly.kind == SLIDING and ly.window:
                layers.append(_LocalLayer(ropes.get(ly.index), int(ly.window), capacity, max_pos))
            elif ly.kind == LINEAR:
                layers.append(LinearAttentionLayer(number_of_states=_linear_states(text, ly.index)))
            else:  # the scheme refuses these; a guard against a scheme that let one through
                raise ConfigError(f"{arch}: SinkCache can't keep layer {ly.index} ({ly.kind} attention); it serves "
                                  "full, sliding-window and linear-attention layers")
        if not any(isinstance(layer, _StreamLayer) for layer in layers):
            raise ConfigError(f"{arch} has no softmax-attention layer for SinkCache to evict from")
        super().__init__(layers=layers)
        self.sinks = sinks
        self.window = window
        self.max_positions = max_pos
        self.scheme = scheme
        owner = _stack_owner(model) if model is not None else None
        self._positions_hooked = owner is not None and _install_stream_hook(owner, needs_positions=bool(ropes))
        self._model = model  # re-prefills the sinks when they are switched back on

    # ----------------------------------------------------------------------------------- state

    @property
    def _stream_layers(self) -> list[_StreamLayer]:
        return [layer for layer in self.layers if isinstance(layer, _StreamLayer)]

    @property
    def _first(self) -> _StreamLayer:
        """The first softmax-attention layer: positions, tokens seen and batch size are read from it."""
        return next(layer for layer in self.layers if isinstance(layer, _StreamLayer))

    @property
    def capacity(self) -> int:
        """Tokens a global layer stores between forwards when full: ``S + W - 1``."""
        return self.sinks + self.window - 1

    @property
    def seen_tokens(self) -> int:
        """Tokens fed to the cache so far (since construction or :meth:`reset`)."""
        return self._first.seen

    @property
    def cache_length(self) -> int:
        """Tokens stored now, the maximum over layers (see :meth:`stored_lengths`)."""
        return max(self.stored_lengths())

    def stored_lengths(self) -> list[int]:
        """Tokens stored now in each layer (0 for linear-attention layers, which keep a fixed-size state)."""
        return [layer.stored() if isinstance(layer, _StreamLayer) else 0 for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of the stored key and value tensors, all attention layers.

        The fixed-size conv and recurrent state of linear-attention layers isn't counted: it doesn't grow with
        the stream (see :mod:`sinkscope.streaming.memory`).
        """
        return sum(t.nbytes for layer in self._stream_layers for t in (layer.keys, layer.values) if t is not None)

    @property
    def max_forward_tokens(self) -> int | None:
        """The most tokens the next forward may carry (positions stay below ``max_position_embeddings``)."""
        return None if self.max_positions is None else self.max_positions - self.get_seq_length()

    @property
    def sinks_enabled(self) -> bool:
        """Whether the first ``S`` stored tokens are pinned (see :meth:`set_sinks`)."""
        return all(layer.sinks_enabled for layer in self.layers if isinstance(layer, _SinkLayer))

    def set_sinks(self, on: bool, sink_ids: Sequence[int] | torch.Tensor | None = None) -> None:
        """Switch between sinks + window and a plain window, between two forwards (see the module docstring).

        Off drops the ``S`` sinks now (budget ``W - 1``). On re-prefills the stream's first ``S`` tokens,
        given as ``sink_ids`` (``S`` ids, or ``[batch, S]``), exactly, and restores the budget ``S + W - 1``.
        Switching to the current state does nothing.

        Raises:
            ConfigError: fewer than ``S`` tokens seen yet, ``sink_ids`` missing or of the wrong length, or a
                cache built from a config (re-prefilling needs the model).
        """
        on = bool(on)
        if on == self.sinks_enabled or self.sinks == 0:
            return
        if self.seen_tokens < self.sinks:
            raise ConfigError(f"the stream has {self.seen_tokens} tokens, fewer than its {self.sinks} sinks: "
                              "nothing to switch yet")
        if not on:
            self._shift_frame(-self.sinks, self.window - 1, sinks=None)
            return
        if self._model is None:
            raise ConfigError("switching sinks back on re-prefills them, which needs the model: build the "
                              "SinkCache from the model, not its config")
        if sink_ids is None:
            raise ConfigError(f"switching sinks back on needs the stream's first {self.sinks} token ids (sink_ids)")
        ids = torch.as_tensor(sink_ids, dtype=torch.long, device=self._model.device)
        ids = ids.view(1, -1) if ids.dim() == 1 else ids
        if ids.shape[-1] != self.sinks:
            raise ConfigError(f"sink_ids has {ids.shape[-1]} ids; this cache keeps {self.sinks} sinks")
        if ids.shape[0] == 1 and self.batch_size > 1:
            ids = ids.expand(self.batch_size, -1)
        fresh = DynamicCache(config=self._model.config)
        with torch.no_grad():  # a plain cache: the position pre-hook leaves this forward alone
            self._model(input_ids=ids, past_key_values=fresh, use_cache=True)
        self._shift_frame(self.sinks, self.capacity, sinks=fresh)

    def _shift_frame(self, shift: int, capacity: int, sinks: DynamicCache | None) -> None:
        """Drop (``sinks`` None) or put back (``sinks`` holds their keys/values) the sinks; move the frame."""
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, _StreamLayer):
                continue  # linear-attention state summarises the whole stream: nothing to drop or move
            if isinstance(layer, _SinkLayer):
                if sinks is None:
                    layer.keys, layer.values = layer.keys[..., self.sinks:, :], layer.values[..., self.sinks:, :]
                    layer.arrival = layer.arrival[self.sinks:]
                else:
                    src = sinks.layers[i]
                    layer.keys = torch.cat([src.keys.to(layer.keys.dtype), layer.keys], dim=-2)
                    layer.values = torch.cat([src.values.to(layer.values.dtype), layer.values], dim=-2)
                    layer.arrival = torch.cat([torch.arange(self.sinks, device=layer.arrival.device),
                                               layer.arrival])
                layer.sinks_enabled = sinks is not None
            # Local layers store no sinks but share the position frame, so they move with it.
            layer.position += shift
            layer.capacity = capacity
            layer._moved = True

    @property
    def batch_size(self) -> int:
        """Batch size of the stream, ``-1`` before the first forward (as transformers' caches report)."""
        size = self._first.batch_size
        return -1 if size is None else size

    def reset(self) -> None:
        """Forget the stream (the sink switch keeps its setting)."""
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise ConfigError(_NO_CROP)

    # transformers' generate() marks a cache it was given as user-defined: the one place to catch its use.
    @property
    def _is_user_defined(self) -> bool:
        return self.__dict__.get("_user_defined", False)

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        if value and not self._positions_hooked:
            raise ConfigError("generate() passes absolute position_ids; build the SinkCache from the model (not "
                              "its config) so that it can give the model the cache's positions")
        if value and self.seen_tokens != self.get_seq_length():
            raise ConfigError("generate() can't resume a SinkCache that has evicted tokens (it slices the prompt "
                              "by get_seq_length(), a cache position); continue with a token loop or a new cache")
        self.__dict__["_user_defined"] = value

    def __repr__(self) -> str:
        return (f"SinkCache(sinks={self.sinks}, window={self.window}, sinks_enabled={self.sinks_enabled}, "
                f"seen_tokens={self.seen_tokens}, cache_length={self.cache_length})")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _max_positions(config: PreTrainedConfig) -> int | None:
    """The trained positions (MPT: its ALiBi table); None for models without a limit (BLOOM)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def _linear_states(config: PreTrainedConfig, index: int) -> int:
    """Conv/recurrent states per linear-attention layer, as transformers' own cache allocates them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    try:
        return int(get_layer_types_and_kwargs(config)[1][index].get("number_of_states", 1))
    except Exception:  # a config without the per-layer fields: transformers' default
        return 1
