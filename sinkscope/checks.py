"""``check_model``: run every sinkscope mode on a model against an independent reference; one support row.

This is what ``sinkscope models --check MODEL`` prints and what the support matrix in the tests and
``docs/models.md`` are made of. Each mode is either *exact* (its numbers matched the reference within the
tolerance), *refused* (the model's :class:`~sinkscope.scheme.AttentionScheme` says it can't be served, with
the reason and what works instead), or *failed* (it ran but disagreed, or raised: a bug to report).

The references are transformers' own computations, never sinkscope's:

* ``maps``: :func:`sinkscope.capture` maps against ``output_attentions=True`` under eager attention;
* ``stats``: statistics-mode metrics against the same metrics computed in numpy from those eager maps
  (first-token mass, sink mass, entropy, learned-sink mass), and the model's logits under statistics mode
  against the eager forward's;
* ``analyze``: :func:`sinkscope.analyze` in each served mode against the numpy metrics of the eager maps;
* ``cache``: :class:`~sinkscope.streaming.SinkCache` streamed token by token past several evictions, on
  the model cut down to its first attention layer (its keys and values then depend only on the token and
  its position), against a fresh forward without any cache over the token ids each query keeps, at
  positions ``0 .. S + W - 1``; ``streamer``: the :class:`~sinkscope.streaming.Streamer`'s per-token NLL
  against the same fresh forwards;
* ``onepass``: the one-pass streaming evaluation (:mod:`sinkscope.streaming.onepass`) of the whole model, in
  chunks shorter than the window (so carried keys cross several chunks), against the NLL of the same tokens
  streamed token by token through ``SinkCache`` (which the cache check holds to fresh forwards).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import SinkscopeError
from .scheme import AttentionScheme, attention_scheme, forget, stack_owner, text_config

CHECKS = ("maps", "stats", "analyze", "cache", "streamer", "onepass")
TOLERANCE = {"maps": 1e-5, "stats": 1e-4, "analyze": 1e-4, "cache": 1e-4, "streamer": 1e-4, "onepass": 1e-4}
EXACT, REFUSED, SKIPPED, FAILED = "exact", "refused", "skipped", "failed"
K_CHECK = 4  # K of the metric checks: small, so that short prompts leave many queries


@dataclass
class CheckResult:
    """One mode on one model: ``status`` exact / refused / failed, the largest error seen, and why."""

    status: str
    max_error: float | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Exact, refused with a reason, or not checkable here: never numbers off their reference."""
        return self.status in (EXACT, REFUSED, SKIPPED)


@dataclass
class SupportRow:
    """What :func:`check_model` found for one model: its scheme and one :class:`CheckResult` per mode."""

    family: str
    architecture: str
    scheme: AttentionScheme
    results: dict[str, CheckResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No mode gave numbers off its reference or raised."""
        return all(r.ok for r in self.results.values())

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "architecture": self.architecture, "scheme": self.scheme.to_dict(),
                "results": {k: asdict(v) for k, v in self.results.items()}}

    def summary(self) -> str:
        """Notable facts of the scheme in a few words (positions, layer kinds, learned sinks, soft-cap, MLA)."""
        s = self.scheme
        attn = [ly for ly in s.layers if ly.attends]
        bits = [s.positions + (f" ({s.rope_layout}" + (", partial" if any(
            ly.rotary_dim and ly.qk_head_dim and ly.rotary_dim < ly.qk_head_dim for ly in attn) else "") + ")"
            if s.rope_layout else "")]
        kinds = sorted({ly.kind for ly in s.layers})
        if kinds != ["full"]:
            bits.append("/".join(kinds) + " layers")
        if s.learned_sinks:
            bits.append("learned sinks")
        if s.softcap:
            bits.append(f"soft-cap {s.softcap:g}")
        if len({(ly.qk_head_dim, ly.v_head_dim) for ly in attn}) > 1:
            bits.append("per-layer head dims")
        if any(ly.kv_latent_dim for ly in attn):
            bits.append("latent KV (MLA)")
        if any(ly.qk_head_dim != ly.v_head_dim for ly in attn):
            bits.append("value dim != key dim")
        if s.kv_shared:
            bits.append("KV sharing")
        return ", ".join(bits)


def check_model(model: nn.Module, *, ids: torch.Tensor | None = None, tokens: int = 40, sinks: int = 2,
                window: int = 8, stream_tokens: int = 24, checks: tuple[str, ...] = CHECKS) -> SupportRow:
    """Run each of ``checks`` on ``model`` against its independent reference (see the module docstring).

    ``ids`` ``[1, T]`` is the prompt of the metric checks (default: ``tokens`` fixed pseudo-random ids);
    the cache check streams ``stream_tokens`` tokens past a cache of ``sinks + window`` (the window grows
    to cover a sliding-window layer, which keeps its own window). Nothing here raises for a model sinkscope
    can't serve: that is a ``refused`` result. The model is left as it was (attention implementation,
    layers, config).
    """
    scheme = attention_scheme(model)
    row = SupportRow(scheme.family, scheme.architecture, scheme)
    device = next(model.parameters()).device
    vocab = int(getattr(text_config(model), "vocab_size", 0) or 0) or 100
    if ids is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(min(4, vocab - 1), vocab, (1, tokens), generator=g)
    ids = ids.to(device)
    support = scheme.support()
    eager = None
    for name in checks:
        mode = {"analyze": "maps", "streamer": "cache"}.get(name, name)
        if not support[mode].ok:
            row.results[name] = CheckResult(REFUSED, detail=support[mode].message(scheme.family, mode))
            continue
        try:
            if name in ("maps", "stats", "analyze") and eager is None:
                eager = _eager(model, ids)
            if name == "maps":
                row.results[name] = _check_maps(model, ids, eager)
            elif name == "stats":
                row.results[name] = _check_stats(model, ids, eager, scheme)
            elif name == "analyze":
                row.results[name] = _check_analyze(model, ids, eager, scheme, support["stats"].ok)
            elif name == "onepass":
                row.results[name] = _check_onepass(model, scheme, sinks, window, ids)
            else:
                row.results[name] = _check_cache(model, scheme, sinks, window, stream_tokens, vocab,
                                                 streamer=name == "streamer")
        except SinkscopeError as exc:  # a refusal that the scheme did not foresee is still a refusal
            row.results[name] = CheckResult(REFUSED, detail=str(exc))
        except Exception as exc:  # a bug to report, as a row, not a traceback
            row.results[name] = CheckResult(FAILED, detail=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    return row


# ------------------------------------------------------------------------------------------------ references


@dataclass
class _Eager:
    maps: dict[int, np.ndarray]  # layer -> [heads, T, T] float64
    logits: torch.Tensor


@contextmanager
def _implementation(model: nn.Module, name: str) -> Iterator[None]:
    original = model.config._attn_implementation
    if original != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if original != name:
            model.set_attn_implementation(original)


def _eager(model: nn.Module, ids: torch.Tensor) -> _Eager:
    """transformers' own eager attention maps (``output_attentions``) and logits."""
    scheme = attention_scheme(model)
    with _implementation(model, "eager"), torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    attentions = [a for a in (out.attentions or ()) if a is not None]
    layers = scheme.attention_layers
    if len(attentions) != len(layers):
        raise RuntimeError(f"eager attention returned {len(attentions)} maps for {len(layers)} attention layers")
    return _Eager({layer: a[0].double().cpu().numpy() for layer, a in zip(layers, attentions, strict=True)},
                  out.logits.float())


def _np_metrics(a: np.ndarray, k: int, learned: bool) -> dict[str, np.ndarray]:
    """design.md metrics of one layer's eager map, in numpy."""
    rows = a[:, k:, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = np.where(rows > 0, -rows * np.log(rows), 0.0).sum(-1)
        sink = np.clip(1.0 - rows.sum(-1), 0.0, None)
        if learned:
            ent = ent + np.where(sink > 0, -sink * np.log(sink), 0.0)
    out = {"first_token_mass": rows[:, :, 0].mean(1), "entropy": ent.mean(1),
           "sink_mass": np.stack([rows[:, :, :j].sum(-1).mean(1) for j in range(1, k + 1)], -1)}
    if learned:
        out["learned_sink_mass"] = sink.mean(1)
    return out


def _result(errors: dict[str, float], tol: float, what: str) -> CheckResult:
    worst = max(errors.values()) if errors else 0.0
    if not math.isfinite(worst) or worst > tol:
        bad = max(errors, key=lambda key: errors[key])
        return CheckResult(FAILED, worst, f"{bad} off by {worst:.2g} (tolerance {tol:g}) against {what}")
    return CheckResult(EXACT, worst, f"within {tol:g} of {what}")


def _check_maps(model: nn.Module, ids: torch.Tensor, eager: _Eager) -> CheckResult:
    from .capture import capture

    with capture(model) as cap, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    errors = {f"layer {layer}": float(np.abs(cap.maps[layer][0].double().cpu().numpy() - m).max())
              for layer, m in eager.maps.items()}
    return _result(errors, TOLERANCE["maps"], "eager output_attentions")


def _check_stats(model: nn.Module, ids: torch.Tensor, eager: _Eager, scheme: AttentionScheme) -> CheckResult:
    from .capture import capture_stats

    with capture_stats(model, k_max=K_CHECK) as cap, torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    # Logits relative to their scale (a real model's reach ~20): the order of float32 sums differs.
    errors = {"logits": float((logits - eager.logits).abs().max() / max(1.0, float(eager.logits.abs().max())))}
    for layer, m in eager.maps.items():
        ref = _np_metrics(m, K_CHECK, scheme.learned_sinks)
        st = cap.stats[layer]
        for key, value in ref.items():
            got = getattr(st, key, None)
            if got is None:
                errors[f"{key} (missing)"] = math.inf
                continue
            errors[f"layer {layer} {key}"] = float(np.abs(np.asarray(got) - value).max())
    return _result(errors, TOLERANCE["stats"], "metrics of eager maps and eager logits")


def _check_analyze(model: nn.Module, ids: torch.Tensor, eager: _Eager, scheme: AttentionScheme,
                   stats_ok: bool) -> CheckResult:
    from .analysis import analyze
    from .models import LoadedModel, spec_from_model

    tok = _IdsTokenizer(ids)
    lm = LoadedModel(model, tok, spec_from_model(model, tok, scheme.family, "check"))
    errors: dict[str, float] = {}
    refs = {layer: _np_metrics(m, K_CHECK, scheme.learned_sinks) for layer, m in eager.maps.items()}
    for mode in ("maps", "stats") if stats_ok else ("maps",):
        prof = analyze(lm, "x", k_max=K_CHECK, map_size=None, mode=mode, progress=False)
        for row, layer in enumerate(prof.layers):
            errors[f"{mode} layer {layer} first_token_mass"] = float(
                np.abs(prof.first_token_mass[row] - refs[layer]["first_token_mass"]).max())
            errors[f"{mode} layer {layer} entropy"] = float(np.abs(prof.entropy[row] - refs[layer]["entropy"]).max())
            if scheme.learned_sinks:
                lsm = prof.learned_sink_mass
                errors[f"{mode} layer {layer} learned_sink_mass"] = math.inf if lsm is None else float(
                    np.abs(lsm[row] - refs[layer]["learned_sink_mass"]).max())
    return _result(errors, TOLERANCE["analyze"], "metrics of eager maps" + (" (both modes)" if stats_ok else ""))


class _IdsTokenizer:
    """The smallest tokenizer analyze needs: every text encodes to the check's fixed ids."""

    bos_token_id = None
    eos_token_id = None

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids.cpu()

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=self.ids if return_tensors == "pt" else self.ids[0].tolist())

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"<{i}>" for i in ids)

    def convert_ids_to_tokens(self, i: int) -> str:
        return f"<{i}>"


# ------------------------------------------------------------------------------------------------- the cache


@contextmanager
def first_attention_layer(model: nn.Module) -> Iterator[int]:
    """Cut ``model`` down to its layers up to and including the first one with attention (restored on exit).

    Yields the number of layers kept. With a single attention layer, keys and values depend only on the
    token and its position, which is what makes a fresh forward a reference for a cache that evicts.
    """
    scheme = attention_scheme(model)
    first = scheme.attention_layers[0]
    keep = first + 1
    owner, attr = stack_owner(model)
    cfg = text_config(model)
    # getattr/setattr, not __dict__: GPT-J, Bloom and MPT map num_hidden_layers onto a name of their own.
    saved = {name: getattr(cfg, name, None) for name in ("num_hidden_layers", "layer_types", "no_rope_layers")}
    stack = getattr(owner, attr)
    forget(model)
    try:
        setattr(owner, attr, nn.ModuleList(list(stack)[:keep]))
        cfg.num_hidden_layers = keep
        for name in ("layer_types", "no_rope_layers"):
            if isinstance(saved.get(name), list):
                setattr(cfg, name, list(saved[name])[:keep])
        yield keep
    finally:
        setattr(owner, attr, stack)
        for name, value in saved.items():
            if value is not None or getattr(cfg, name, None) is not None:
                setattr(cfg, name, value)
        forget(model)


def _check_cache(model: nn.Module, scheme: AttentionScheme, sinks: int, window: int, n: int, vocab: int, *,
                 streamer: bool) -> CheckResult:
    from .streaming import SinkCache

    first = scheme.layers[scheme.attention_layers[0]]
    if scheme.attention_layers[0] != 0:
        return CheckResult(SKIPPED, detail="layers before the first attention layer have state of their own "
                                           "(hybrid model), so a fresh forward is no reference; SinkCache serves "
                                           "it, and sinkscope's tests hold its eviction to a reference of its own")
    if first.kind == "sliding" and first.window:
        window = max(window, first.window + 2)  # the kept window must cover the layer's own window
    g = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    total = sinks + window + n
    ids = torch.randint(min(4, vocab - 1), vocab, (1, total), generator=g).to(device)
    errors: dict[str, float] = {}
    refs: dict[int, torch.Tensor] = {}
    check_from = sinks + window + 1  # after the first evictions
    with first_attention_layer(model), torch.no_grad():
        cache = SinkCache(model, sinks, window)
        got = [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1].float()
               for t in range(total)]
        for t in range(check_from, total):
            refs[t] = _fresh_logits(model, ids[:, list(range(sinks)) + list(range(t - window + 1, t + 1))])
            errors[f"token {t}"] = float((got[t] - refs[t]).abs().max() / max(1.0, float(refs[t].abs().max())))
        if streamer:
            return _check_streamer(model, ids, sinks, window, refs)
    return _result(errors, TOLERANCE["cache"], f"fresh forwards over the kept tokens (S={sinks}, W={window})")


def _fresh_logits(model: nn.Module, kept: torch.Tensor) -> torch.Tensor:
    """No cache: the kept ids at positions 0 .. len-1 (ALiBi models take positions from the sequence)."""
    import inspect

    kwargs: dict[str, Any] = {"input_ids": kept, "use_cache": False}
    params = inspect.signature(model.forward).parameters
    if "position_ids" in params:
        kwargs["position_ids"] = torch.arange(kept.shape[1], device=kept.device).unsqueeze(0)
    if "logits_to_keep" in params:  # the last row only: T x vocab logits are most of the cost (262k for Gemma-3)
        kwargs["logits_to_keep"] = 1
    return model(**kwargs).logits[0, -1].float()


def _check_streamer(model: nn.Module, ids: torch.Tensor, sinks: int, window: int,
                    refs: dict[int, torch.Tensor]) -> CheckResult:
    from .models import LoadedModel, spec_from_model
    from .streaming import Streamer

    tok = _IdsTokenizer(ids)
    lm = LoadedModel(model, tok, spec_from_model(model, tok, "check", "check"))
    stats = list(Streamer(lm, sinks=sinks, window=window).feed(ids[0].tolist(), chunk=1))
    errors = {}
    for t, ref in refs.items():
        if t + 1 < ids.shape[1]:  # relative to the NLL itself (float32 sums over a large vocabulary)
            want = float(-torch.log_softmax(ref, -1)[ids[0, t + 1]])
            errors[f"token {t + 1}"] = abs(stats[t + 1].nll - want) / max(1.0, abs(want))
    return _result(errors, TOLERANCE["streamer"], "NLL from fresh forwards over the kept tokens")


def _check_onepass(model: nn.Module, scheme: AttentionScheme, sinks: int, window: int,
                   ids: torch.Tensor) -> CheckResult:
    from .models import LoadedModel, spec_from_model
    from .streaming import Streamer
    from .streaming.onepass import onepass_nll

    tok = _IdsTokenizer(ids)
    lm = LoadedModel(model, tok, spec_from_model(model, tok, "check", "check"))
    # Chunks shorter than the window: carried keys cross several chunks (local layers keep their own window).
    chunk = max(2, window // 2 - 1)
    if ids.shape[1] <= sinks + window:
        return CheckResult(SKIPPED, detail=f"the prompt ({ids.shape[1]} tokens) is shorter than the cache")
    got = onepass_nll(model, ids[0], sinks, window, chunk=chunk)
    # Token by token runs the model's own attention; SDPA drops a soft-cap (Gemma-2 on a GPU defaults to it),
    # so the reference runs eager, which applies it as one pass does.
    with _implementation(model, "eager") if scheme.softcap else nullcontext():
        ref = [t.nll for t in Streamer(lm, sinks=sinks, window=window).feed(ids[0].tolist(), chunk=1)]
    errors = {f"token {t}": abs(got[t] - ref[t]) / max(1.0, abs(ref[t])) for t in range(1, len(ref))}
    return _result(errors, TOLERANCE["onepass"], f"token-by-token SinkCache streaming (S={sinks}, W={window}, "
                                                 f"chunks of {chunk})")
