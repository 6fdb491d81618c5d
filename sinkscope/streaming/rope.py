"""The model's own RoPE, read once and re-applied: how keys (and queries) move to other positions.

RoPE rotates each pair of a head's dimensions by ``position x inv_freq``, and rotations compose
(``R(a) R(b) = R(a + b)``), so a vector the model rotated at one position is moved to another by rotating it
by the difference, with the model's own inverse frequencies. :class:`~sinkscope.streaming.SinkCache` moves
stored keys this way when it evicts; the one-pass evaluation (:mod:`sinkscope.streaming.onepass`) moves
keys between chunk frames and queries to their in-cache position for the sink scores. The layout (halves or
adjacent pairs) and the rotating dimensions come from the model's :class:`~sinkscope.scheme.AttentionScheme`;
:func:`layer_ropes` checks them against the model's own rotation on a probe and refuses a model whose
rotation it can't reproduce.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig

from ..errors import ConfigError
from ..scheme import ROPE, TYPE_OF_KIND, AttentionScheme, attention_modules

__all__ = ["LayerRope", "layer_ropes", "rerotate"]

# Probe positions for the rotation check: arrival positions and shifts (both directions); every position
# stays in 0..31, inside any model's sinusoidal table.
_PROBE_AT = torch.tensor([[12, 9, 20, 31]])
_PROBE_SHIFT = torch.tensor([3, -7, 11, -30])


# ------------------------------------------------------------------------------------------------ RoPE


@dataclass(frozen=True)
class LayerRope:
    """How one layer's stored keys move: the inverse frequencies of its rotation and the pair layout."""

    inv_freq: torch.Tensor  # [rotary_dim / 2], float32, CPU
    layout: str  # "half" (rotate_half) or "interleaved" (adjacent pairs)


@dataclass
class _Rotation:
    """A model's own RoPE: its inverse frequencies per layer type and a way to run its rotation on a probe."""

    inv_freq: Callable[[str], torch.Tensor]
    rotate: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]  # (x [B, H, L, r], positions [1, L], type)
    what: str  # for messages


def _call_apply(apply: Callable[..., Any], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Run a modeling file's ``apply_rotary_pos_emb`` on ``x`` whatever its convention."""
    names = list(inspect.signature(apply).parameters)[:3]
    if names[1:3] == ["cos", "sin"]:  # (x, cos, sin): Gemma-4
        return apply(x, cos, sin)
    if names[1:3] == ["sin", "cos"]:  # (tensor, sin, cos): GPT-J, CodeGen
        return apply(x, sin, cos)
    return apply(x, x, cos, sin)[1]  # (q, k, cos, sin): the common one; the key comes second


def _module_rotation(module: nn.Module, apply: Callable[..., Any]) -> _Rotation:
    """The rotation of a transformers ``*RotaryEmbedding`` module and its ``apply_rotary_pos_emb``."""
    takes_layer_type = "layer_type" in inspect.signature(module.forward).parameters

    def inv_freq(layer_type: str) -> torch.Tensor:
        # The original frequencies: dynamic NTK only departs from them past max_position_embeddings.
        for name in (f"{layer_type}_original_inv_freq", f"{layer_type}_inv_freq", "original_inv_freq", "inv_freq"):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                return t.detach().to("cpu", torch.float32).clone()
        raise ConfigError(f"{type(module).__name__} has no inverse frequencies (inv_freq) for {layer_type} "
                          "layers; SinkCache can't re-rotate their keys")

    def rotate(x: torch.Tensor, positions: torch.Tensor, layer_type: str) -> torch.Tensor:
        buf = next(iter(module.buffers()), None)
        device = buf.device if buf is not None else torch.device("cpu")
        z = torch.zeros(1, 1, positions.shape[-1], 1, dtype=torch.float32, device=device)
        pos = positions.to(device)
        cos, sin = module(z, pos, layer_type) if takes_layer_type else module(z, pos)
        return _call_apply(apply, x.to(device), cos, sin)

    return _Rotation(inv_freq, rotate, type(module).__name__)


def _table_rotation(table: torch.Tensor, apply: Callable[..., Any]) -> _Rotation:
    """GPT-J's rotation: a ``[positions, r]`` table of sines then cosines, ``apply(tensor [B, L, H, r], sin, cos)``."""
    table = table.detach().to("cpu", torch.float32)
    half = table.shape[-1] // 2

    def inv_freq(layer_type: str) -> torch.Tensor:
        # Row 1 holds sin and cos of the frequencies themselves (all below pi): read them back exactly.
        row = table[1].double()
        return torch.atan2(row[:half], row[half:]).float()

    def rotate(x: torch.Tensor, positions: torch.Tensor, layer_type: str) -> torch.Tensor:
        sin, cos = table[positions[0]][None].split(half, dim=-1)  # [1, L, r/2] each
        return _call_apply(apply, x.transpose(1, 2), cos, sin).transpose(1, 2)

    return _Rotation(inv_freq, rotate, "its sinusoidal embed_positions table")


def _model_rotation(model: nn.Module, arch: str) -> _Rotation:
    """The rotation a loaded model applies: its rotary module, or the sinusoidal table of its attention."""
    for mod in model.modules():
        if type(mod).__name__.endswith("RotaryEmbedding"):
            return _module_rotation(mod, _apply_of(sys.modules[type(mod).__module__], arch))
    for attn in attention_modules(model).values():
        table = getattr(attn, "embed_positions", None)
        if isinstance(table, torch.Tensor) and table.dim() == 2:
            return _table_rotation(table, _apply_of(sys.modules[type(attn).__module__], arch))
    raise ConfigError(f"{arch}: can't find the rotary embedding of its RoPE layers (no *RotaryEmbedding module, "
                      "no sinusoidal table); SinkCache can't re-rotate their keys")


def _config_rotation(meta: nn.Module, config: PreTrainedConfig, arch: str, rotary_dim: int) -> _Rotation:
    """The same rotation without weights: the rotary class of the meta-device model built again on the CPU from
    the config, or, for GPT-J, the family's ``create_sinusoidal_positions``."""
    for mod in meta.modules():
        if type(mod).__name__.endswith("RotaryEmbedding"):
            cls = type(mod)
            try:
                rot = cls(getattr(mod, "config", None) or config)
            except Exception as exc:  # any failure means we can't reproduce the model's RoPE from this config
                raise ConfigError(f"{arch}: can't build {cls.__name__} from the config ({exc}); pass the model") \
                    from exc
            return _module_rotation(rot, _apply_of(sys.modules[cls.__module__], arch))
    for attn in attention_modules(meta).values():
        modeling = sys.modules[type(attn).__module__]
        create = getattr(modeling, "create_sinusoidal_positions", None)
        if isinstance(getattr(attn, "embed_positions", None), torch.Tensor) and create is not None:
            return _table_rotation(create(int(_PROBE_AT.max()) + 2, rotary_dim), _apply_of(modeling, arch))
    raise ConfigError(f"{arch}: can't find the rotary embedding of its RoPE layers; pass the model")


def _apply_of(modeling: Any, arch: str) -> Callable[..., Any]:
    apply = getattr(modeling, "apply_rotary_pos_emb", None)
    if apply is None:
        raise ConfigError(f"{arch}: can't find apply_rotary_pos_emb in {modeling.__name__}; SinkCache can't check "
                          "how this model rotates keys")
    return apply


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate RoPE-rotated ``keys`` ``[B, H, L, D]`` by ``delta[L]`` more positions.

    Only the first ``r = 2 * len(inv_freq)`` dimensions rotate (partial rotary: the rest pass through), as
    pairs ``(i, i + r/2)`` (``layout="half"``, transformers' ``rotate_half``) or ``(2i, 2i + 1)``
    (``"interleaved"``: Cohere, GPT-J). Computed in float32 and cast back once.
    """
    r = 2 * inv_freq.numel()
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(keys.device)[None, :]
    k = keys[..., :r].to(torch.float32)
    if layout == "interleaved":
        cos, sin = ang.cos().repeat_interleave(2, dim=-1), ang.sin().repeat_interleave(2, dim=-1)
        turned = torch.stack((-k[..., 1::2], k[..., ::2]), dim=-1).flatten(-2)
    else:
        emb = torch.cat((ang, ang), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        half = r // 2
        turned = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    rotated = k * cos + turned * sin
    if r < keys.shape[-1]:
        rotated = torch.cat((rotated, keys[..., r:].to(torch.float32)), dim=-1)
    return rotated.to(keys.dtype)


def _probe(rotation: _Rotation, layer_type: str, rope: LayerRope, rotary_dim: int, arch: str) -> None:
    """Check that re-rotating the model's own rotated keys lands where the model would put them.

    The probe has ``rotary_dim`` dimensions, the slice of each key head the model's rotation acts on (a
    partial-rotary model's apply function expects only that slice).
    """
    if 2 * rope.inv_freq.numel() != rotary_dim:
        raise ConfigError(f"{arch}: {rotation.what} has {rope.inv_freq.numel()} frequencies for {layer_type} layers, "
                          f"but they rotate {rotary_dim} dimensions; SinkCache can't tell which dimensions rotate")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, _PROBE_AT.shape[-1], rotary_dim, generator=gen)
    try:
        k1 = rotation.rotate(x, _PROBE_AT, layer_type)
        k2 = rotation.rotate(x, _PROBE_AT + _PROBE_SHIFT, layer_type)
    except Exception as exc:  # a rotary layout we can't drive is a layout we can't re-rotate
        raise ConfigError(f"{arch}: can't run the model's rotary embedding ({rotation.what}) to check it ({exc}); "
                          "SinkCache re-rotates keys in the rotate_half or interleaved layout") from exc
    ours = rerotate(k1.float().cpu(), _PROBE_SHIFT, rope.inv_freq, rope.layout)
    err = (ours - k2.float().cpu()).abs().max().item()
    if not err <= 1e-3 * max(1.0, k2.abs().max().item()):
        raise ConfigError(f"{arch}: re-rotating keys ({rope.layout} layout) doesn't reproduce this model's RoPE for "
                          f"{layer_type} layers (max error {err:.2g}); its rotary layout isn't one SinkCache can shift")


def layer_ropes(model: nn.Module, config: PreTrainedConfig, scheme: AttentionScheme, arch: str, *,
                 meta: bool) -> dict[int, LayerRope]:
    """Layer index -> how its keys move, for the RoPE layers of the scheme (others are never re-rotated).

    ``meta``: ``model`` is the weightless meta-device model of a config; the rotation is rebuilt on the CPU.
    """
    rotation: _Rotation | None = None
    by_type: dict[tuple[str, int], LayerRope] = {}
    out: dict[int, LayerRope] = {}
    for ly in scheme.layers:
        if not ly.attends or ly.positions != ROPE or not ly.rotary_dim:
            continue
        layer_type = TYPE_OF_KIND[ly.kind]
        key = (layer_type, ly.rotary_dim)
        if key not in by_type:
            if rotation is None:
                rotation = _config_rotation(model, config, arch, ly.rotary_dim) if meta else \
                    _model_rotation(model, arch)
            rope = LayerRope(rotation.inv_freq(layer_type), scheme.rope_layout or "half")
            _probe(rotation, layer_type, rope, ly.rotary_dim, arch)
            by_type[key] = rope
        out[ly.index] = by_type[key]
    return out
