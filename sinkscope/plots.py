"""Every plotly figure sinkscope shows: the CLI report, ``SinkProfile.plot_*`` in notebooks and the dashboard.

Functions here only select and lay out what :mod:`sinkscope.analysis` measured (plus trivial means over heads);
metrics live in :mod:`sinkscope.metrics` and :mod:`sinkscope.analysis`. Text that comes from a model or a
prompt (token text, prompt names) goes through :func:`label_text`, which makes control characters visible and
escapes the characters that plotly would read as markup.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from . import metrics
from .errors import ConfigError

if TYPE_CHECKING:
    from .analysis import PromptResult, SinkProfile

TEMPLATE = "plotly_white"
FONT = dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif", size=12)
MASS_SCALE = "Viridis"  # 0..1 attention mass
ENTROPY_SCALE = "Cividis"
SINK_COLOR = "#d62728"
MAX_TICKS = 12  # most tick labels an attention-map axis shows; the hover always has every bin's label
TICK_CHARS = 18  # tick labels longer than this are cut (hover shows them whole)


# ----------------------------------------------------------------------------------------------- helpers


def visible_token(text: str) -> str:
    """A token as a quoted literal with newlines, tabs and other control characters shown as escapes.

    ``"\\n"`` becomes ``'\\\\n'`` so that a newline token is visible in a chart or table, and leading spaces
    stay visible between the quotes.
    """
    return repr(text)


def label_text(text: str) -> str:
    """``text`` made safe for plotly labels: plotly renders a subset of HTML in text, so escape ``<>&``."""
    return html.escape(text, quote=False)


def _short(text: str, n: int = TICK_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _layout(fig: go.Figure, title: str, height: int, **kwargs: object) -> go.Figure:
    kwargs.setdefault("margin", dict(l=70, r=30, t=60, b=55))
    fig.update_layout(template=TEMPLATE, title=dict(text=title, x=0.01, xanchor="left"), height=height,
                      font=FONT, **kwargs)
    return fig


def _prompt(profile: SinkProfile, prompt: int | str) -> PromptResult:
    try:
        return profile.prompt(prompt)
    except IndexError:
        raise ConfigError(f"prompt index {prompt} out of range: the profile has {len(profile.prompts)} "
                          f"prompt(s)") from None


def _heatmap_height(n_layers: int) -> int:
    return int(min(1100, max(320, 24 * n_layers + 130)))


def _layer_head_heatmap(profile: SinkProfile, z: np.ndarray, *, title: str, colorbar: str, value_name: str,
                        value_format: str, colorscale: str, zmin: float | None, zmax: float | None) -> go.Figure:
    n_heads = z.shape[1]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(profile.layers), colorscale=colorscale, zmin=zmin, zmax=zmax,
        colorbar=dict(title=dict(text=colorbar, side="right"), thickness=14),
        hovertemplate=f"layer %{{y}}<br>head %{{x}}<br>{value_name} %{{z:{value_format}}}<extra></extra>",
        xgap=1, ygap=1,
    ))
    _layout(fig, title, _heatmap_height(len(profile.layers)))
    fig.update_xaxes(title_text="head", type="category", tickmode="array", tickvals=list(range(n_heads)),
                     showgrid=False)
    fig.update_yaxes(title_text="layer (first layer at top)", type="category", autorange="reversed",
                     showgrid=False)
    types = profile.model.layer_types
    if types and len(set(types)) > 1:  # hybrid models (Gemma-3): say which layers see the whole context
        fig.update_yaxes(tickmode="array", tickvals=list(profile.layers),
                         ticktext=[f"{layer} global" if types[layer] == "full_attention" else str(layer)
                                   for layer in profile.layers],
                         title_text="layer (first at top; global = full attention, others sliding)")
    return fig


# ------------------------------------------------------------------------------------------------ figures


def first_token_heatmap(profile: SinkProfile) -> go.Figure:
    """Layer x head heatmap of the mean first-token mass (colour range 0..1); sink heads are ringed.

    Rows are the analysed layers (``profile.layers``, first layer at the top), columns the query heads.
    """
    ftm = np.asarray(profile.first_token_mass, dtype=float)
    thr = profile.threshold
    fig = _layer_head_heatmap(
        profile, ftm, title="Attention on the first token, per layer and head",
        colorbar=f"first-token mass<br>(sink head: &gt; {thr:g})", value_name="first-token mass",
        value_format=".3f", colorscale=MASS_SCALE, zmin=0.0, zmax=1.0)
    rows, heads = np.nonzero(ftm > thr)
    if len(rows):
        fig.add_trace(go.Scatter(
            x=heads.tolist(), y=[profile.layers[int(r)] for r in rows], mode="markers",
            marker=dict(symbol="circle-open", size=9, color="white", line=dict(width=2)),
            name=f"sink head (&gt; {thr:g})", hoverinfo="skip", showlegend=True))
    fig.update_layout(legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"))
    return fig


def sink_mass_curves(profile: SinkProfile) -> go.Figure:
    """Mass on the first k tokens against k (1..K): one thin line per layer (mean over heads), the sink-head
    curve the recommendation rests on in bold, and a vertical marker at the recommended k."""
    sm = np.asarray(profile.sink_mass, dtype=float)  # [L, H, K]
    k_max = sm.shape[-1]
    ks = list(range(1, k_max + 1))
    n_l = len(profile.layers)
    colors = _layer_colors(profile.layers)
    fig = go.Figure()
    for i, layer in enumerate(profile.layers):
        fig.add_trace(go.Scatter(
            x=ks, y=sm[i].mean(axis=0), mode="lines", line=dict(width=1, color=colors[i]), opacity=0.75,
            name=f"layer {layer}", legendgroup="layers", showlegend=False,
            hovertemplate=f"layer {layer}<br>k = %{{x}}<br>mass on first k %{{y:.3f}}<extra></extra>"))
    if n_l > 1:  # a colour bar that says which colour is which layer, instead of a legend with L entries
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
            marker=dict(colorscale=MASS_SCALE, cmin=min(profile.layers), cmax=max(profile.layers),
                        color=[min(profile.layers)], showscale=True,
                        colorbar=dict(title=dict(text="layer<br>(mean over heads)", side="right"),
                                      thickness=12, len=0.6, y=0.3))))
    rec = profile.recommendation
    curve = rec.evidence.get("curve")
    if curve is None:
        chosen = np.asarray(profile.first_token_mass) > profile.threshold
        curve = sm[chosen].mean(axis=0).tolist() if chosen.any() else None
    if curve is not None:
        basis = rec.evidence.get("heads_basis", f"first_token_mass > {profile.threshold:g}")
        used = rec.evidence.get("heads_used")
        name = "sink heads" + (f" ({used})" if used is not None else "")
        fig.add_trace(go.Scatter(
            x=ks[: len(curve)], y=list(curve), mode="lines+markers", line=dict(width=4, color=SINK_COLOR),
            marker=dict(size=7), name=f"mean over {name}",
            hovertemplate=f"mean over {label_text(name)}<br>k = %{{x}}<br>mass on first k %{{y:.3f}}"
                          f"<br><i>{label_text(str(basis))}</i><extra></extra>"))
    excess = rec.evidence.get("excess_curve")
    if excess is not None:
        fig.add_trace(go.Scatter(
            x=ks[: len(excess)], y=list(excess), mode="lines+markers", line=dict(width=2, dash="dash",
                                                                                color=SINK_COLOR),
            marker=dict(size=5), name="above chance (what the recommendation reads)",
            hovertemplate="above-chance mass on first k<br>k = %{x}<br>%{y:.3f}<extra></extra>"))
    target = rec.evidence.get("target")
    if isinstance(target, (int, float)) and math.isfinite(target):
        share = rec.evidence.get("share")
        what = "above-chance " if excess is not None else ""
        text = f"target {share:.0%} of {what}first-{k_max} mass" if isinstance(share, (int, float)) else "target"
        fig.add_hline(y=float(target), line=dict(dash="dot", color=SINK_COLOR, width=1),
                      annotation=dict(text=text, font=dict(color=SINK_COLOR, size=11)),
                      annotation_position="bottom right")
    if 1 <= rec.sinks <= k_max:
        fig.add_vline(x=rec.sinks, line=dict(dash="dash", color="#333", width=2),
                      annotation=dict(text=f"recommended: {rec.sinks} sink{'s' if rec.sinks != 1 else ''}",
                                      font=dict(size=12)), annotation_position="top right")
    else:
        fig.add_annotation(text=f"recommended: {rec.sinks} sinks", xref="paper", yref="paper", x=0.02, y=0.98,
                           showarrow=False, font=dict(size=12))
    _layout(fig, "Mass on the first k tokens", 430,
            legend=dict(orientation="h", x=0, y=1.02, yanchor="bottom"))
    fig.update_xaxes(title_text="k (number of leading tokens)", tickmode="array", tickvals=ks, range=[0.7, k_max + 0.3])
    fig.update_yaxes(title_text="attention mass on tokens 0..k-1", range=[0, 1.02], tickformat=".0%")
    return fig


def attention_map(profile: SinkProfile, layer: int, head: int, prompt: int | str = 0,
                  log: bool = False) -> go.Figure:
    """One head's pooled attention map on one prompt: queries down (query 0 at top), keys across.

    Each axis position is a bin of tokens (a single token shows as ``12: ' the'``, a range as ``40-55``).
    ``log=True`` shows log10 of the attention (clipped at 1e-6), which makes the non-sink structure visible.

    Raises:
        ConfigError: the prompt has no maps (analysed with ``map_size=None``), or ``layer``/``head`` is not
            in the analysis.
    """
    p = _prompt(profile, prompt)
    if p.attention is None:
        raise ConfigError(f"prompt {p.name!r} has no attention maps: analyse with map_size set "
                          f"(e.g. analyze(..., map_size=96) or --map-size 96)")
    row = profile.layer_row(layer)
    maps = p.attention.maps
    n_heads = maps.shape[1]
    if not isinstance(head, (int, np.integer)) or not 0 <= head < n_heads:
        raise ConfigError(f"head {head} out of range: layer {layer} has heads 0..{n_heads - 1}")
    values = np.asarray(maps[row, head], dtype=float)
    labels = [label_text(lb) for lb in p.attention.labels]
    if log:
        z = np.log10(np.clip(values, 1e-6, None))
        zmin, zmax = -6.0, 0.0
        cbar = "log10(attention)<br>(clipped at 1e-6)"
        hover = "log10 %{z:.2f} (attention %{customdata:.2e})"
    else:
        z = values
        zmin, zmax = 0.0, float(values.max()) if values.size and values.max() > 0 else 1.0
        cbar = "attention"
        hover = "attention %{z:.4f}"
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, customdata=values, colorscale="Viridis", zmin=zmin, zmax=zmax,
        colorbar=dict(title=dict(text=cbar, side="right"), thickness=12),
        hovertemplate=f"query %{{y}}<br>key %{{x}}<br>{hover}<extra></extra>"))
    n = len(labels)
    stride = max(1, math.ceil(n / MAX_TICKS))
    tickvals = labels[::stride]
    ticktext = [_short(t) for t in tickvals]
    title = f"Layer {layer}, head {head} · {label_text(_short(p.name, 30))}" + (" (log)" if log else "")
    _layout(fig, title, 540, margin=dict(l=120, r=20, t=60, b=110))
    fig.update_xaxes(title_text="key (attended-to token)", type="category", tickmode="array", tickvals=tickvals,
                     ticktext=ticktext, tickangle=-60, tickfont=dict(size=10), showgrid=False)
    fig.update_yaxes(title_text="query", type="category", autorange="reversed", tickmode="array",
                     tickvals=tickvals, ticktext=ticktext, tickfont=dict(size=10), showgrid=False)
    return fig


def sink_positions_chart(profile: SinkProfile, prompt: int | str = 0) -> go.Figure:
    """Horizontal bars: the positions that draw the most attention from distant queries (strongest on top),
    labelled with position, token text (control characters escaped) and kind; hover gives "x times uniform"."""
    p = _prompt(profile, prompt)
    pos = list(p.sink_positions)
    labels = [f"#{s.position} {label_text(_short(visible_token(s.token), 24))} · {s.kind}" for s in pos]
    tokens = [label_text(visible_token(s.token)) for s in pos]
    fig = go.Figure(go.Bar(
        x=[s.received for s in pos], y=labels, orientation="h", text=[f"{s.vs_uniform:.1f}x uniform" for s in pos],
        textposition="auto", insidetextanchor="start", cliponaxis=False,
        marker=dict(color=[_kind_color(s.kind) for s in pos]),
        customdata=[[s.vs_uniform, s.position, s.kind, t] for s, t in zip(pos, tokens, strict=True)],
        hovertemplate="position %{customdata[1]}: %{customdata[3]} (%{customdata[2]})<br>received %{x:.4f}"
                      "<br>%{customdata[0]:.1f} x uniform<extra></extra>"))
    title = f"Sink positions · {label_text(_short(p.name, 30))} ({p.n_tokens} tokens)"
    _layout(fig, title, max(260, 34 * len(pos) + 110), margin=dict(l=150, r=30, t=60, b=50))
    fig.update_xaxes(title_text=f"attention received from queries ≥ {metrics.LOCAL_WINDOW} tokens later",
                     rangemode="tozero")
    fig.update_yaxes(autorange="reversed", type="category")
    if not pos:
        fig.add_annotation(text="no positions ranked (prompt too short)", xref="paper", yref="paper", x=0.5,
                           y=0.5, showarrow=False)
    return fig


def entropy_heatmap(profile: SinkProfile) -> go.Figure:
    """Layer x head heatmap of the mean attention entropy in nats (low: focused heads, high: spread out)."""
    ent = np.asarray(profile.entropy, dtype=float)
    return _layer_head_heatmap(profile, ent, title="Attention entropy per layer and head", colorbar="entropy (nats)",
                               value_name="entropy", value_format=".2f", colorscale=ENTROPY_SCALE, zmin=0.0,
                               zmax=None)


def per_prompt_sink_rate(profile: SinkProfile) -> go.Figure:
    """Bars: the sink rate (share of heads above the threshold) on each prompt; dotted: their mean."""
    names = [label_text(_short(p.name, 30)) for p in profile.prompts]
    rates = [metrics.sink_rate(p.first_token_mass, profile.threshold) for p in profile.prompts]
    fig = go.Figure(go.Bar(
        x=names, y=rates, text=[f"{r:.0%}" for r in rates], textposition="outside", cliponaxis=False,
        marker=dict(color="#4c78a8"), customdata=[p.n_tokens for p in profile.prompts],
        hovertemplate="%{x}<br>sink rate %{y:.1%}<br>%{customdata} tokens<extra></extra>"))
    fig.add_hline(y=profile.sink_rate, line=dict(dash="dot", color=SINK_COLOR, width=1.5),
                  annotation=dict(text=f"mean<br>{profile.sink_rate:.1%}", font=dict(color=SINK_COLOR), align="left"),
                  annotation_position="right")
    _layout(fig, f"Sink rate per prompt (heads with first-token mass &gt; {profile.threshold:g})", 380,
            margin=dict(l=70, r=80, t=60, b=55))
    fig.update_xaxes(type="category", title_text="prompt")
    fig.update_yaxes(title_text="sink rate", range=[0, 1.08], tickformat=".0%")
    return fig


# -------------------------------------------------------------------------------------------- small bits


_KIND_COLORS = {"bos": "#d62728", "newline": "#ff7f0e", "space": "#9467bd", "punct": "#2ca02c", "word": "#4c78a8"}


def _kind_color(kind: str) -> str:
    return _KIND_COLORS.get(kind, "#7f7f7f")


def _layer_colors(layers: list[int]) -> list[str]:
    """One colour of :data:`MASS_SCALE` per layer, placed by layer number so it matches the layer colour bar."""
    from plotly.colors import sample_colorscale

    lo, hi = min(layers), max(layers)
    span = (hi - lo) or 1
    return sample_colorscale(MASS_SCALE, [(layer - lo) / span for layer in layers])


__all__ = ["attention_map", "entropy_heatmap", "first_token_heatmap", "label_text", "per_prompt_sink_rate",
           "sink_mass_curves", "sink_positions_chart", "visible_token"]
