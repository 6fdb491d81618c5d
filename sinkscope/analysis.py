"""``analyze(model, prompts) -> SinkProfile``: where a model parks its attention, and how many sinks to keep."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from . import _native, _progress, metrics
from .capture import (
    CPU_BLOCK_BYTES,
    capture,
    capture_activations,
    capture_geometry,
    capture_head_outputs,
    capture_stats,
    default_block_bytes,
    pool_map,
    stats_supported,
)
from .deploy import DeploySettings, deploy_settings
from .errors import CaptureError, ConfigError, PromptError
from .models import LoadedModel, ModelSpec
from .models import load as load_model
from .prompts import Prompt, as_prompts
from .scheme import attention_scheme

SCHEMA = "sinkscope.report/1"
DEFAULT_K = 8
DEFAULT_SHARE = 0.95
DEFAULT_MAP_SIZE = 96
N_SINK_POSITIONS = 8
DEFAULT_TOLERANCE = 0.05  # validated recommendation: within 5% of the best streaming perplexity
STATS_FROM_TOKENS = 1024  # mode="auto": prompts longer than this are measured in statistics mode
MODES = ("auto", "maps", "stats")
GEOMETRY_FIELDS = tuple(f.name for f in fields(metrics.KeyGeometry))  # report.json key_geometry


@dataclass
class SinkPosition:
    """A token position that draws attention from far-away queries, averaged over all layers and heads."""

    position: int
    token: str
    kind: str
    received: float  # mean attention from queries at least LOCAL_WINDOW tokens later
    vs_uniform: float  # received / what a uniform-attention query would give it

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "token": self.token, "kind": self.kind,
                "received": self.received, "vs_uniform": self.vs_uniform}


@dataclass
class SecondarySink:
    """A position beyond the first that is a sink in some layers (:func:`sinkscope.metrics.secondary_sinks`)."""

    position: int
    token: str
    kind: str
    layers: list[int]  # the layers where it qualifies
    peak: float  # the largest per-layer mean attention per head and distant query
    peak_layer: int
    vs_uniform: float  # that peak over what uniform attention would give

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "token": self.token, "kind": self.kind, "layers": self.layers,
                "peak": self.peak, "peak_layer": self.peak_layer, "vs_uniform": self.vs_uniform}


@dataclass
class AttentionMaps:
    """Pooled attention maps of one prompt, for display: ``maps[layer_row, head, q_bin, k_bin]``."""

    maps: np.ndarray
    bins: list[tuple[int, int]]
    labels: list[str]


@dataclass
class MassiveActivations:
    """Each decoder layer's output on one prompt, summarised (:func:`sinkscope.metrics.layer_activations`).

    Rows are decoder layers 0..L-1 (all of them, whatever ``SinkProfile.layers`` holds): ``norms`` ``[L, T]``
    each token's residual norm; ``median`` ``[L]`` the median magnitude of an activation; ``top_values``,
    ``top_tokens``, ``top_dims`` ``[L, N]`` the N largest activations by magnitude and where they are."""

    norms: np.ndarray
    median: np.ndarray
    top_values: np.ndarray
    top_tokens: np.ndarray
    top_dims: np.ndarray

    @property
    def ratio(self) -> np.ndarray:
        """``[L]``: each layer's largest magnitude over its median magnitude."""
        with np.errstate(divide="ignore"):
            return np.abs(self.top_values[:, 0]) / self.median

    @property
    def massive(self) -> np.ndarray:
        """``[L]`` bool: layers with a massive activation (Sun et al. 2024: >= 1000x the median and >= 100)."""
        return metrics.is_massive(self.top_values[:, 0], self.median)

    @property
    def median_norm(self) -> np.ndarray:
        """``[L]``: the median token's residual norm per layer."""
        return np.median(self.norms, axis=1)

    @property
    def first_massive_layer(self) -> int | None:
        """The first layer with a massive activation, None if none has one."""
        hits = np.flatnonzero(self.massive)
        return int(hits[0]) if hits.size else None

    def to_dict(self, tokens: list[str]) -> dict[str, Any]:
        """The ``activations`` entry of report.json for one prompt (``tokens``: the prompt's token texts)."""
        med_norm = self.median_norm
        rows = []
        for i in range(len(self.median)):
            top = [{"token": int(t), "text": tokens[int(t)] if int(t) < len(tokens) else "", "dim": int(d),
                    "value": float(v)}
                   for v, t, d in zip(self.top_values[i], self.top_tokens[i], self.top_dims[i], strict=True)]
            rows.append({"layer": i, "median": float(self.median[i]), "ratio": float(self.ratio[i]),
                         "massive": bool(self.massive[i]), "top": top,
                         "first_token_norm": float(self.norms[i, 0]), "median_token_norm": float(med_norm[i]),
                         "max_token_norm": float(self.norms[i].max()), "max_norm_token": int(self.norms[i].argmax())})
        return {"first_massive_layer": self.first_massive_layer, "layers": rows}


@dataclass
class PromptResult:
    """Everything measured on one prompt. Arrays are indexed by row of ``SinkProfile.layers`` and head."""

    name: str
    n_tokens: int
    tokens: list[str]
    first_token_mass: np.ndarray  # [L, H]
    sink_mass: np.ndarray  # [L, H, K]
    entropy: np.ndarray  # [L, H]
    sink_positions: list[SinkPosition]
    # [L, H]: mean over queries q >= K of the mass that goes to the learned sink logit, to no token
    # (gpt-oss); None for models without learned sinks.
    learned_sink_mass: np.ndarray | None = None
    attention: AttentionMaps | None = None
    capture: str = "maps"  # how it was measured: "maps" (eager whole maps) or "stats" (statistics mode)
    beyond_context: bool = False  # longer than the model's trained context
    row_pass: str | None = None  # statistics mode: which row pass computed it (one line per distinct pass)
    activations: MassiveActivations | None = None  # each decoder layer's residual stream, summarised
    activations_unavailable: str | None = None  # why ``activations`` is None (layers without one stream)
    # [L, H]: what each head writes into the residual stream (metrics.HeadOutputs), mean over q >= K and at
    # position 0; None with the reason when the attention has no output projection to read per head.
    output_norm: np.ndarray | None = None
    first_row_norm: np.ndarray | None = None
    head_outputs_unavailable: str | None = None
    # name -> [L, H] (metrics.KeyGeometry's fields, GEOMETRY_FIELDS);
    # None with the reason for models whose attention does not go through transformers' attention interface.
    geometry: dict[str, np.ndarray] | None = None
    geometry_unavailable: str | None = None
    secondary_sinks: list[SecondarySink] = field(default_factory=list)  # strongest first
    local_mass: np.ndarray | None = None  # [L, H]: metrics.local_mass, the last LOCAL_WINDOW keys from K on


@dataclass
class Recommendation:
    """A sink count with the method that produced it and the evidence it rests on."""

    sinks: int
    method: str
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "method": self.method, "evidence": self.evidence}

    def attention_estimate(self) -> Recommendation:
        """The attention-statistics recommendation: ``self``, or the first version that a validated
        recommendation keeps in ``evidence["attention_estimate"]``."""
        est = self.evidence.get("attention_estimate")
        if isinstance(est, dict) and isinstance(est.get("sinks"), int):
            return Recommendation(est["sinks"], str(est.get("method", "")), dict(est.get("evidence") or {}))
        return self


@dataclass
class SinkProfile:
    """The result of :func:`analyze`: per-prompt measurements, their means, and a recommendation.

    Aggregates over prompts are plain means of the per-prompt values (design.md). Plot methods return
    plotly figures; ``_repr_html_`` shows a summary in notebooks.
    """

    model: ModelSpec
    prompts: list[PromptResult]
    layers: list[int]
    k_max: int
    settings: dict[str, Any]
    recommendation: Recommendation
    stream_eval: dict[str, Any] | None = None
    threshold: float = metrics.SINK_THRESHOLD
    extra: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] | None = None  # sinkscope.inputs.InputSensitivity.to_dict() of one prompt, if measured
    ablation: dict[str, Any] | None = None  # sinkscope.heads.HeadAblation.to_dict() (report --ablate), if run
    # sinkscope.pins.PinEvidence.to_dict() (report --pins), or {"unavailable": why}; None: not tried
    pinning: dict[str, Any] | None = None
    cache_refused: str | None = None  # why SinkCache can't serve the model exactly (None: it can)

    @property
    def deploy(self) -> DeploySettings:
        """The recommendation as cache settings and snippets (SinkCache, kvpress, llama.cpp): ``sinkscope.deploy``."""
        return deploy_settings(self)

    # -- aggregates ---------------------------------------------------------------------------------------
    @property
    def first_token_mass(self) -> np.ndarray:
        """``[layers, heads]`` mean over prompts of the first-token mass."""
        return np.mean([p.first_token_mass for p in self.prompts], axis=0)

    @property
    def sink_mass(self) -> np.ndarray:
        """``[layers, heads, K]`` mean over prompts of the mass on the first k tokens, k = 1..K."""
        return np.mean([p.sink_mass for p in self.prompts], axis=0)

    @property
    def entropy(self) -> np.ndarray:
        """``[layers, heads]`` mean over prompts of the attention entropy (nats)."""
        return np.mean([p.entropy for p in self.prompts], axis=0)

    @property
    def learned_sink_mass(self) -> np.ndarray | None:
        """``[layers, heads]`` mean over prompts of the mass on the learned sink, or None without learned sinks.

        A model with learned sinks (gpt-oss) adds to each softmax row an outcome that belongs to no token; this
        is its probability, 1 minus the row sum of the eager attention, mean over queries q >= K. The mean runs
        over the prompts that measured it (for one model: all of them or none).
        """
        return _mean_learned_sink_mass(self.prompts)

    @property
    def has_learned_sinks(self) -> bool:
        """Whether the analysed model has learned sinks (some prompt measured a learned-sink mass)."""
        return any(p.learned_sink_mass is not None for p in self.prompts)

    def learned_sink_heads(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """Heads above ``threshold`` mean learned-sink mass, strongest first (empty without learned sinks)."""
        lsm = self.learned_sink_mass
        if lsm is None:
            return []
        thr = self.threshold if threshold is None else threshold
        rows = [{"layer": self.layers[int(i)], "head": int(h), "learned_sink_mass": float(lsm[i, h])}
                for i, h in zip(*np.nonzero(lsm > thr), strict=True)]
        return sorted(rows, key=lambda r: -r["learned_sink_mass"])

    @property
    def output_norm(self) -> np.ndarray | None:
        """``[layers, heads]`` mean over prompts of each head's projected output norm (queries q >= K), or None
        where a prompt could not measure it (``PromptResult.head_outputs_unavailable`` says why)."""
        return _mean_of_all(p.output_norm for p in self.prompts)

    @property
    def local_mass(self) -> np.ndarray | None:
        """``[layers, heads]`` mean over prompts of the mass on each query's last ``LOCAL_WINDOW`` keys from
        position K on (:func:`sinkscope.metrics.local_mass`), or None where a prompt did not measure it."""
        return _mean_of_all(p.local_mass for p in self.prompts)

    @property
    def first_row_norm(self) -> np.ndarray | None:
        """``[layers, heads]`` mean over prompts of each head's projected output at position 0 (the first token's
        projected value, for plain softmax attention), or None."""
        return _mean_of_all(p.first_row_norm for p in self.prompts)

    def dormant_heads(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """Sink heads whose projected output is below ``metrics.DORMANT_RATIO`` of their layer's median head,
        weakest first (empty when output norms were not measured)."""
        norm = self.output_norm
        if norm is None:
            return []
        thr = self.threshold if threshold is None else threshold
        ratio = metrics.output_ratio(norm)
        ftm = self.first_token_mass
        rows = [{"layer": self.layers[int(i)], "head": int(h), "first_token_mass": float(ftm[i, h]),
                 "output_ratio": float(ratio[i, h]), "output_norm": float(norm[i, h])}
                for i, h in zip(*np.nonzero(metrics.is_dormant(ftm, ratio, thr)), strict=True)]
        return sorted(rows, key=lambda r: r["output_ratio"])

    def geometry(self, name: str) -> np.ndarray | None:
        """``[layers, heads]`` mean over prompts of a key-geometry field (:data:`GEOMETRY_FIELDS`, those of
        :class:`sinkscope.metrics.KeyGeometry`), or None where a prompt could not measure it (or a report written
        before the field existed lacks it)."""
        return _mean_of_all(None if p.geometry is None else p.geometry.get(name) for p in self.prompts)

    def geometry_dict(self) -> dict[str, Any]:
        """The ``key_geometry`` part of ``report.json``."""
        if self.geometry("sink_key_cos") is None:
            why = next((p.geometry_unavailable for p in self.prompts if p.geometry_unavailable), None)
            return {"unavailable": why or "not measured"}
        return {name: _round(got) for name in GEOMETRY_FIELDS if (got := self.geometry(name)) is not None}

    def head_outputs_dict(self) -> dict[str, Any]:
        """The ``head_outputs`` part of ``report.json``."""
        norm, first = self.output_norm, self.first_row_norm
        if norm is None or first is None:
            why = next((p.head_outputs_unavailable for p in self.prompts if p.head_outputs_unavailable), None)
            return {"unavailable": why or "not measured"}
        return {"output_norm": _round(norm), "first_row_norm": _round(first),
                "output_ratio": _round(metrics.output_ratio(norm)), "dormant_ratio": metrics.DORMANT_RATIO,
                "dormant_heads": self.dormant_heads()}

    @property
    def sink_rate(self) -> float:
        """Fraction of heads whose first-token mass exceeds the threshold: the mean of the per-prompt rates."""
        return float(np.mean([metrics.sink_rate(p.first_token_mass, self.threshold) for p in self.prompts]))

    def sink_heads(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """Heads above ``threshold`` first-token mass, strongest first."""
        thr = self.threshold if threshold is None else threshold
        ftm = self.first_token_mass
        rows = [{"layer": self.layers[int(i)], "head": int(h), "first_token_mass": float(ftm[i, h])}
                for i, h in zip(*np.nonzero(ftm > thr), strict=True)]
        return sorted(rows, key=lambda r: -r["first_token_mass"])

    def strongest_heads(self, n: int = 4) -> list[tuple[int, int]]:
        """The ``n`` (layer, head) pairs with the highest first-token mass, whether or not above threshold."""
        ftm = self.first_token_mass
        order = np.argsort(-ftm, axis=None)[:n]
        return [(self.layers[int(i) // ftm.shape[1]], int(i) % ftm.shape[1]) for i in order]

    def layer_row(self, layer: int) -> int:
        """Row of ``layer`` in the arrays (they hold only the analysed layers)."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ConfigError(f"layer {layer} was not analysed; analysed layers: {self.layers}") from None

    def prompt(self, which: int | str = 0) -> PromptResult:
        """A prompt's result by index or name."""
        if isinstance(which, int):
            if not -len(self.prompts) <= which < len(self.prompts):
                raise ConfigError(f"prompt index {which} out of range: there are {len(self.prompts)} prompts")
            return self.prompts[which]
        for p in self.prompts:
            if p.name == which:
                return p
        raise ConfigError(f"no prompt named {which!r}; prompts: {[p.name for p in self.prompts]}")

    # -- export ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` document (schema ``sinkscope.report/1``)."""
        return {
            **self.extra,  # first, so that extra keys can never replace a key of the contract
            "schema": SCHEMA,
            "model": self.model.to_dict(),
            "prompts": [{"name": p.name, "n_tokens": p.n_tokens, "capture": p.capture,
                         "beyond_context": p.beyond_context} for p in self.prompts],
            "settings": {**self.settings, "k_max": self.k_max, "threshold": self.threshold},
            "layers": self.layers,
            "first_token_mass": _round(self.first_token_mass),
            "sink_mass": _round(self.sink_mass),
            "sink_rate": self.sink_rate,
            "sink_heads": self.sink_heads(),
            "recommendation": self.recommendation.to_dict(),
            "stream_eval": self.stream_eval,
            "entropy": _round(self.entropy),
            "learned_sink_mass": None if (lsm := self.learned_sink_mass) is None else _round(lsm),
            "sink_positions": [{"prompt": p.name, "positions": [s.to_dict() for s in p.sink_positions]}
                               for p in self.prompts],
            "secondary_sinks": [{"prompt": p.name, "positions": [s.to_dict() for s in p.secondary_sinks]}
                                for p in self.prompts],
            "activations": [{"prompt": p.name, **p.activations.to_dict(p.tokens)} if p.activations is not None
                            else {"prompt": p.name, "unavailable": p.activations_unavailable} for p in self.prompts],
            "inputs": self.inputs,
            "local_mass": None if (loc := self.local_mass) is None else _round(loc),
            "head_outputs": self.head_outputs_dict(),
            "key_geometry": self.geometry_dict(),
            "ablation": self.ablation,
            "pinning": self.pinning,
            "deploy": self.deploy.to_dict(),
            "per_prompt": [{"name": p.name, "first_token_mass": _round(p.first_token_mass),
                            "sink_rate": metrics.sink_rate(p.first_token_mass, self.threshold)}
                           for p in self.prompts],
        }

    def to_json(self, indent: int | None = 1) -> str:
        """``to_dict()`` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_dataframe(self) -> Any:
        """One row per (layer, head): first-token mass, entropy and sink mass for k = 1..K (pandas); with learned
        sinks also ``learned_sink_mass``."""
        import pandas as pd

        ftm, ent, sm, lsm = self.first_token_mass, self.entropy, self.sink_mass, self.learned_sink_mass
        rows = []
        for i, layer in enumerate(self.layers):
            for h in range(ftm.shape[1]):
                row = {"layer": layer, "head": h, "first_token_mass": ftm[i, h], "entropy": ent[i, h],
                       "sink_head": bool(ftm[i, h] > self.threshold)}
                if lsm is not None:
                    row["learned_sink_mass"] = lsm[i, h]
                row.update({f"sink_mass_k{k + 1}": sm[i, h, k] for k in range(self.k_max)})
                rows.append(row)
        return pd.DataFrame(rows)

    # -- validation by streaming (the recommendation's second version) ----------------------------------
    def attach_stream_eval(self, stream_eval: Any, tolerance: float = DEFAULT_TOLERANCE) -> SinkProfile:
        """Store a stream evaluation and replace the recommendation by the validated one (returns ``self``).

        ``stream_eval`` (a ``StreamEval`` or its dict) goes to :attr:`stream_eval` as a dict; the attention
        estimate stays in ``recommendation.evidence["attention_estimate"]``.
        """
        ev = stream_eval.to_dict() if hasattr(stream_eval, "to_dict") else stream_eval
        rec = recommend_from_stream_eval(ev, tolerance, attention=self.recommendation)
        self.stream_eval = ev
        self.recommendation = rec
        return self

    def validate(self, model: LoadedModel | str | Any, text: Any = None, *, tolerance: float = DEFAULT_TOLERANCE,
                 sinks: Sequence[int] | None = None, tokenizer: Any = None, progress: bool = True,
                 **eval_kwargs: Any) -> SinkProfile:
        """Check the recommendation by streaming: perplexity under eviction per sink count (returns ``self``).

        Runs :func:`sinkscope.streaming.evaluate.evaluate_stream` (default modes: streaming and dense; the
        slow recompute adds nothing to the choice) on ``text`` (default: Python's documentation topics) with
        ``sinks`` (default: 0, 1, 2, 4, 8 and the attention estimate), then :meth:`attach_stream_eval`.
        Other keywords (``window`` (one or a grid), ``tokens``, ``modes``, ``exact_stream``, ...) go to
        ``evaluate_stream``.
        """
        from .streaming.evaluate import DEFAULT_SINKS, evaluate_stream

        lm = _as_loaded(model, tokenizer)
        if sinks is None:
            sinks = sorted(set(DEFAULT_SINKS) | {attention_estimate(self.recommendation).sinks})
        eval_kwargs.setdefault("modes", ("streaming", "dense"))
        ev = evaluate_stream(lm, text, sinks=sinks, progress=progress, **eval_kwargs)
        return self.attach_stream_eval(ev, tolerance)

    # -- figures (built in sinkscope.plots, the one place figures come from) -----------------------------
    def plot_heatmap(self) -> Any:
        """Heatmap of first-token mass by layer x head."""
        from . import plots

        return plots.first_token_heatmap(self)

    def plot_learned_sinks(self) -> Any:
        """Heatmap of learned-sink mass by layer x head (models with learned sinks only)."""
        from . import plots

        return plots.learned_sink_heatmap(self)

    def plot_sink_mass(self) -> Any:
        """Mass on the first k tokens against k, per layer."""
        from . import plots

        return plots.sink_mass_curves(self)

    def plot_attention(self, layer: int, head: int, prompt: int | str = 0, log: bool = False) -> Any:
        """One head's (pooled) attention map on one prompt."""
        from . import plots

        return plots.attention_map(self, layer, head, prompt=prompt, log=log)

    def plot_sink_positions(self, prompt: int | str = 0) -> Any:
        """The positions that draw the most attention, with their tokens."""
        from . import plots

        return plots.sink_positions_chart(self, prompt=prompt)

    def plot_activations(self, prompt: int | str = 0) -> Any:
        """Residual norms per layer (first token, median, largest) and the layers with massive activations."""
        from . import plots

        return plots.massive_activations(self, prompt=prompt)

    def _repr_html_(self) -> str:
        rec = self.recommendation
        heads = self.sink_heads()[:5]
        lsm = self.learned_sink_mass

        def learned_cell(h: dict[str, Any]) -> str:
            return "" if lsm is None else f"<td>{lsm[self.layer_row(h['layer']), h['head']]:.3f}</td>"

        rows = "".join(f"<tr><td>{h['layer']}</td><td>{h['head']}</td><td>{h['first_token_mass']:.3f}</td>"
                       f"{learned_cell(h)}</tr>" for h in heads)
        n_tok = ", ".join(f"{html.escape(p.name)} ({p.n_tokens})" for p in self.prompts)
        learned = ""
        if lsm is not None:
            learned = (f"<br>learned sinks: mean learned-sink mass {float(lsm.mean()):.3f}, "
                       f"{len(self.learned_sink_heads())} of {lsm.size} heads park more than {self.threshold} there "
                       f"(no cache slot needed; the sink count is for the first-token mass that remains)")
        return (
            f"<div><b>SinkProfile</b> of <code>{html.escape(self.model.name)}</code> "
            f"({self.model.n_layers} layers x {self.model.n_heads} heads) on {len(self.prompts)} prompt(s): "
            f"{n_tok}<br>sink rate {self.sink_rate:.1%} (first-token mass &gt; {self.threshold}); "
            f"<b>recommended sinks: {rec.sinks}</b> ({html.escape(rec.method)}){learned}"
            f"<table><tr><th>layer</th><th>head</th><th>first-token mass</th>"
            f"{'' if lsm is None else '<th>learned-sink mass</th>'}</tr>{rows}</table></div>"
        )

    def __repr__(self) -> str:
        return (f"SinkProfile(model={self.model.name!r}, prompts={len(self.prompts)}, "
                f"sink_rate={self.sink_rate:.3f}, recommended_sinks={self.recommendation.sinks})")


def _round(a: np.ndarray, digits: int = 6) -> list[Any]:
    arr = np.round(np.asarray(a, dtype=float), digits)
    if np.isfinite(arr).all():
        return arr.tolist()
    # JSON has no NaN: an undefined value (e.g. an empty mean) is written as null.
    return np.where(np.isfinite(arr), arr, None).tolist()


def _mean_of_all(arrays: Iterable[np.ndarray | None]) -> np.ndarray | None:
    """The mean of per-prompt arrays, or None when some prompt (or every one) has none: a mean over part of the
    prompts would read as the whole profile's."""
    got = list(arrays)
    return None if not got or any(a is None for a in got) else np.mean(got, axis=0)


def _mean_learned_sink_mass(prompts: Sequence[PromptResult]) -> np.ndarray | None:
    """Mean over the prompts that measured it of the ``[L, H]`` learned-sink mass; None when none did."""
    arrays = [p.learned_sink_mass for p in prompts if p.learned_sink_mass is not None]
    return np.mean(arrays, axis=0) if arrays else None


# ------------------------------------------------------------------------------------------ recommendation


def recommend_from_attention(sink_mass: np.ndarray, first_token_mass: np.ndarray, *,
                             threshold: float = metrics.SINK_THRESHOLD, share: float = DEFAULT_SHARE,
                             chance: float = 0.0, learned_sink_mass: np.ndarray | None = None) -> Recommendation:
    """Smallest k whose sink heads keep ``share`` of the above-chance mass that the first K tokens receive.

    Sink heads are those whose first-token mass exceeds ``threshold``; if there are none, heads that put more
    than ``threshold`` on the first K tokens together (a spread-out sink); if still none, the evidence says
    the model parks nothing on its first tokens and the recommendation is 0.

    ``chance`` is what one leading token would receive from uniformly attending queries
    (:func:`sinkscope.metrics.chance_mass`). Only mass above it counts: the small background share that every
    token gets is no reason to pin a token, and counting it would push the recommendation up for nothing.

    ``learned_sink_mass`` (``[L, H]``, models with learned sinks such as gpt-oss; None otherwise) is the mass
    each head gives the softmax's extra outcome that belongs to no token. That sink travels with every query,
    so a streaming cache needs no slot for it, and the learned sink never adds to the count:

    * sink heads are still those above ``threshold`` on the first token, and the count is read on their token
      masses as above (the first-token mass that remains besides the learned sink);
    * if no head is above ``threshold`` on the first token and at least one parks more than ``threshold`` on
      the learned sink, the learned sink carries the excess: the recommendation is 0
      (``learned_sink_carries_excess`` true), since a StreamingLLM cache then needs no pinned token
      (``sinkscope eval-stream`` can confirm). The spread-out fallback is not used then; the heads it would
      have taken and their above-chance first-K mass are in the evidence (``spread_out_heads_skipped``,
      ``spread_out_excess``);
    * otherwise (no head parks much on the learned sink either) the rule runs as without learned sinks.

    The evidence adds ``learned_sink_mass_mean``, ``learned_sink_mass_by_layer`` (per row of the arrays),
    ``learned_sink_heads`` (heads above ``threshold`` on it) and ``learned_sink_note``.

    Raises:
        ConfigError: ``learned_sink_mass`` does not have the shape of ``first_token_mass``.
    """
    sm = np.asarray(sink_mass, dtype=float)
    ftm = np.asarray(first_token_mass, dtype=float)
    learned = None if learned_sink_mass is None else np.asarray(learned_sink_mass, dtype=float)
    if learned is not None and learned.shape != ftm.shape:
        raise ConfigError(f"learned_sink_mass has shape {learned.shape}; it must be [layers, heads] like "
                          f"first_token_mass {ftm.shape}")
    k_max = sm.shape[-1]
    chosen = ftm > threshold
    basis = "first_token_mass > threshold"
    n_learned = 0 if learned is None else int((learned > threshold).sum())
    carried = n_learned > 0 and not chosen.any()  # the learned sink takes what no first token does
    skipped: dict[str, Any] = {}
    if not chosen.any():
        spread = sm[..., -1] > threshold
        if carried:
            basis = "first_token_mass > threshold (the learned sink carries the excess: no spread-out fallback)"
            if spread.any():
                skipped = {"spread_out_heads_skipped": int(spread.sum()),
                           "spread_out_excess": float(_excess(sm[spread].mean(0), chance)[-1])}
        else:
            chosen = spread
            basis = "sink_mass[K] > threshold (no head above threshold on the first token alone)"
    evidence: dict[str, Any] = {"threshold": threshold, "share": share, "k_max": k_max, "heads_basis": basis,
                                "heads_used": int(chosen.sum()), "heads_total": int(chosen.size),
                                "chance": float(chance)}
    method = f"attention: smallest k keeping {share:.0%} of the above-chance first-{k_max} mass in sink heads"
    if learned is not None:
        evidence.update({
            "learned_sink_mass_mean": float(learned.mean()),
            "learned_sink_mass_by_layer": _round(learned.mean(axis=1)),
            "learned_sink_heads": n_learned,
            "learned_sink_carries_excess": carried,
            "learned_sink_note": (
                f"the model has learned sinks: {n_learned} of {learned.size} heads park more than {threshold:g} "
                f"of their attention on the learned sink (mean {learned.mean():.3f} over all heads); it belongs to "
                "no token and travels with every query, so a streaming cache needs no pinned token for it; the "
                "count recommended here is for the first-token mass that remains"),
            **skipped,
        })
        method += "; learned sinks need no cache slot: the count is for the first-token mass besides them"
    if not chosen.any():
        evidence["curve"] = _round(sm.reshape(-1, k_max).mean(0))
        note = "no head parks attention on the first tokens"
        if carried:
            note = (f"no head parks more than {threshold:g} on the first token: the learned sink takes the excess, "
                    "so a StreamingLLM cache needs no pinned token (sinkscope eval-stream --sinks 0,1,4 can confirm)")
            if skipped:
                note += (f"; {skipped['spread_out_heads_skipped']} heads put more than {threshold:g} on the first "
                         f"{k_max} tokens together ({skipped['spread_out_excess']:.3f} of it above chance), not "
                         "counted as a sink")
        return Recommendation(0, method, {**evidence, "note": note})
    curve = sm[chosen].mean(0)  # [K] cumulative mass on tokens 0..k-1
    excess = _excess(curve, chance)
    target = share * excess[-1]
    sinks = int(np.argmax(excess >= target - 1e-12)) + 1
    evidence.update({"curve": _round(curve), "excess_curve": _round(excess), "target": float(target),
                     "mass_at_recommended": float(curve[sinks - 1])})
    return Recommendation(sinks, method, evidence)


def _excess(curve: np.ndarray, chance: float) -> np.ndarray:
    """The above-chance curve e(k) of a cumulative mass curve c(k): sum over tokens j < k of max(0, m_j - u)."""
    return np.cumsum(np.clip(np.diff(curve, prepend=0.0) - chance, 0.0, None))


def attention_estimate(rec: Recommendation) -> Recommendation:
    """The attention-statistics recommendation in ``rec`` (:meth:`Recommendation.attention_estimate`)."""
    return rec.attention_estimate()


def recommend_from_stream_eval(stream_eval: Any, tolerance: float = DEFAULT_TOLERANCE, *,
                               attention: Recommendation | None = None) -> Recommendation:
    """Smallest sink count whose streaming perplexity is within ``tolerance`` of the best (the second version).

    ``stream_eval`` is a :class:`~sinkscope.streaming.evaluate.StreamEval` or its ``to_dict()``. A sink count
    qualifies when its streaming perplexity is at most ``(1 + tolerance) x`` the lowest streaming perplexity;
    ties therefore go to the smallest count. Only the evaluated counts are candidates. In a grid of windows the
    rule is applied at each window and the largest of those counts is recommended (it qualifies at every
    window); ``evidence["grid"]`` has each window's count and ``evidence["cheapest_cache"]`` the smallest
    ``S + W`` within ``tolerance`` of dense. ``attention`` (the first version, from attention statistics) is
    kept in ``evidence["attention_estimate"]``, with its perplexity when its count was evaluated.

    Raises:
        ConfigError: a negative tolerance, or no streaming result with a finite perplexity.
    """
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigError(f"tolerance must be a number >= 0 (0.05 = within 5% of the best), got {tolerance!r}")
    ev = stream_eval.to_dict(include_nll=False) if hasattr(stream_eval, "to_dict") else stream_eval
    results = ev.get("results") if isinstance(ev, dict) else None
    if not isinstance(results, list):
        raise ConfigError("not a stream evaluation: it has no results")
    main = ev.get("window")
    grid: dict[Any, dict[int, float]] = {}
    for r in results:
        if isinstance(r, dict) and r.get("mode") == "streaming" and isinstance(r.get("sinks"), int):
            v = r.get("ppl")
            if isinstance(v, (int, float)) and math.isfinite(v):
                grid.setdefault(r.get("window", main), {})[r["sinks"]] = float(v)
    if main not in grid:
        raise ConfigError("the stream evaluation has no streaming result with a finite perplexity to recommend from")

    def smallest(by: dict[int, float]) -> tuple[int, int, float]:
        best_s = min(by, key=lambda s: (by[s], s))
        return min(s for s, v in by.items() if v <= (1 + tolerance) * by[best_s]), best_s, by[best_s]

    ppl = grid[main]
    sinks, best_sinks, best = smallest(ppl)
    limit = (1 + tolerance) * best
    per_window = {w: smallest(by)[0] for w, by in grid.items()}
    sinks = max(per_window.values())

    def other(mode: str) -> float | None:
        return next((r.get("ppl") for r in results if isinstance(r, dict) and r.get("mode") == mode), None)

    text = ev.get("text") or {}
    targets = ev.get("targets") or {}
    evidence: dict[str, Any] = {
        "tolerance": float(tolerance), "best_sinks": best_sinks, "best_ppl": best, "limit_ppl": limit,
        "ppl_by_sinks": [{"sinks": s, "ppl": ppl[s], "within_tolerance": ppl[s] <= limit} for s in sorted(ppl)],
        "dense_ppl": other("dense"), "recompute_ppl": other("recompute"), "window": ev.get("window"),
        "text": text.get("name"), "tokens": ev.get("tokens"), "n_targets": targets.get("count"),
        "exact": (ev.get("settings") or {}).get("exact"),
        "streamed": (ev.get("settings") or {}).get("streaming"),
    }
    if len(grid) > 1:
        evidence["grid"] = [{"window": w, "sinks": per_window[w], "ppl_by_sinks": grid[w]} for w in sorted(grid)]
        dense = other("dense")
        if isinstance(dense, (int, float)) and math.isfinite(dense):
            ok = [(s + w, s, w, v) for w, by in grid.items() for s, v in by.items() if v <= (1 + tolerance) * dense]
            if ok:
                _, s, w, v = min(ok)
                evidence["cheapest_cache"] = {"sinks": s, "window": w, "cache_budget": s + w, "ppl": v,
                                              "dense_ppl": dense}
            else:
                evidence["cheapest_cache"] = None
    if attention is not None:
        first = attention_estimate(attention)
        evidence["attention_estimate"] = first.to_dict()
        evidence["attention_estimate_ppl"] = ppl.get(first.sinks)
        evidence["agrees_with_attention_estimate"] = first.sinks == sinks
    where = (f"windows {', '.join(map(str, sorted(grid)))}: the largest of each window's count" if len(grid) > 1
             else f"window {main}")
    method = (f"stream eval: smallest sink count whose streaming perplexity is within {tolerance:.0%} of the best "
              f"({where}; {targets.get('count', '?')} scored tokens of {text.get('name', 'a text')})")
    return Recommendation(sinks, method, evidence)


# ------------------------------------------------------------------------------------------------ analyze


def analyze(model: LoadedModel | str | Any, prompts: str | Prompt | Sequence[str | Prompt], *,
            tokenizer: Any = None, k_max: int = DEFAULT_K, max_tokens: int | None = None,
            layers: Sequence[int] | None = None, map_size: int | None = DEFAULT_MAP_SIZE,
            share: float = DEFAULT_SHARE, threshold: float = metrics.SINK_THRESHOLD, mode: str = "auto",
            progress: bool = True) -> SinkProfile:
    """Measure where ``model`` parks its attention on ``prompts`` and recommend a sink count.

    Args:
        model: a :class:`~sinkscope.models.LoadedModel`, a model source for :func:`sinkscope.load_model`
            (e.g. ``"smollm2-135m"``), or a Hugging Face causal LM (then pass ``tokenizer``).
        prompts: a text, a :class:`Prompt`, or a list of either.
        k_max: K, the number of leading tokens measured (queries before K are left out).
        max_tokens: truncate each prompt to this many tokens (default: the model's context). With rotary
            positions a longer value than the context is allowed: the model then runs past its trained
            positions, and every prompt that does is flagged ``beyond_context``.
        layers: analyse only these layers (default: all).
        map_size: keep each head's attention map pooled to at most this many bins per side (None: keep none).
        share: the recommendation's target share of the first-K mass.
        threshold: first-token mass above which a head is a sink head.
        mode: ``"maps"`` captures whole eager attention maps (T x T per head, for short prompts);
            ``"stats"`` computes the same numbers in statistics mode (probabilities formed block by block,
            no T x T map: long prompts); ``"auto"`` (default) uses statistics mode for prompts
            longer than ``STATS_FROM_TOKENS`` when the model supports it. Each prompt records its mode.
        progress: show a progress bar.

    Raises:
        ConfigError: bad settings, or a prompt that would not fit in memory (with the largest length that
            does); nothing has run then.
    """
    lm = _as_loaded(model, tokenizer)
    spec = lm.spec
    if not isinstance(k_max, int) or k_max < 1:
        raise ConfigError(f"k_max must be a positive integer, got {k_max!r}")
    if max_tokens is not None:
        if max_tokens < k_max + 1:
            raise ConfigError(f"max_tokens must be at least K + 1 = {k_max + 1}, got {max_tokens}")
        # Rotary and ALiBi positions extend past the trained context (the numbers then describe an untrained
        # regime, and each prompt says so); absolute position tables simply end.
        if spec.max_positions and max_tokens > spec.max_positions and spec.positional == "absolute":
            raise ConfigError(f"max_tokens {max_tokens} is beyond {spec.name}'s context of {spec.max_positions} "
                              f"({spec.positional} positions can't go further)")
    if not 0 < share <= 1:
        raise ConfigError(f"share must be in (0, 1], got {share}")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    scheme = attention_scheme(lm.model)
    unsupported = stats_supported(lm.model)
    if mode == "stats" and unsupported:
        raise ConfigError(unsupported)
    items = as_prompts(prompts)
    encoded = [encode_prompt(lm, p, max_tokens, k_max) for p in items]
    layer_list = scheme.select_layers(layers, ConfigError)
    modes = [_mode_for(mode, int(ids.shape[1]), unsupported) for ids in encoded]
    if "maps" in modes:
        maps_ok = scheme.support()["maps"]
        if not maps_ok.ok:
            raise ConfigError(maps_ok.message(scheme.family, "maps"))
    device = next(lm.model.parameters()).device
    for m, ids in zip(modes, encoded, strict=True):
        _check_memory(spec, int(ids.shape[1]), device, m, stats_ok=not unsupported, k_max=k_max,
                      map_size=map_size)

    n_stats = modes.count("stats")
    desc = f"analyzing {spec.name}" + (f" ({n_stats} long prompt{'s' * (n_stats > 1)} in statistics mode)"
                                       if n_stats else "")
    total = sum(len(layer_list) for _ in encoded)
    with _progress.progress(total, desc, "layer", enabled=progress) as bar:
        results = [_analyze_one(lm, p, ids, k_max, layer_list, map_size, bar, m)
                   for p, ids, m in zip(items, encoded, modes, strict=True)]
    ftm = np.mean([r.first_token_mass for r in results], axis=0)
    sm = np.mean([r.sink_mass for r in results], axis=0)
    chance = float(np.mean([metrics.chance_mass(r.n_tokens, k_max) for r in results]))
    rec = recommend_from_attention(sm, ftm, threshold=threshold, share=share, chance=chance,
                                   learned_sink_mass=_mean_learned_sink_mass(results))
    settings = {"dtype": spec.dtype, "device": spec.device, "max_tokens": max_tokens, "map_size": map_size,
                "mode": mode, "capture": _capture_text(modes), "local_window": metrics.LOCAL_WINDOW}
    if mode == "auto":
        settings["stats_from_tokens"] = STATS_FROM_TOKENS
        long = [ids for ids in encoded if int(ids.shape[1]) > STATS_FROM_TOKENS]
        if unsupported and long:  # long prompts that statistics mode would have taken: say why it didn't
            settings["stats_fallback"] = unsupported
    if "stats" in modes:  # what ran: the GPU's Triton kernel, the CPU's C pass or torch operations (and why)
        ran = list(dict.fromkeys(r.row_pass for r in results if r.row_pass))
        settings["row_pass"] = "; ".join(ran) if ran else _native.describe(device)
    cache = scheme.support()["cache"]
    return SinkProfile(model=spec, prompts=results, layers=layer_list, k_max=k_max, settings=settings,
                       recommendation=rec, threshold=threshold,
                       cache_refused=None if cache.ok else cache.message(scheme.family, "cache"))


_CAPTURE_TEXT = {"maps": "whole maps: eager attention, forward hooks, per-layer reduction",
                 "stats": "statistics mode: probabilities formed in blocks of query rows by a registered "
                          "attention function, exact per-head statistics, no T x T maps"}


def _capture_text(modes: list[str]) -> str:
    used = sorted(set(modes), key=modes.index)
    if len(used) == 1:
        return _CAPTURE_TEXT[used[0]]
    return "; ".join(f"{_CAPTURE_TEXT[m]} ({modes.count(m)} prompt{'s' * (modes.count(m) > 1)})" for m in used)


def _mode_for(mode: str, n_tokens: int, unsupported: str | None) -> str:
    if mode != "auto":
        return mode
    return "stats" if n_tokens > STATS_FROM_TOKENS and not unsupported else "maps"


def _as_loaded(model: Any, tokenizer: Any) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load_model(model)
    if tokenizer is None:
        raise ConfigError("pass tokenizer=... with a bare Hugging Face model, or pass a sinkscope.load_model(...)")
    from .models import spec_from_model

    name = getattr(model.config, "name_or_path", None) or type(model).__name__
    return LoadedModel(model, tokenizer, spec_from_model(model, tokenizer, str(name), str(name)))


def encode_prompt(lm: LoadedModel, prompt: Prompt, max_tokens: int | None, k_max: int = 0) -> torch.Tensor:
    """``[1, T]`` the token ids that :func:`analyze` measures for ``prompt``: its ``ids`` or its text tokenized,
    cut to ``max_tokens`` (default: the model's context); a prompt of K tokens or fewer is refused."""
    if prompt.ids is not None:
        ids = torch.tensor([list(prompt.ids)], dtype=torch.long)
    else:
        ids = lm.tokenizer(prompt.text, return_tensors="pt").input_ids
    limit = max_tokens or lm.spec.max_positions
    if limit and ids.shape[1] > limit:
        ids = ids[:, :limit]
    if ids.shape[1] < k_max + 1:
        raise PromptError(f"prompt {prompt.name!r} has {ids.shape[1]} tokens; it needs at least K + 1 = "
                          f"{k_max + 1} (give a longer text or a smaller --k-max)")
    return ids


# Eager attention holds about four [heads, T, T] float32 tensors at once at its peak (scores, masked
# scores, probabilities, and the pooling pass over them).
_EAGER_COPIES = 4
# Statistics mode's peak beyond the weights, per token: the forward's own activations (hidden states, the MLP's
# up/gate projections, q/k/v) in float32, about this many hidden-size vectors' worth. Measured on SmolLM2 the
# whole peak stayed below this estimate (0.7 GB above the loaded model at 16384 tokens, estimate 1.1 GB).
_STATS_ACTIVATION_VECTORS = 24


def capture_bytes(spec: ModelSpec, n_tokens: int, mode: str = "maps", map_size: int | None = DEFAULT_MAP_SIZE,
                  k_max: int = DEFAULT_K, block_bytes: int = CPU_BLOCK_BYTES) -> int:
    """Estimated peak memory, beyond the weights, of measuring a prompt of ``n_tokens`` in ``mode``.

    ``maps``: one layer's eager attention maps. ``stats``: the forward's activations, statistics mode's
    per-row keeps and float32 copies of queries and keys, the attention mask of sliding-window layers (a
    T x T boolean that transformers builds), and the two blocks of query rows.
    """
    if mode == "maps":
        return _EAGER_COPIES * spec.n_heads * n_tokens * n_tokens * 4
    hidden = spec.n_heads * spec.head_dim
    keeps = spec.n_heads * (((map_size or 0) + 1) * 8 + (k_max + metrics.LOCAL_WINDOW + 1) * 4)
    copies = (spec.n_heads + spec.n_kv_heads) * spec.head_dim * 4
    per_token = _STATS_ACTIVATION_VECTORS * hidden * 4 + keeps + copies
    mask = n_tokens * n_tokens if spec.sliding_window and n_tokens > spec.sliding_window else 0
    return per_token * n_tokens + mask + 2 * block_bytes


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # unknown: don't guess


def _check_memory(spec: ModelSpec, n_tokens: int, device: torch.device, mode: str = "maps",
                  stats_ok: bool = False, k_max: int = DEFAULT_K, map_size: int | None = DEFAULT_MAP_SIZE) -> None:
    block = default_block_bytes(device)

    def estimate(n: int) -> int:
        return capture_bytes(spec, n, mode, map_size, k_max, block)

    need, free = estimate(n_tokens), _available_bytes(device)
    if free is None or need <= 0.9 * free:
        return
    lo, hi = 0, n_tokens  # the largest length that fits: capture_bytes grows with the length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if estimate(mid) <= 0.9 * free else (lo, mid - 1)
    fits = lo
    hint = (f"pass --max-tokens {fits} or less" if fits > k_max else
            f"not even K + 1 = {k_max + 1} tokens fit: free some memory, or use a smaller model or dtype")
    if mode == "maps" and stats_ok:
        hint += " (or use statistics mode: --mode stats, which needs no T x T maps)"
    raise ConfigError(f"measuring attention over {n_tokens} tokens in {mode} mode needs about "
                      f"{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free on {device}; {hint}")


def _analyze_one(lm: LoadedModel, prompt: Prompt, ids: torch.Tensor, k_max: int, layers: list[int],
                 map_size: int | None, bar: Any, mode: str = "maps") -> PromptResult:
    spec, t = lm.spec, ids.shape[1]
    n_l, n_h = len(layers), spec.n_heads
    ftm, ent, local = np.zeros((n_l, n_h)), np.zeros((n_l, n_h)), np.zeros((n_l, n_h))
    sm = np.zeros((n_l, n_h, k_max))
    # Learned sinks (gpt-oss): the mass on the sink logit, and the entropy counts the sink as an outcome.
    learned = attention_scheme(lm.model).learned_sinks
    lsm = np.zeros((n_l, n_h)) if learned else None
    received = np.zeros(t)
    by_layer = np.zeros((n_l, t))  # each layer's received mass, summed over its heads
    passes: list[str] = []
    row_of = {layer: i for i, layer in enumerate(layers)}
    pooled: list[Any] = [None] * n_l
    bins: list[tuple[int, int]] = []

    def on_map(layer: int, probs: torch.Tensor) -> None:
        nonlocal bins
        p, i = probs[0], row_of[layer]
        ftm[i] = metrics.first_token_mass(p, k_max)
        sm[i] = metrics.sink_mass(p, k_max)
        ent[i] = metrics.entropy(p, k_max, learned_sink=learned)
        local[i] = metrics.local_mass(p, k_max)
        if lsm is not None:
            lsm[i] = metrics.learned_sink_mass(p, k_max)
        by_layer[i] = metrics.received_mass(p, k_max).total
        received[:] += by_layer[i]
        if map_size:
            m, bins = pool_map(p, map_size)
            pooled[i] = m.cpu().numpy()
        bar.update(1)

    def on_stats(layer: int, st: metrics.LayerStats) -> None:
        nonlocal bins
        i = row_of[layer]
        ftm[i], sm[i], ent[i] = st.first_token_mass, st.sink_mass, st.entropy
        local[i] = np.nan if st.local_mass is None else st.local_mass
        if lsm is not None and st.learned_sink_mass is not None:
            lsm[i] = st.learned_sink_mass
        by_layer[i] = st.received.total
        received[:] += by_layer[i]
        if map_size:
            pooled[i], bins = st.pooled, st.bins or []
        if st.row_pass and st.row_pass not in passes:
            passes.append(st.row_pass)
        bar.update(1)

    base = getattr(lm.model, "base_model", None) or lm.model  # skip the LM head: logits are T x vocab floats
    device = next(lm.model.parameters()).device
    geometry: dict[int, metrics.KeyGeometry] = {}
    geometry_why = stats_supported(lm.model)  # key geometry needs the attention interface, as statistics mode
    if mode == "stats":
        block = capture_stats(lm.model, k_max=k_max, layers=layers, map_size=map_size, on_layer=on_stats,
                              on_geometry=geometry.__setitem__)
    else:
        block = capture(lm.model, layers=layers, keep_maps=False, on_layer=on_map)
    with block, capture_activations(lm.model) as acts, capture_head_outputs(lm.model, k_max=k_max) as heads, \
            torch.no_grad():
        base(input_ids=ids.to(device), use_cache=False)
    if mode != "stats" and geometry_why is None:  # whole maps ran eager: one more (SDPA) forward for the geometry
        with capture_geometry(lm.model, k_max=k_max, layers=layers) as geo, torch.no_grad():
            base(input_ids=ids.to(device), use_cache=False)
        geometry = geo.layers
    geo_arrays: dict[str, np.ndarray] = {}
    if geometry_why is None:
        missing = [layer for layer in layers if layer not in geometry]
        if missing:
            geometry_why = f"layers {missing[:5]} did not reach the attention function"
        else:
            for name in GEOMETRY_FIELDS:
                geo_arrays[name] = np.stack([getattr(geometry[layer], name) for layer in layers])
    output_norm = first_row = None
    heads_why = heads.unavailable
    if not heads_why:
        missing = [layer for layer in layers if layer not in heads.layers]
        if missing:
            heads_why = f"layers {missing[:5]} did not reach their output projection"
        else:
            output_norm = np.stack([heads.layers[layer].output_norm for layer in layers])
            first_row = np.stack([heads.layers[layer].first_row_norm for layer in layers])
    activations = None
    if acts.layers and not acts.unavailable:
        per_layer = [acts.layers[i] for i in sorted(acts.layers)]
        activations = MassiveActivations(norms=np.stack([a.norms for a in per_layer]).astype(np.float32),
                                         median=np.array([a.median for a in per_layer]),
                                         top_values=np.stack([a.top_values for a in per_layer]),
                                         top_tokens=np.stack([a.top_tokens for a in per_layer]),
                                         top_dims=np.stack([a.top_dims for a in per_layer]))

    id_list = ids[0].tolist()
    tokens = token_texts(lm.tokenizer, id_list)
    positions = _sink_positions(received, t, k_max, n_l * n_h, tokens, id_list, lm.tokenizer.bos_token_id)
    secondary = _secondary_sinks(by_layer, t, k_max, n_h, layers, tokens, id_list, lm.tokenizer.bos_token_id)
    attention = None
    if map_size:
        missing = [layers[i] for i, m in enumerate(pooled) if m is None]
        if missing:
            raise CaptureError(f"layers {missing[:5]} produced no attention during the forward pass")
        maps = np.stack(pooled).astype(np.float32)
        labels = [_bin_label(tokens, a, b) for a, b in bins]
        attention = AttentionMaps(maps=maps, bins=bins, labels=labels)
    return PromptResult(name=prompt.name, n_tokens=t, tokens=tokens, first_token_mass=ftm, sink_mass=sm,
                        entropy=ent, sink_positions=positions, learned_sink_mass=lsm, attention=attention,
                        capture=mode, beyond_context=bool(spec.max_positions and t > spec.max_positions),
                        row_pass="; ".join(passes) or None, activations=activations,
                        activations_unavailable=acts.unavailable, output_norm=output_norm,
                        first_row_norm=first_row, head_outputs_unavailable=heads_why,
                        geometry=geo_arrays or None, geometry_unavailable=geometry_why,
                        secondary_sinks=secondary, local_mass=None if np.isnan(local).any() else local)


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Readable text of each token; byte-level pieces of a multi-byte character keep their raw form."""
    out = []
    for i in ids:
        text = tokenizer.decode([i])
        if "\ufffd" in text:  # half of a UTF-8 character: "\ufffd" says nothing, the raw piece does
            text = str(tokenizer.convert_ids_to_tokens(i))
        out.append(text)
    return out


def _sink_positions(received: np.ndarray, t: int, k_max: int, n_pairs: int, tokens: list[str],
                    ids: list[int], bos_id: int | None) -> list[SinkPosition]:
    queries = metrics.distant_queries(t, k_max)
    # Rank only positions seen by enough distant queries: a mean over two queries is noise, not a sink.
    min_q = min(16, int(queries.max())) if queries.max() > 0 else 1
    ok = queries >= max(1, min_q)
    mean = np.where(ok, received / np.maximum(queries * n_pairs, 1), 0.0)
    uniform = metrics.uniform_share(t, k_max)
    order = [int(j) for j in np.argsort(-mean) if ok[j]][:N_SINK_POSITIONS]
    return [SinkPosition(position=j, token=tokens[j],
                         kind=metrics.token_kind(tokens[j], is_bos=(j == 0 and ids[0] == bos_id)),
                         received=float(mean[j]), vs_uniform=float(mean[j] / uniform[j]) if uniform[j] else 0.0)
            for j in order]


N_SECONDARY = 10  # secondary sinks listed per prompt


def _secondary_sinks(by_layer: np.ndarray, t: int, k_max: int, n_heads: int, layers: list[int], tokens: list[str],
                     ids: list[int], bos_id: int | None) -> list[SecondarySink]:
    ok, mean = metrics.secondary_sinks(by_layer, t, k_max, n_heads)
    uniform = metrics.uniform_share(t, k_max)
    out = []
    for j in np.nonzero(ok.any(axis=0))[0]:
        rows = np.nonzero(ok[:, j])[0]
        best = int(rows[np.argmax(mean[rows, j])])
        out.append(SecondarySink(position=int(j), token=tokens[j],
                                 kind=metrics.token_kind(tokens[j], is_bos=(ids[j] == bos_id)),
                                 layers=[layers[int(r)] for r in rows], peak=float(mean[best, j]),
                                 peak_layer=layers[best], vs_uniform=float(mean[best, j] / uniform[j])))
    return sorted(out, key=lambda s: -s.peak)[:N_SECONDARY]


def _bin_label(tokens: list[str], a: int, b: int) -> str:
    if b - a == 1:
        return f"{a}: {tokens[a]!r}"
    return f"{a}-{b - 1}"


__all__ = [
    "AttentionMaps",
    "PromptResult",
    "Recommendation",
    "SinkPosition",
    "SinkProfile",
    "analyze",
    "recommend_from_attention",
]
