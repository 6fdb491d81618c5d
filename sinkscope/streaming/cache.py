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

The re-rotation convention (``rotate_half``, optionally on the first part of the head only) is not
assumed: at construction the cache checks it against the model's own rotary module and
``apply_rotary_pos_emb``. Attention scaling factors (YaRN, ...) multiply the rotated key once and rotations
keep them, so static RoPE types (default, linear, llama3, yarn, proportional; dynamic NTK, which is static
below ``max_position_embeddings``, where the cache keeps every position) are exact. ``longrope`` switches its
frequencies with the sequence length and is refused, like architectures without RoPE (GPT-2's learned
absolute positions can't be re-assigned), layers without RoPE, MLA keys and attention types other than
full and sliding-window.

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
  keeps (``S`` integers), and the model, so the cache must have been built from the model.

Why a ``transformers.Cache`` with custom layers
----------------------------------------------
``generate`` only accepts ``Cache`` instances, and transformers' mask builders ask the cache per layer
(``get_mask_sizes``, ``get_query_offset``, ``is_sliding``); a layer object per model layer lets global and
local layers follow different storage rules under one position frame, and the base class supplies beam
reordering, batch selection and offloading.

Transformers quirks handled here
--------------------------------
* ``generate`` passes ``position_ids`` counted from the attention mask: absolute stream positions, which
  would bypass the cache's positions and break after the first eviction. Built from a model, the cache
  installs (once per model) a forward pre-hook on the module that owns the rotary embedding; whenever a
  ``SinkCache`` is the ``past_key_values`` of a call it replaces ``position_ids`` with the cache's positions
  (any ``position_ids`` passed alongside a ``SinkCache`` are replaced; the cache owns positions). Built from
  a config it can't, so ``generate`` refuses it (detected when ``generate`` marks the cache user-defined).
* ``generate`` slices a resumed prompt by ``get_seq_length()``, which counts cache positions, not tokens
  seen; after an eviction that slice is wrong, so ``generate`` refuses a cache that has evicted.
* Padded batches are not supported: transformers indexes the 2-D padding mask with cache positions.
* ``crop`` (assisted decoding) is refused: evicted tokens can't be restored.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, get_layer_types_and_kwargs

from ..errors import ConfigError

# RoPE types whose frequencies don't depend on the sequence length below max_position_embeddings.
_STATIC_ROPE = frozenset({"default", "linear", "dynamic", "yarn", "llama3", "proportional"})
_FULL, _SLIDING = "full_attention", "sliding_attention"

__all__ = ["SinkCache"]


# ------------------------------------------------------------------------------------------------ RoPE


@dataclass
class _Rope:
    """A model's rotary embedding module, the function that applies it, and the module that calls it."""

    module: nn.Module
    apply: Callable[..., Any]
    owner: nn.Module | None  # computes position_ids and calls `module` (hook target); None from a config

    @property
    def takes_layer_type(self) -> bool:
        return "layer_type" in inspect.signature(self.module.forward).parameters

    def rope_type(self, layer_type: str) -> str:
        rt = getattr(self.module, "rope_type", "default")
        return str(rt.get(layer_type, "default") if isinstance(rt, dict) else rt)

    def inv_freq(self, layer_type: str) -> torch.Tensor:
        # The original frequencies: dynamic NTK only departs from them past max_position_embeddings.
        for name in (f"{layer_type}_original_inv_freq", f"{layer_type}_inv_freq", "original_inv_freq", "inv_freq"):
            t = getattr(self.module, name, None)
            if isinstance(t, torch.Tensor):
                return t.detach().to("cpu", torch.float32).clone()
        raise ConfigError(f"{type(self.module).__name__} has no inverse frequencies (inv_freq) for {layer_type} "
                          "layers; SinkCache can't re-rotate their keys")

    def cos_sin(self, positions: torch.Tensor, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        buf = next(iter(self.module.buffers()), None)
        device = buf.device if buf is not None else torch.device("cpu")
        x = torch.zeros(1, 1, positions.shape[-1], 1, dtype=torch.float32, device=device)
        pos = positions.to(device)
        return self.module(x, pos, layer_type) if self.takes_layer_type else self.module(x, pos)


def _rope_from_model(model: nn.Module, arch: str) -> _Rope | None:
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if type(mod).__name__.endswith("RotaryEmbedding"):
            owner = modules[name.rpartition(".")[0]] if "." in name else model
            apply = getattr(sys.modules[type(mod).__module__], "apply_rotary_pos_emb", None)
            if apply is None:
                raise ConfigError(f"{arch}: can't find apply_rotary_pos_emb next to {type(mod).__name__}; "
                                  "SinkCache can't check how this model rotates keys")
            return _Rope(mod, apply, owner)
    return None


def _rope_from_config(config: PreTrainedConfig, arch: str) -> _Rope | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as exc:
        raise ConfigError(f"{arch}: transformers has no causal LM for this config; pass the model instead") from exc
    module = sys.modules[cls.__module__]
    prefix = cls.__name__.split("For")[0]
    found = [obj for name, obj in vars(module).items()
             if name.endswith("RotaryEmbedding") and isinstance(obj, type) and issubclass(obj, nn.Module)]
    if not found:
        return None
    rot_cls = next((c for c in found if c.__name__ == f"{prefix}RotaryEmbedding"), found[0])
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if apply is None:
        raise ConfigError(f"{arch}: can't find apply_rotary_pos_emb in {module.__name__}; "
                          "SinkCache can't check how this model rotates keys")
    try:
        rot = rot_cls(config)
    except Exception as exc:  # any failure means we can't reproduce the model's RoPE from this config
        raise ConfigError(f"{arch}: can't build {rot_cls.__name__} from the config ({exc}); pass the model") from exc
    return _Rope(rot, apply, None)


def _rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE-rotated ``keys`` ``[B, H, L, D]`` by ``delta[L]`` more positions (``rotate_half`` layout).

    Computed in float32 and cast back once. With ``2 * len(inv_freq) < D`` only the first dimensions rotate
    (partial rotary), as in transformers' models.
    """
    r = 2 * inv_freq.numel()
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(keys.device)[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    k = keys[..., :r].to(torch.float32)
    half = r // 2
    rotated = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
    if r < keys.shape[-1]:
        rotated = torch.cat((rotated, keys[..., r:].to(torch.float32)), dim=-1)
    return rotated.to(keys.dtype)


def _probe(rope: _Rope, layer_type: str, inv_freq: torch.Tensor, head_dim: int, arch: str) -> None:
    """Check that re-rotating the model's own rotated keys with ``inv_freq`` lands where the model would put them."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, head_dim, generator=gen)
    p1 = torch.tensor([[5, 2, 9, 0]])
    delta = torch.tensor([3, -7, 11, -30])
    try:
        c1, s1 = rope.cos_sin(p1, layer_type)
        c2, s2 = rope.cos_sin(p1 + delta, layer_type)
        dev = c1.device
        _, k1 = rope.apply(q.to(dev), q.to(dev), c1, s1)
        _, k2 = rope.apply(q.to(dev), q.to(dev), c2, s2)
    except Exception as exc:  # a rotary layout we can't drive is a layout we can't re-rotate
        raise ConfigError(f"{arch}: can't run the model's rotary embedding to check it ({exc}); "
                          "SinkCache supports transformers' rotate_half RoPE") from exc
    ours = _rerotate(k1.float().cpu(), delta, inv_freq)
    err = (ours - k2.float().cpu()).abs().max().item()
    if not err <= 1e-3 * max(1.0, k2.abs().max().item()):
        raise ConfigError(f"{arch}: re-rotating keys doesn't reproduce this model's RoPE for {layer_type} layers "
                          f"(max error {err:.2g}); its rotary layout isn't one SinkCache can shift")


def _describe(model: nn.Module | None, config: PreTrainedConfig) -> str:
    arch = (getattr(config, "architectures", None) or [type(model).__name__ if model is not None else ""])[0]
    return arch or str(getattr(config, "model_type", "this model"))


def _no_rope_error(model: nn.Module | None, config: PreTrainedConfig, arch: str) -> ConfigError:
    learned = (model is not None and any(n.endswith("wpe") for n, _ in model.named_modules())) or (
        getattr(config, "n_positions", None) is not None)
    why = " (it learns absolute position embeddings)" if learned else ""
    return ConfigError(
        f"{arch} has no rotary position embeddings{why}; SinkCache re-assigns positions inside the cache by "
        "re-rotating keys, which only RoPE allows: with other position schemes evicting tokens would give "
        "silently wrong attention"
    )


# ---------------------------------------------------------------------------------------------- layers


class _StreamLayer(CacheLayerMixin):
    """What global and local layers share: arrival-frame storage, the position counter, the batch check."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, inv_freq: torch.Tensor, capacity: int, max_positions: int | None):
        super().__init__()
        self.inv_freq = inv_freq
        self.capacity = capacity  # global frame: tokens stored between forwards, S + W - 1
        self.max_positions = max_positions
        self.arrival: torch.Tensor | None = None  # position each stored key was rotated at
        self.position = 0  # position of the next token = what get_seq_length reports
        self.seen = 0
        self.batch_size: int | None = None
        self._moved = False  # some stored key is no longer at its arrival position

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
        if not self._moved or self.stored() == 0:
            return self.keys
        delta = self.current_positions().to(self.arrival.device) - self.arrival
        return _rerotate(self.keys, delta, self.inv_freq)

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
        raise ConfigError("a SinkCache can't be cropped: evicted tokens are gone (assisted or speculative "
                          "decoding isn't supported)")

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


class _SinkLayer(_StreamLayer):
    """A global attention layer: sinks plus a window, stored at positions ``0 .. stored-1``."""

    def __init__(self, inv_freq: torch.Tensor, sinks: int, window: int, max_positions: int | None):
        super().__init__(inv_freq, sinks + window - 1, max_positions)
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

    def __init__(self, inv_freq: torch.Tensor, sliding_window: int, capacity: int, max_positions: int | None):
        super().__init__(inv_freq, capacity, max_positions)
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


def _set_positions_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: a call with a SinkCache takes its positions from the cache (see the module docstring)."""
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
    batch, n = x.shape[0], x.shape[1]
    start = cache.get_seq_length()
    cache.layers[0]._check(batch, n)
    pos = torch.arange(start, start + n, device=x.device).unsqueeze(0).expand(batch, -1)
    if "position_ids" in names[: len(args)]:
        args = tuple(pos if name == "position_ids" else a for name, a in zip(names, args, strict=False))
    else:
        kwargs = {**kwargs, "position_ids": pos}
    return args, kwargs


def _install_position_hook(owner: nn.Module) -> bool:
    if getattr(owner, "_sinkscope_position_hook", None) is not None:
        return True
    sig = inspect.signature(owner.forward)
    if not {"position_ids", "past_key_values"} <= set(sig.parameters):
        return False
    owner._sinkscope_forward_params = list(sig.parameters)
    owner._sinkscope_position_hook = owner.register_forward_pre_hook(_set_positions_hook, with_kwargs=True)
    return True


class SinkCache(Cache):
    """StreamingLLM cache: ``sinks`` first tokens plus a window of ``window`` recent tokens per query.

    Args:
        model_or_config: the model (preferred: needed for ``generate``; its rotary module is checked and
            reused) or its config (manual token loops only).
        sinks: ``S >= 0`` tokens pinned at the start of the cache.
        window: ``W >= 1`` most recent tokens each query attends to, itself included.

    Every query sees ``S + W`` keys at most, at positions below ``S + W``; global layers store
    :attr:`capacity` ``= S + W - 1`` tokens between forwards, Gemma-3 local layers ``sliding_window - 1``.
    See the module docstring for positions, prefill, the sink switch and Gemma-3.

    Raises:
        ConfigError: bad sizes, ``S + W`` past the model's positions, or an architecture the cache can't
            serve exactly (no RoPE, frequency-switching RoPE, attention types other than full/sliding).
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
        arch = _describe(model, config)
        max_pos = getattr(text, "max_position_embeddings", None)
        if max_pos is not None and sinks + window > max_pos:
            raise ConfigError(f"sinks + window = {sinks + window} is more than {arch}'s {max_pos} positions; "
                              f"use sinks + window <= {max_pos}")

        layer_types, layer_kwargs = _layer_plan(text, arch)
        rope = _rope_from_model(model, arch) if model is not None else _rope_from_config(text, arch)
        if rope is None:
            raise _no_rope_error(model, text, arch)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        inv_freqs: dict[str, torch.Tensor] = {}
        for lt in sorted(set(layer_types)):
            rt = rope.rope_type(lt)
            if rt not in _STATIC_ROPE:
                raise ConfigError(f"{arch} uses {rt!r} RoPE for {lt} layers, whose frequencies change with the "
                                  f"sequence length; SinkCache supports {', '.join(sorted(_STATIC_ROPE))}")
            inv_freqs[lt] = rope.inv_freq(lt)
            _probe(rope, lt, inv_freqs[lt], head_dim, arch)

        capacity = sinks + window - 1
        layers: list[_StreamLayer] = []
        for lt, kw in zip(layer_types, layer_kwargs, strict=True):
            if lt == _FULL:
                layers.append(_SinkLayer(inv_freqs[lt], sinks, window, max_pos))
            else:
                layers.append(_LocalLayer(inv_freqs[lt], int(kw["sliding_window"]), capacity, max_pos))
        super().__init__(layers=layers)
        self.sinks = sinks
        self.window = window
        self.max_positions = max_pos
        self._positions_hooked = rope.owner is not None and _install_position_hook(rope.owner)
        self._model = model  # re-prefills the sinks when they are switched back on

    # ----------------------------------------------------------------------------------- state

    @property
    def capacity(self) -> int:
        """Tokens a global layer stores between forwards when full: ``S + W - 1``."""
        return self.sinks + self.window - 1

    @property
    def seen_tokens(self) -> int:
        """Tokens fed to the cache so far (since construction or :meth:`reset`)."""
        return self.layers[0].seen

    @property
    def cache_length(self) -> int:
        """Tokens stored now, the maximum over layers (see :meth:`stored_lengths`)."""
        return max(self.stored_lengths())

    def stored_lengths(self) -> list[int]:
        """Tokens stored now in each layer."""
        return [layer.stored() for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of the stored key and value tensors, all layers."""
        return sum(t.nbytes for layer in self.layers for t in (layer.keys, layer.values) if t is not None)

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
        size = self.layers[0].batch_size
        return -1 if size is None else size

    def reset(self) -> None:
        """Forget the stream (the sink switch keeps its setting)."""
        super().reset()

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


def _layer_plan(text: PreTrainedConfig, arch: str) -> tuple[list[str], list[dict]]:
    """Layer types as DynamicCache would see them; refuse what SinkCache can't serve."""
    if getattr(text, "qk_rope_head_dim", None):
        raise ConfigError(f"{arch} uses multi-head latent attention (keys partly without RoPE); SinkCache "
                          "can't re-rotate its keys")
    no_rope = getattr(text, "no_rope_layers", None)
    if getattr(text, "no_rope_layer_interval", None) or (isinstance(no_rope, list | tuple) and not all(no_rope)):
        raise ConfigError(f"{arch} has layers without RoPE; SinkCache re-rotates every layer's keys")
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    except Exception as exc:  # config without the per-layer fields DynamicCache relies on
        raise ConfigError(f"{arch}: can't read the attention type of each layer ({exc})") from exc
    odd = sorted(set(layer_types) - {_FULL, _SLIDING})
    if odd:
        raise ConfigError(f"{arch} has {', '.join(odd)} layers; SinkCache serves full and sliding-window "
                          "attention only")
    return list(layer_types), list(layer_kwargs)
