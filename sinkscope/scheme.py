"""What a model family needs, decided once per model: :class:`AttentionScheme`.

Capture, statistics mode, :class:`~sinkscope.streaming.SinkCache`, the memory profile, ``sinkscope models
--check`` and ``docs/models.md`` all read this one description instead of each probing the model their own
way. A new family is one entry in the tables below (or nothing at all, when it follows transformers' common
conventions), not edits in four modules.

The facts are read off the loaded model where they live, per layer: the attention modules (head dims,
learned sink logits, whether their ``forward`` goes through transformers' attention interface), the rotary
module (which dimensions rotate), and the config (layer types, sliding windows, soft-capping, layers without
RoPE, KV sharing). From them :meth:`AttentionScheme.support` says, for each sinkscope mode, whether it serves
the model exactly and, when it doesn't, why and what works instead.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import CaptureError, ConfigError

ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")

# Layer kinds: what one decoder layer does with its past.
FULL, SLIDING, CHUNKED, LINEAR, OTHER = "full", "sliding", "chunked", "linear", "other"
ATTENTION_KINDS = (FULL, SLIDING, CHUNKED)  # layers with softmax attention to capture
_KIND_OF_TYPE = {"full_attention": FULL, "sliding_attention": SLIDING, "chunked_attention": CHUNKED,
                 "linear_attention": LINEAR}
TYPE_OF_KIND = {kind: layer_type for layer_type, kind in _KIND_OF_TYPE.items()}  # transformers' layer_types names

# Positions: how a layer's attention knows where a key is.
ROPE, ALIBI, ABSOLUTE, NONE = "rope", "alibi", "absolute", "none"

# ---- the family tables: only what can't be read off the model ---------------------------------------------
# Rotary embeddings that rotate adjacent pairs (2i, 2i+1) rather than transformers' usual halves.
INTERLEAVED_ROPE = frozenset({"gptj", "cohere", "cohere2", "codegen"})
# ALiBi: a per-head linear bias on the query-key distance instead of positions in the keys.
ALIBI_FAMILIES = frozenset({"bloom", "mpt"})
# transformers ignores set_attn_implementation("eager") on these after loading (it only warns): they must be
# loaded with attn_implementation="eager" for whole maps (sinkscope.load_model does that).
EAGER_AT_LOAD = frozenset({"falcon"})
# Query-dependent attention scaling by absolute position (Llama-4's temperature tuning): positions in a
# cache can't be re-assigned without changing the scores.
POSITION_SCALED = frozenset({"llama4_text", "llama4"})
# RoPE types whose frequencies don't depend on the sequence length below max_position_embeddings, so a key
# rotated at one position can be re-rotated to another exactly (dynamic NTK only departs past that length).
STATIC_ROPE = frozenset({"default", "linear", "dynamic", "yarn", "llama3", "proportional"})

MODES = ("maps", "stats", "cache", "onepass")
MODE_NAMES = {"maps": "whole maps (capture, analyze mode='maps')",
              "stats": "statistics mode (capture_stats, analyze mode='stats')",
              "cache": "SinkCache (stream, eval-stream --exact-stream, dashboard stream)",
              "onepass": "one-pass streaming evaluation (eval-stream, report's validation)"}


@dataclass(frozen=True)
class LayerScheme:
    """One decoder layer as sinkscope sees it."""

    index: int
    kind: str  # full, sliding, chunked, linear, other
    window: int | None  # sliding window or chunk size
    positions: str  # rope, alibi, absolute, none
    rotary_dim: int | None  # dimensions of each key head that rotate (rope)
    qk_head_dim: int | None  # None for layers without softmax attention
    # rotary_dim counts the leading dimensions the rotation acts on (rotate_half or pairwise); proportional RoPE
    # (Gemma-4) rotates all of them with zero frequencies on the part that doesn't rotate.
    v_head_dim: int | None
    n_heads: int | None
    n_kv_heads: int | None
    shared_kv: bool = False  # reads the keys and values that an earlier layer of its kind stored
    # Multi-head latent attention (DeepSeek): the cache holds this many numbers per token (the compressed
    # latent plus the rotary key part, shared by all heads) instead of per-head keys and values.
    kv_latent_dim: int | None = None

    @property
    def attends(self) -> bool:
        """Whether the layer has softmax attention that capture can measure."""
        return self.kind in ATTENTION_KINDS


@dataclass(frozen=True)
class Support:
    """Whether a mode serves a model exactly; if not, why and what works instead."""

    ok: bool
    why: str | None = None
    instead: str | None = None

    def message(self, family: str, mode: str) -> str:
        """The one-line refusal: family, mode, why, and the alternative."""
        text = f"{family}: {MODE_NAMES[mode]} can't serve this model: {self.why}"
        return f"{text}; {self.instead}" if self.instead else text


@dataclass(frozen=True)
class AttentionScheme:
    """How a loaded model attends, per layer, and which sinkscope modes serve it (:func:`attention_scheme`)."""

    family: str  # config.model_type of the text model
    architecture: str
    layers: tuple[LayerScheme, ...]
    rope_layout: str | None  # "half" (rotate_half) or "interleaved" (adjacent pairs); None without RoPE
    learned_sinks: bool  # per-head sink logits in every softmax (gpt-oss: s_aux)
    softcap: float | None  # attention logit soft-capping (Gemma-2)
    interface: bool  # every attention layer calls transformers' attention interface
    eager_switch: bool  # set_attn_implementation("eager") takes effect after loading
    kv_shared: bool  # some layers read keys and values that another layer stored
    position_scaled: bool  # attention scaled by absolute position (refused by SinkCache)
    rope_types: tuple[tuple[str, str], ...]  # (layer type, rope_type) pairs (static RoPE can be re-rotated)

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the layers with softmax attention (hybrid models also have linear or recurrent ones)."""
        return [ly.index for ly in self.layers if ly.attends]

    @property
    def positions(self) -> str:
        """The positional scheme of the attention layers: one of rope/alibi/absolute/none, or ``mixed``."""
        kinds = {ly.positions for ly in self.layers if ly.attends}
        if kinds <= {ROPE, NONE} and ROPE in kinds:
            return ROPE if kinds == {ROPE} else "rope+nope"
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def select_layers(self, layers: Any = None, error: type[Exception] = CaptureError) -> list[int]:
        """Layer indices to measure, sorted (negative ones count from the end; default: every attention
        layer). Raises ``error`` for an index out of range or a layer without softmax attention."""
        attending, n = self.attention_layers, len(self.layers)
        if layers is None:
            return list(attending)
        out = set()
        for i in layers:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise error(f"layer {i} out of range: the model has {n} layers")
            if j not in attending:
                raise error(f"layer {j} has no softmax attention to capture (a linear-attention or recurrent "
                            f"layer); layers with attention: {attending}")
            out.add(j)
        if not out:
            raise error("layers must not be empty")
        return sorted(out)

    def rope_type(self, kind: str) -> str | None:
        """The rope_type of the layers of ``kind`` (full, sliding, ...), None when they don't use RoPE."""
        return dict(self.rope_types).get(TYPE_OF_KIND.get(kind, kind))

    # -- what works ------------------------------------------------------------------------------------------
    def support(self) -> dict[str, Support]:
        """For each mode (``maps``, ``stats``, ``cache``): whether sinkscope serves this model exactly."""
        return {mode: self._support(mode) for mode in MODES}

    def _support(self, mode: str) -> Support:
        if not self.attention_layers:
            return Support(False, "no layer has softmax attention")
        if mode == "maps":
            if not self.eager_switch:
                return Support(False, "transformers ignores a switch to eager attention after loading",
                               "load it with attn_implementation='eager' (sinkscope.load_model does)")
            return Support(True)
        if mode == "stats":
            if not self.interface:
                return Support(False, "its attention code bypasses transformers' attention interface, so "
                                      "sinkscope's attention function never sees its scores",
                               "use whole maps (mode='maps'), which analyze(mode='auto') falls back to")
            return Support(True)
        if mode == "onepass":
            return self._onepass_support()
        return self._cache_support()

    def _onepass_support(self) -> Support:
        """One pass is SinkCache's attention computed for every query at once, through the attention interface."""
        cache = self._cache_support()
        if not cache.ok:
            return cache
        token_by_token = ("eval-stream streams it token by token through SinkCache instead (--exact-stream): "
                          "the same numbers, slower")
        if not self.interface:
            return Support(False, "its attention code bypasses transformers' attention interface, so the band and "
                                  "sink attention can't be put in its place", token_by_token)
        if any(ly.positions not in (ROPE, NONE) for ly in self.layers if ly.attends):
            return Support(False, "one pass moves RoPE queries to their in-cache position; this model's "
                                  "positions are of another kind", token_by_token)
        return Support(True)

    def _cache_support(self) -> Support:
        window = "use analyze/report for its attention; stream it with a DynamicCache or a plain window"
        attn = [ly for ly in self.layers if ly.attends]
        if self.kv_shared:
            return Support(False, "some layers reuse another layer's keys and values (KV sharing); evicting "
                                  "them would need both layers' caches kept in step", window)
        if self.position_scaled:
            return Support(False, "its attention scales queries by their absolute position (temperature "
                                  "tuning), which positions re-assigned inside the cache would change", window)
        odd = sorted({ly.kind for ly in attn} - {FULL, SLIDING})
        if odd:
            return Support(False, f"it has {', '.join(odd)} attention layers; SinkCache serves full and "
                                  "sliding-window attention (and keeps linear-attention state as it is)", window)
        other = sorted({ly.kind for ly in self.layers if not ly.attends and ly.kind != LINEAR})
        if other:
            return Support(False, f"it has {', '.join(other)} layers whose state SinkCache can't keep", window)
        pos = {ly.positions for ly in attn}
        if ABSOLUTE in pos:
            return Support(False, "it learns absolute position embeddings instead of rotary ones (RoPE), which "
                                  "can't be re-assigned inside the cache: evicting tokens would give silently "
                                  "wrong attention", window)
        if ROPE in pos and any(ly.rotary_dim is not None and ly.qk_head_dim is not None
                               and ly.rotary_dim > ly.qk_head_dim for ly in attn):
            return Support(False, "its rotary dimensions don't fit its key heads", window)
        if any(ly.kv_latent_dim for ly in attn):
            return Support(False, "multi-head latent attention: part of each key carries no rotation and is "
                                  "shared across heads, so its keys can't be re-rotated", window)
        moving = sorted({rt for ly in attn if ly.positions == ROPE
                         for rt in [self.rope_type(ly.kind) or "default"] if rt not in STATIC_ROPE})
        if moving:
            return Support(False, f"its {', '.join(moving)} RoPE changes its frequencies with the sequence length, "
                                  "so keys can't be re-rotated to positions inside the cache exactly (SinkCache "
                                  f"serves {', '.join(sorted(STATIC_ROPE))} RoPE)", window)
        return Support(True)

    def require(self, mode: str, name: str | None = None) -> None:
        """Raise a :class:`~sinkscope.errors.SinkscopeError` (one line) when ``mode`` can't serve the model.

        ``name`` heads the message instead of the family (SinkCache names the architecture, as its other errors do).
        """
        s = self._support(mode)
        if not s.ok:
            raise (ConfigError if mode in ("cache", "onepass") else CaptureError)(s.message(name or self.family, mode))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the positions summary and each mode's support (``sinkscope models --check --json``)."""
        d = asdict(self)
        d["layers"] = [asdict(ly) for ly in self.layers]
        d["positions"] = self.positions
        d["support"] = {m: asdict(s) for m, s in self.support().items()}
        return d


# ------------------------------------------------------------------------------------------------ derivation

_cache: weakref.WeakKeyDictionary[nn.Module, AttentionScheme] = weakref.WeakKeyDictionary()


def attention_scheme(model: nn.Module) -> AttentionScheme:
    """The :class:`AttentionScheme` of a transformers causal LM, derived once per model object.

    Raises :class:`~sinkscope.errors.CaptureError` for a model that isn't a decoder stack sinkscope can read.
    """
    found = _cache.get(model)
    if found is None:
        found = _cache[model] = _derive(model)
    return found


def forget(model: nn.Module) -> None:
    """Drop the cached scheme of ``model`` (after changing its layers or config in place)."""
    _cache.pop(model, None)


def scheme_from_config(config: Any) -> AttentionScheme:
    """The :class:`AttentionScheme` of the causal LM that ``config`` describes, without weights.

    The model is instantiated on the meta device (:func:`meta_model`: no memory, no initialisation), so the
    scheme is read off the same modules as for a loaded model.
    """
    return _derive(meta_model(config))


def meta_model(config: Any) -> nn.Module:
    """The causal LM of ``config`` on the meta device: its modules and shapes, no weights.

    Raises :class:`~sinkscope.errors.ConfigError` for a config transformers has no causal LM for.
    """
    import copy
    import warnings

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except Exception as exc:  # an unknown config type, or one transformers can't build a causal LM from
        name = getattr(config, "model_type", None) or type(config).__name__
        raise ConfigError(f"{name}: can't build a causal LM from this config ({exc}); pass the model") from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def text_config(model: nn.Module) -> Any:
    """The decoder's config (multimodal wrappers keep it in ``text_config``)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise CaptureError(f"{type(model).__name__} has no config; is it a transformers model?")
    getter = getattr(cfg, "get_text_config", None)
    return getter(decoder=True) if getter is not None else (getattr(cfg, "text_config", None) or cfg)


def n_layers(model: nn.Module) -> int:
    """Decoder layers in the model's config."""
    cfg = text_config(model)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or getattr(cfg, "n_layers", None)
    if not n:
        raise CaptureError(f"{type(model).__name__} has no config with a layer count; is it a transformers model?")
    return int(n)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's stack of decoder layers (the ``ModuleList`` with one entry per layer)."""
    n = n_layers(model)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and any(_attention_child(layer) for layer in m):
            return list(m)
    raise CaptureError(
        f"can't find the decoder layers of {type(model).__name__}: sinkscope needs a transformer with {n} "
        f"decoder layers whose attention is a child named one of {', '.join(ATTN_NAMES)} (Llama, Gemma, GPT-2, ...)"
    )


def stack_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds the decoder layers and the attribute they sit in (``(LlamaModel, "layers")``,
    ``(GPTJModel, "h")``): the module called with ``past_key_values``."""
    first = decoder_layers(model)[0]
    for mod in model.modules():
        for name, child in mod.named_children():
            if isinstance(child, nn.ModuleList) and len(child) and child[0] is first:
                return mod, name
    raise CaptureError(f"can't find the module that holds the decoder layers of {type(model).__name__}")


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> self-attention module, for the layers that have softmax attention."""
    scheme = attention_scheme(model)
    layers = decoder_layers(model)
    return {i: _attention_child(layers[i]) for i in scheme.attention_layers}  # type: ignore[misc]


# The attention module's output projection, by the names transformers' families give it (Llama o_proj, OPT/MPT/
# GPT-J out_proj, Falcon/Bloom/GPT-NeoX/Phi dense, GPT-2 c_proj).
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj")


def output_projection(attn: nn.Module, width: int) -> tuple[nn.Module, torch.Tensor] | str:
    """The attention module's output projection and its weight as ``[hidden, width]`` (``width`` = heads x value
    head dim, its input), or why there is none that sinkscope can read per head."""
    for name in OUTPUT_PROJECTIONS:
        proj = getattr(attn, name, None)
        weight = getattr(proj, "weight", None)
        if not isinstance(proj, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if isinstance(proj, nn.Linear) and weight.shape[1] == width:
            return proj, weight
        if type(proj).__name__ == "Conv1D" and weight.shape[0] == width:  # GPT-2's [in, out] layout
            return proj, weight.t()
        return f"its output projection {name} is {tuple(weight.shape)}, not [hidden, {width}] (heads x value dim)"
    return (f"{type(attn).__name__} has no output projection named {', '.join(OUTPUT_PROJECTIONS)} that takes "
            "the heads side by side")


@dataclass(frozen=True)
class HeadProjection:
    """An attention layer's output projection read per head: ``weight`` ``[hidden, n_heads x head_dim]``, the
    heads side by side in its input."""

    module: nn.Module
    weight: torch.Tensor
    n_heads: int
    head_dim: int


def head_projections(model: nn.Module) -> dict[int, HeadProjection] | str:
    """Layer index -> its :class:`HeadProjection`, for every layer with softmax attention; or why the model's
    attention can't be read per head (what head-output capture and head ablation both need)."""
    scheme = attention_scheme(model)
    out: dict[int, HeadProjection] = {}
    for i, attn in attention_modules(model).items():
        ly = scheme.layers[i]
        if not ly.n_heads or not ly.v_head_dim:
            return f"layer {i}'s head count or value head dim is unknown"
        got = output_projection(attn, ly.n_heads * ly.v_head_dim)
        if isinstance(got, str):
            return got
        out[i] = HeadProjection(got[0], got[1], ly.n_heads, ly.v_head_dim)
    return out


def _attention_child(layer: nn.Module) -> nn.Module | None:
    for name in ATTN_NAMES:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _layer_cfg(cfg: Any, i: int) -> Any:
    per = getattr(cfg, "per_layer_config", None)
    try:
        return per[i] if per is not None else cfg
    except (IndexError, KeyError, TypeError):
        return cfg


def _get(obj: Any, *names: str) -> Any:
    for n in names:
        try:
            v = getattr(obj, n, None)
        except Exception:  # transformers' per-layer attribute guard on heterogeneous configs
            v = None
        if v is not None:
            return v
    return None


def _forward_source(module: nn.Module) -> str:
    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return ""


def _derive(model: nn.Module) -> AttentionScheme:
    cfg = text_config(model)
    family = str(getattr(cfg, "model_type", None) or type(model).__name__)
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    layers = decoder_layers(model)
    n = len(layers)
    types, kwargs = _layer_types(cfg, n)
    rotary = _rotary_dims(model)
    alibi = family in ALIBI_FAMILIES or bool(getattr(cfg, "alibi", False))
    absolute = _has_absolute_positions(model)
    no_rope = _get(cfg, "no_rope_layers")
    declared = list(_get(cfg, "layer_types") or [])
    rope_types: dict[str, str] = {}
    out = []
    interface = True
    learned_sinks = False
    for i, layer in enumerate(layers):
        attn = _attention_child(layer)
        lt = types[i] if i < len(types) else "full_attention"
        shared = lt == "dummy" and i < len(declared)  # transformers' caches skip KV-sharing layers
        if shared:
            lt = declared[i]
        kind = _KIND_OF_TYPE.get(lt, OTHER)
        if attn is None and kind in ATTENTION_KINDS:
            kind = LINEAR if any(hasattr(layer, a) for a in ("linear_attn", "mamba", "mixer")) else OTHER
        if attn is None or kind not in ATTENTION_KINDS:
            out.append(LayerScheme(i, kind, None, NONE, None, None, None, None, None))
            continue
        lc = _layer_cfg(cfg, i)
        n_heads = _get(attn, "num_heads", "num_attention_heads") or _get(lc, "num_attention_heads", "n_head",
                                                                          "n_heads")
        hidden = _get(lc, "hidden_size", "n_embd", "d_model", "n_embed")
        qk = _get(attn, "qk_head_dim", "head_dim") or _get(lc, "qk_head_dim", "head_dim") or (
            int(hidden) // int(n_heads) if hidden and n_heads else None)
        v = _get(attn, "v_head_dim") or _get(lc, "v_head_dim") or qk
        n_kv = _kv_heads(attn, n_heads, qk)
        if n_kv is None:
            n_kv = _get(lc, "num_key_value_heads")
        if n_kv is None:
            n_kv = 1 if getattr(lc, "multi_query", False) and not getattr(lc, "new_decoder_architecture", False) \
                else n_heads
        window = kwargs[i].get("sliding_window") if i < len(kwargs) else None
        if shared and kind in (SLIDING, CHUNKED):
            window = _get(lc, "sliding_window", "attention_chunk_size")
        if alibi:
            pos, rdim = ALIBI, None
        elif absolute:
            pos, rdim = ABSOLUTE, None
        elif isinstance(no_rope, list | tuple) and i < len(no_rope) and not no_rope[i]:
            pos, rdim = NONE, None
        else:
            rdim = rotary.get(lt) or rotary.get("*") or _config_rotary_dim(lc)
            pos = ROPE if rdim else NONE
            if rdim:
                rope_types[lt] = _rope_type(model, lt)
        src = _forward_source(attn)
        interface = interface and "ALL_ATTENTION_FUNCTIONS" in src
        learned_sinks = learned_sinks or (isinstance(getattr(attn, "sinks", None), nn.Parameter) and "s_aux" in src)
        out.append(LayerScheme(i, kind, int(window) if window else None, pos, int(rdim) if rdim else None,
                               int(qk) if qk else None, int(v) if v else None, int(n_heads) if n_heads else None,
                               int(n_kv) if n_kv else None, shared, _latent_dim(attn)))
    has_rope = any(ly.positions == ROPE for ly in out)
    softcap = _get(cfg, "attn_logit_softcapping")
    switch = family not in EAGER_AT_LOAD or getattr(model.config, "_attn_implementation", None) == "eager"
    return AttentionScheme(
        family=family, architecture=arch, layers=tuple(out),
        rope_layout=("interleaved" if family in INTERLEAVED_ROPE else "half") if has_rope else None,
        learned_sinks=learned_sinks, softcap=float(softcap) if softcap else None, interface=interface,
        eager_switch=switch, kv_shared=any(ly.shared_kv for ly in out),
        position_scaled=family in POSITION_SCALED and bool(getattr(cfg, "attn_temperature_tuning", False)),
        rope_types=tuple(sorted(rope_types.items())),
    )


def _latent_dim(attn: nn.Module) -> int | None:
    """Numbers per token an MLA layer caches (latent rank + rotary key dims), None for other attention."""
    latent, rope = _get(attn, "kv_lora_rank"), _get(attn, "qk_rope_head_dim")
    return int(latent) + int(rope) if latent and rope else None


def _kv_heads(attn: nn.Module, n_heads: Any, qk: Any) -> int | None:
    """Key/value heads of one attention module, read off the module (config fields a family ignores, such as a
    ``num_key_value_heads`` on GPT-J or MPT, don't count): its own attribute, its GQA group size, or the width
    of its key (or fused query-key-value) projection."""
    n = _get(attn, "num_key_value_heads", "num_kv_heads")
    if n:
        return int(n)
    groups = _get(attn, "num_key_value_groups")
    if n_heads and groups:
        return int(n_heads) // int(groups)
    if not qk:
        return None
    k = getattr(attn, "k_proj", None)
    width = _out_features(k)
    if width:
        return width // int(qk)
    for name in ("query_key_value", "qkv_proj", "Wqkv", "c_attn"):  # [q heads + 2 x kv heads] x head dim
        width = _out_features(getattr(attn, name, None))
        if width and n_heads and (width // int(qk) - int(n_heads)) > 0 and (width // int(qk) - int(n_heads)) % 2 == 0:
            return (width // int(qk) - int(n_heads)) // 2
    return None


def _out_features(module: Any) -> int | None:
    """Output width of a projection: ``nn.Linear.out_features`` or GPT-2's ``Conv1D.nf``."""
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)
    return int(width) if isinstance(width, int) else None


def _layer_types(cfg: Any, n: int) -> tuple[list[str], list[dict[str, Any]]]:
    """transformers' layer types (``full_attention``, ``sliding_attention``, ..., ``dummy`` for a layer that
    reads another's keys) and each layer's window, as its caches see them. Read from the config the way
    ``cache_utils.get_layer_types_and_kwargs`` does (transformers >= 5.2x); earlier 5.x releases lack that
    helper or return another shape, so the same rules are applied here."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(cfg)
        if isinstance(types, list | tuple) and isinstance(kwargs, list | tuple) and len(types) == len(kwargs) == n \
                and all(isinstance(k, dict) for k in kwargs):
            return list(types), list(kwargs)
    except Exception:  # no helper, or a config without the per-layer fields it relies on
        pass
    declared = _get(cfg, "layer_types")
    types, kwargs = [], []
    for i in range(n):
        lc = _layer_cfg(cfg, i)
        if declared and i < len(declared):
            lt = declared[i]
        elif _get(lc, "sliding_window") is not None:
            lt = "sliding_attention"
        elif _get(lc, "attention_chunk_size") is not None:
            lt = "chunked_attention"
        else:
            lt = "full_attention"
        window = _get(lc, "sliding_window") if lt == "sliding_attention" else (
            _get(lc, "attention_chunk_size") if lt == "chunked_attention" else None)
        types.append(lt)
        kwargs.append({"sliding_window": window} if window is not None else {})
    shared = int(_get(cfg, "num_kv_shared_layers") or 0)
    for i in range(max(0, n - shared), n):  # the last layers reuse an earlier layer's keys and values
        types[i] = "dummy"
    return types, kwargs


def _rotary_dims(model: nn.Module) -> dict[str, int]:
    """Rotating dimensions per layer type, from the rotary module's inverse frequencies (``*``: all types)."""
    import torch

    for mod in model.modules():
        if not type(mod).__name__.endswith("RotaryEmbedding"):
            continue
        dims: dict[str, int] = {}
        for name, buf in mod.named_buffers(recurse=False):
            if isinstance(buf, torch.Tensor) and name.endswith("inv_freq") and not name.endswith("original_inv_freq"):
                lt = name[: -len("_inv_freq")] if name != "inv_freq" else "*"
                dims[lt] = 2 * buf.numel()
        return dims
    return {}


def _config_rotary_dim(cfg: Any) -> int | None:
    """GPT-J style models rotate ``rotary_dim`` dimensions with a table inside the attention module."""
    r = _get(cfg, "rotary_dim")
    return int(r) if r else None


def _rope_type(model: nn.Module, layer_type: str) -> str:
    for mod in model.modules():
        if type(mod).__name__.endswith("RotaryEmbedding"):
            rt = getattr(mod, "rope_type", "default")
            return str(rt.get(layer_type, "default") if isinstance(rt, dict) else rt)
    return "default"


def _has_absolute_positions(model: nn.Module) -> bool:
    """A learned (or fixed) table of absolute position embeddings added to the input (GPT-2 ``wpe``, OPT)."""
    for name, mod in model.named_modules():
        last = name.rpartition(".")[2]
        if last in ("wpe", "embed_positions", "position_embeddings") and isinstance(mod, nn.Embedding | nn.Module) \
                and "Rotary" not in type(mod).__name__:
            return True
    return False


def dropped_softcap(model: nn.Module) -> str | None:
    """Why the model's own forward runs without its attention soft-cap (None when it applies it): transformers'
    SDPA and flash attention ignore ``softcap`` (Gemma-2), so the model as loaded is not the model its config
    describes. Comparisons of modes (eval-stream: dense, token by token, one pass) must not mix the two."""
    scheme = attention_scheme(model)
    impl = getattr(model.config, "_attn_implementation", None)
    if scheme.softcap and impl not in (None, "eager"):
        return (f"{scheme.family}: its attention is soft-capped (attn_logit_softcapping={scheme.softcap:g}), which "
                f"transformers' {impl} attention drops, so its own forwards are not the model its config describes; "
                "load it with attn_implementation='eager' (sinkscope.load_model does)")
    return None


def check_layer_count(scheme: AttentionScheme, seen: set[int] | list[int], expected: list[int], mode: str) -> None:
    """After a forward: every layer that should have reached sinkscope did (catches a path that slipped)."""
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise CaptureError(f"{scheme.family}: layers {missing[:5]} never reached sinkscope's {MODE_NAMES[mode]}; "
                           "no numbers are reported for a path that did not run (use another mode)")
