"""Every plotly figure sinkscope shows: the CLI report, ``SinkProfile.plot_*`` in notebooks and the dashboard.

Functions here only select and lay out what :mod:`sinkscope.analysis` measured (plus trivial means over heads);
metrics live in :mod:`sinkscope.metrics` and :mod:`sinkscope.analysis`. Text that comes from a model or a
prompt (token text, prompt names) goes through :func:`label_text`, which makes control characters visible and
escapes the characters that plotly would read as markup.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go

from . import metrics
from .errors import ConfigError

if TYPE_CHECKING:
    from .analysis import PromptResult, SinkProfile
    from .compare import AtlasEntry

TEMPLATE = "plotly_white"
FONT = dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif", size=12)
MASS_SCALE = "Viridis"  # 0..1 attention mass
ENTROPY_SCALE = "Cividis"
SINK_COLOR = "#d62728"
STREAM_COLOR = "#1f77b4"  # the stream-validated recommendation
LIVE_POINTS = 2000  # most tokens a live stream chart draws per trace (longer streams are thinned)
DENSE_COLOR = "#222222"
RECOMPUTE_COLOR = "#7f7f7f"
STREAM_SCALE = "Plasma"  # streaming lines, by sink count
MAX_LINE_POINTS = 1500  # rolling-NLL lines are thinned to at most this many points each
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
                        value_format: str, colorscale: str, zmin: float | None, zmax: float | None,
                        also: tuple[str, np.ndarray] | None = None) -> go.Figure:
    """``also``: (name, [L, H] values) of a second per-head number shown in the hover (3 decimals)."""
    n_heads = z.shape[1]
    extra = f"<br>{also[0]} %{{customdata:.3f}}" if also is not None else ""
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(profile.layers), colorscale=colorscale, zmin=zmin, zmax=zmax,
        colorbar=dict(title=dict(text=colorbar, side="right"), thickness=14),
        customdata=None if also is None else np.asarray(also[1], dtype=float),
        hovertemplate=f"layer %{{y}}<br>head %{{x}}<br>{value_name} %{{z:{value_format}}}{extra}<extra></extra>",
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


def _ring_heads(fig: go.Figure, profile: SinkProfile, above: np.ndarray, name: str) -> go.Figure:
    """Ring the cells where ``above`` ([L, H] booleans) holds; a legend entry says what the rings mean."""
    rows, heads = np.nonzero(above)
    if len(rows):
        fig.add_trace(go.Scatter(
            x=heads.tolist(), y=[profile.layers[int(r)] for r in rows], mode="markers",
            marker=dict(symbol="circle-open", size=9, color="white", line=dict(width=2)),
            name=name, hoverinfo="skip", showlegend=True))
    fig.update_layout(legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"))
    return fig


def first_token_heatmap(profile: SinkProfile) -> go.Figure:
    """Layer x head heatmap of the mean first-token mass (colour range 0..1); sink heads are ringed.

    Rows are the analysed layers (``profile.layers``, first layer at the top), columns the query heads. For a
    model with learned sinks the hover also gives each head's learned-sink mass.
    """
    ftm = np.asarray(profile.first_token_mass, dtype=float)
    thr = profile.threshold
    lsm = profile.learned_sink_mass
    fig = _layer_head_heatmap(
        profile, ftm, title="Attention on the first token, per layer and head",
        colorbar=f"first-token mass<br>(sink head: &gt; {thr:g})", value_name="first-token mass",
        value_format=".3f", colorscale=MASS_SCALE, zmin=0.0, zmax=1.0,
        also=None if lsm is None else ("learned-sink mass", lsm))
    return _ring_heads(fig, profile, ftm > thr, f"sink head (&gt; {thr:g})")


def learned_sink_heatmap(profile: SinkProfile) -> go.Figure:
    """Layer x head heatmap of the mean learned-sink mass (colour range 0..1), the look of
    :func:`first_token_heatmap`; heads that park more than the threshold on the learned sink are ringed.

    The learned sink (gpt-oss) is the softmax's extra outcome that belongs to no token, so a streaming cache
    needs no slot for it. The hover also gives each head's first-token mass.

    Raises:
        ConfigError: the profile's model has no learned sinks.
    """
    lsm = profile.learned_sink_mass
    if lsm is None:
        raise ConfigError(f"{profile.model.name} has no learned sinks (no per-head sink logits, as gpt-oss has): "
                          f"there is no learned-sink mass to plot; plot_heatmap() shows the first-token mass")
    lsm = np.asarray(lsm, dtype=float)
    thr = profile.threshold
    fig = _layer_head_heatmap(
        profile, lsm, title="Attention on the learned sink (no token, no cache slot), per layer and head",
        colorbar=f"learned-sink mass<br>(ringed: &gt; {thr:g})", value_name="learned-sink mass",
        value_format=".3f", colorscale=MASS_SCALE, zmin=0.0, zmax=1.0,
        also=("first-token mass", np.asarray(profile.first_token_mass, dtype=float)))
    return _ring_heads(fig, profile, lsm > thr, f"learned-sink head (&gt; {thr:g})")


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
    validated = profile.recommendation
    rec = validated.attention_estimate()  # this figure shows the attention statistics the first version reads
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
    what = "attention estimate" if validated is not rec else "recommended"
    same = validated is not rec and validated.sinks == rec.sinks  # one label for both lines: two would overlap
    if 1 <= rec.sinks <= k_max:
        label = (f"{rec.sinks} sink{'s' if rec.sinks != 1 else ''}: attention estimate, validated by streaming"
                 if same else f"{what}: {rec.sinks} sink{'s' if rec.sinks != 1 else ''}")
        fig.add_vline(x=rec.sinks, line=dict(dash="dash", color="#333", width=2),
                      annotation=dict(text=label, font=dict(size=12)), annotation_position="top right")
    else:
        fig.add_annotation(text=f"{what}: {rec.sinks} sinks", xref="paper", yref="paper", x=0.02, y=0.98,
                           showarrow=False, font=dict(size=12))
    if validated is not rec:  # the stream-validated count, when the recommendation was validated
        text = f"validated by streaming: {validated.sinks} sink{'s' if validated.sinks != 1 else ''}"
        if 1 <= validated.sinks <= k_max:
            fig.add_vline(x=validated.sinks, line=dict(dash="solid", color=STREAM_COLOR, width=2),
                          annotation=None if same else dict(text=text, font=dict(size=12, color=STREAM_COLOR)),
                          annotation_position="bottom right")
        else:
            fig.add_annotation(text=text, xref="paper", yref="paper", x=0.02, y=0.9, showarrow=False,
                               font=dict(size=12, color=STREAM_COLOR))
    # The legend below the axis: above the plot it sat on the title and the vertical lines' labels.
    _layout(fig, "Mass on the first k tokens", 470, legend=dict(orientation="h", x=0, y=-0.2, yanchor="top"),
            margin=dict(l=70, r=30, t=60, b=110))
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
    if p.learned_sink_mass is not None:  # its rows sum to 1 minus this: the rest went to no token
        title += f" · learned sink {float(p.learned_sink_mass[row, head]):.3f}"
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


def massive_activations(profile: SinkProfile, prompt: int | str = 0) -> go.Figure:
    """Residual norms per decoder layer (log scale): the first token's, the median token's and the largest;
    layers with a massive activation (>= 1000x the median magnitude, Sun et al. 2024) marked, hover gives the
    largest activation, its token and dimension."""
    p = _prompt(profile, prompt)
    acts = p.activations
    fig = go.Figure()
    if acts is None:
        why = p.activations_unavailable or "none were recorded for this prompt"
        fig.add_annotation(text=f"no residual norms: {label_text(why)}", xref="paper", yref="paper", x=0.5,
                           y=0.5, showarrow=False)
        return _layout(fig, "Massive activations", 300)
    layers = list(range(len(acts.median)))
    first, median, top = acts.norms[:, 0], acts.median_norm, acts.norms.max(axis=1)
    where = acts.norms.argmax(axis=1)
    hover = [f"largest activation {v:.4g} at token {int(t)} {label_text(_short(visible_token(p.tokens[int(t)]), 16))}"
             f", dim {int(d)}: {r:.3g} x the median magnitude" for v, t, d, r in
             zip(acts.top_values[:, 0], acts.top_tokens[:, 0], acts.top_dims[:, 0], acts.ratio, strict=True)]
    fig.add_trace(go.Scatter(x=layers, y=first, mode="lines+markers", name="first token",
                             text=hover,
                             hovertemplate="layer %{x}: first token's norm %{y:.4g}<br>%{text}<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=median, mode="lines", name="median token", line=dict(dash="dot"),
                             hovertemplate="layer %{x}: median token norm %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=top, mode="lines", name="largest token norm", line=dict(dash="dash"),
                             customdata=where, hovertemplate="layer %{x}: token %{customdata} has norm %{y:.4g}"
                                                             "<extra></extra>"))
    massive = [i for i in layers if acts.massive[i]]
    if massive:
        fig.add_trace(go.Scatter(x=massive, y=[top[i] for i in massive], mode="markers", name="massive activation",
                                 marker=dict(symbol="star", size=11, color="#d62728"),
                                 text=[hover[i] for i in massive], hovertemplate="layer %{x}: %{text}<extra></extra>"))
    first_layer = acts.first_massive_layer
    note = f"first massive activation after layer {first_layer}" if first_layer is not None else "no massive activation"
    _layout(fig, f"Residual norms per layer · {label_text(_short(p.name, 30))} ({note})", 340)
    fig.update_xaxes(title_text="decoder layer (its output)", dtick=max(1, len(layers) // 12))
    fig.update_yaxes(title_text="L2 norm", type="log")
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


def atlas_layers(entries: list[AtlasEntry]) -> go.Figure:
    """One line per model: the mean first-token mass of each layer against its relative depth (layer / last
    layer), so that models of different depths line up."""
    fig = go.Figure()
    for e in entries:
        n = len(e.layer_strength)
        depth = [i / max(1, n - 1) for i in range(n)]
        fig.add_trace(go.Scatter(x=depth, y=e.layer_strength, mode="lines+markers", name=label_text(e.name),
                                 customdata=e.layer_ids,
                                 hovertemplate=f"{html.escape(e.name)}<br>layer %{{customdata}}<br>"
                                               "first-token mass %{y:.3f}<extra></extra>"))
    _layout(fig, "Sink strength by relative depth (mean first-token mass per layer)", 420,
            margin=dict(l=70, r=30, t=60, b=55), legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title_text="relative depth (layer / last layer)", range=[-0.02, 1.02], tickformat=".0%")
    fig.update_yaxes(title_text="first-token mass", rangemode="tozero")
    return fig


# --------------------------------------------------------------------------------- streaming evaluation


def _stream_dict(stream_eval: Any) -> dict[str, Any]:
    """A ``StreamEval`` or its ``to_dict()`` as the dict (the JSON document)."""
    d = stream_eval.to_dict() if hasattr(stream_eval, "to_dict") else stream_eval
    if not isinstance(d, dict) or not isinstance(d.get("results"), list):
        raise ConfigError("not a stream evaluation (expected a StreamEval or a sinkscope.stream_eval dict)")
    return d


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _stream_colors(sinks: list[int]) -> dict[int, str]:
    from plotly.colors import sample_colorscale

    if not sinks:
        return {}
    n = len(sinks)
    # 0..0.85 of Plasma: the yellow end is unreadable on white
    return dict(zip(sinks, sample_colorscale(STREAM_SCALE, [0.85 * i / max(1, n - 1) for i in range(n)]),
                    strict=True))


def stream_ppl_by_sinks(stream_eval: Any, recommendation: Any = None) -> go.Figure:
    """Streaming perplexity against sink count, with dense (full cache) and sliding-window recompute as
    horizontal reference lines.

    When recompute scored only every k-th target, a dotted line gives streaming's perplexity on those same
    targets (what the recompute line compares with). With ``recommendation`` (a validated
    :class:`~sinkscope.analysis.Recommendation` or its dict) the tolerance band and the chosen count are marked.
    """
    d = _stream_dict(stream_eval)
    results = [r for r in d["results"] if isinstance(r, dict)]
    window = d.get("window")
    every = sorted((r for r in results if r.get("mode") == "streaming" and isinstance(r.get("sinks"), int)),
                   key=lambda r: r["sinks"])
    # A grid draws one line per window; the main window (recompute's, the recommendation's) is the bold one.
    streaming = [r for r in every if r.get("window", window) == window]
    xs = [r["sinks"] for r in streaming]
    ys = [r["ppl"] if _finite(r.get("ppl")) else None for r in streaming]
    fig = go.Figure()
    others = sorted({r.get("window") for r in every} - {window, None})
    shades = _stream_colors(others)
    for w in others:
        line = [r for r in every if r.get("window") == w]
        fig.add_trace(go.Scatter(
            x=[r["sinks"] for r in line], y=[r["ppl"] if _finite(r.get("ppl")) else None for r in line],
            mode="lines+markers", line=dict(width=1.5, color=shades[w]), marker=dict(size=6),
            name=f"streaming, window {w}",
            hovertemplate=f"S = %{{x}} sinks, window {w}<br>perplexity %{{y:.3f}}<extra></extra>"))
    if streaming:
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers+text", text=[f"{y:.2f}" if y is not None else "" for y in ys],
            textposition="top center", line=dict(width=3, color=SINK_COLOR), marker=dict(size=9),
            name=f"streaming: S sinks + window {window}",
            customdata=[[r.get("cache_budget", ""), r.get("n_targets", "")] for r in streaming],
            hovertemplate="S = %{x} sinks<br>perplexity %{y:.3f}<br>cache %{customdata[0]} tokens"
                          "<br>%{customdata[1]} scored tokens<extra></extra>"))
    stride = (d.get("recompute_targets") or {}).get("stride", 1)
    sub = [r.get("ppl_on_recompute_targets") for r in streaming]
    if stride and stride > 1 and streaming and all(_finite(v) for v in sub):
        fig.add_trace(go.Scatter(
            x=xs, y=sub, mode="lines+markers", line=dict(width=1.5, dash="dot", color=SINK_COLOR),
            marker=dict(size=5), name=f"streaming, on recompute's targets (1 in {stride})",
            hovertemplate="S = %{x}<br>perplexity %{y:.3f} on recompute's targets<extra></extra>"))
    refs = []
    for r in results:
        if r.get("mode") == "dense" and _finite(r.get("ppl")):
            beyond = " — beyond the trained context" if r.get("beyond_context") else ""
            refs.append((r["ppl"], f"dense (full cache): {r['ppl']:.2f}{beyond}", DENSE_COLOR, "dash"))
        elif r.get("mode") == "recompute" and _finite(r.get("ppl")):
            part = f", 1 target in {r.get('stride')}" if (r.get("stride") or 1) > 1 else ""
            refs.append((r["ppl"], f"sliding window {r.get('window', window)} + re-computation: {r['ppl']:.2f}{part}",
                         RECOMPUTE_COLOR, "dot"))
    for i, (y, text, color, dash) in enumerate(refs):
        fig.add_hline(y=y, line=dict(dash=dash, color=color, width=2),
                      annotation=dict(text=label_text(text), font=dict(color=color, size=11)),
                      annotation_position="bottom right" if i % 2 == 0 else "top right")
        # an invisible trace so that the reference lines appear in the legend as well
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(dash=dash, color=color, width=2),
                                 name=label_text(text.split(":")[0]), hoverinfo="skip"))
    rec = recommendation.to_dict() if hasattr(recommendation, "to_dict") else recommendation
    ev = rec.get("evidence", {}) if isinstance(rec, dict) else {}
    if isinstance(rec, dict) and _finite(ev.get("limit_ppl")) and _finite(ev.get("best_ppl")):
        fig.add_hrect(y0=ev["best_ppl"], y1=ev["limit_ppl"], fillcolor=STREAM_COLOR, opacity=0.12, line_width=0)
        tol = ev.get("tolerance")
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", hoverinfo="skip",
                                 marker=dict(symbol="square", size=12, color=STREAM_COLOR, opacity=0.25),
                                 name=f"within {tol:.0%} of the best" if _finite(tol) else "tolerance"))
        if isinstance(rec.get("sinks"), int):
            fig.add_vline(x=rec["sinks"], line=dict(color=STREAM_COLOR, width=2),
                          annotation=dict(text=f"recommended: {rec['sinks']}", font=dict(color=STREAM_COLOR)),
                          annotation_position="top right")
    finite = [r["ppl"] for r in every if _finite(r.get("ppl"))] + [y for y, *_ in refs]
    log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 4
    n = (d.get("targets") or {}).get("count", "?")
    _layout(fig, f"Perplexity vs sink count (window {window}, {n} tokens)", 460,
            legend=dict(orientation="h", x=0, y=-0.18, yanchor="top"), margin=dict(l=70, r=30, t=60, b=130))
    fig.update_xaxes(title_text="sink tokens kept (S)", tickmode="array", tickvals=sorted({r["sinks"] for r in every}))
    fig.update_yaxes(title_text="perplexity" + (" (log scale)" if log else ""), type="log" if log else "linear")
    if not streaming:
        fig.add_annotation(text="no streaming results", xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False)
    return fig


def stream_ppl_grid(stream_eval: Any, tolerance: float = 0.05) -> go.Figure:
    """Streaming perplexity for every (sink count, window) of a grid, as a heatmap; cells within ``tolerance``
    of dense are outlined and the cheapest of them (smallest ``S + W``) is marked."""
    d = _stream_dict(stream_eval)
    cells = {(r["sinks"], r.get("window", d.get("window"))): r.get("ppl") for r in d["results"]
             if isinstance(r, dict) and r.get("mode") == "streaming" and isinstance(r.get("sinks"), int)}
    sinks = sorted({s for s, _ in cells})
    windows = sorted({w for _, w in cells})
    z = [[cells.get((s, w)) if _finite(cells.get((s, w))) else None for w in windows] for s in sinks]
    dense = next((r.get("ppl") for r in d["results"] if isinstance(r, dict) and r.get("mode") == "dense"), None)
    text = [[f"{v:.2f}" if v is not None else "" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(w) for w in windows], y=[str(s) for s in sinks], text=text, texttemplate="%{text}",
        colorscale="Viridis", reversescale=True, colorbar=dict(title="perplexity"),
        hovertemplate="S = %{y} sinks, window %{x}<br>perplexity %{z:.3f}<extra></extra>"))
    title = "Streaming perplexity, sinks x window"
    if _finite(dense):
        limit = (1 + tolerance) * dense
        ok = [(s + w, s, w) for (s, w), v in cells.items() if _finite(v) and v <= limit]
        for _, s, w in ok:
            fig.add_shape(type="rect", x0=windows.index(w) - 0.5, x1=windows.index(w) + 0.5, y0=sinks.index(s) - 0.5,
                          y1=sinks.index(s) + 0.5, line=dict(color=DENSE_COLOR, width=1.5))
        if ok:
            _, s, w = min(ok)
            fig.add_annotation(x=str(w), y=str(s), text="cheapest", showarrow=True, arrowhead=2, ax=0, ay=-28,
                               font=dict(color=DENSE_COLOR))
            title += f" — cheapest within {tolerance:.0%} of dense ({dense:.2f}): {s} sinks + window {w}"
        else:
            title += f" — none within {tolerance:.0%} of dense ({dense:.2f})"
    _layout(fig, label_text(title), 120 + 48 * max(3, len(sinks)), margin=dict(l=70, r=30, t=60, b=55))
    fig.update_xaxes(title_text="window (W)", type="category")
    fig.update_yaxes(title_text="sink tokens (S)", type="category")
    return fig


def stream_rolling_nll(stream_eval: Any, span: int = 64) -> go.Figure:
    """Rolling mean NLL over text position, one line per mode (mean over the last ``span`` tokens).

    Lines start once their first full span is in; recompute's line (every k-th target) averages its own
    points over the same ``span`` tokens. Long lines are thinned for display.
    """
    if not isinstance(span, int) or span < 1:
        raise ConfigError(f"span must be a whole number >= 1, got {span!r}")
    d = _stream_dict(stream_eval)
    window = d.get("window")
    # In a grid, the main window's streaming lines (the heatmap shows the others).
    results = [r for r in d["results"] if isinstance(r, dict)
               and (r.get("mode") != "streaming" or r.get("window", window) == window)]
    sinks = sorted(r["sinks"] for r in results if r.get("mode") == "streaming" and isinstance(r.get("sinks"), int))
    colors = _stream_colors(sinks)
    fig = go.Figure()
    drawn = 0
    for r in results:
        nll, pos = r.get("nll"), r.get("positions")
        if not isinstance(nll, list) or not isinstance(pos, dict) or not nll:
            continue
        stride = int(pos.get("stride") or 1)
        first = int(pos.get("first") or 0)
        y = np.array([v if _finite(v) else np.nan for v in nll], dtype=float)
        k = max(1, span // stride)
        if len(y) < k:
            continue
        c = np.cumsum(np.insert(y, 0, 0.0))
        rolled = (c[k:] - c[:-k]) / k
        x = first + stride * np.arange(k - 1, len(y))
        step = max(1, math.ceil(len(x) / MAX_LINE_POINTS))
        x, rolled = x[::step], rolled[::step]
        mode = r.get("mode")
        if mode == "streaming":
            name, line = f"streaming S={r.get('sinks')}", dict(width=1.5, color=colors.get(r.get("sinks")))
        elif mode == "dense":
            name, line = "dense (full cache)", dict(width=2, color=DENSE_COLOR, dash="dash")
        else:
            name = f"recompute (1 in {stride})" if stride > 1 else "recompute"
            line = dict(width=2, color=RECOMPUTE_COLOR, dash="dot")
        fig.add_trace(go.Scatter(
            x=x, y=rolled, mode="lines", line=line, name=label_text(name),
            hovertemplate=f"{label_text(name)}<br>position %{{x}}<br>mean NLL over the last {span} tokens "
                          f"%{{y:.3f}} nats<extra></extra>"))
        drawn += 1
    _layout(fig, f"Rolling mean NLL over position ({span}-token span)", 460,
            legend=dict(orientation="h", x=0, y=-0.18, yanchor="top"), margin=dict(l=70, r=30, t=60, b=130))
    fig.update_xaxes(title_text="position in the text (token)")
    fig.update_yaxes(title_text=f"NLL, mean over {span} tokens (nats)")
    if not drawn:
        fig.add_annotation(text="no per-token NLLs in this evaluation", xref="paper", yref="paper", x=0.5, y=0.5,
                           showarrow=False)
    return fig


# -------------------------------------------------------------------------------------------- small bits


def stream_live(tokens: Any, span: int = 32) -> go.Figure:
    """A live stream's per-token statistics (``TokenStats`` or their dicts), three panels sharing the step axis:
    NLL (points, and its rolling mean over ``span`` tokens) with entropy; cache length; cache memory (MiB).
    Stretches with sinks switched off are shaded, tokens flagged for drift are marked."""
    from plotly.subplots import make_subplots

    rows = [t if isinstance(t, dict) else t.to_dict() for t in tokens]
    step = [r["step"] for r in rows]
    nll = np.array([np.nan if r["nll"] is None else r["nll"] for r in rows], dtype=float)
    ent = np.array([np.nan if r["entropy"] is None else r["entropy"] for r in rows], dtype=float)
    # Past LIVE_POINTS tokens the traces show every k-th token (the rolling mean still averages all of them):
    # a live figure of every token of a long stream costs the page and the server more than the model.
    k = max(1, -(-len(rows) // LIVE_POINTS))
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.56, 0.22, 0.22])
    fig.add_trace(go.Scattergl(x=step[::k], y=nll[::k], mode="markers", marker=dict(size=3, color="#9ecae1"),
                               name="NLL" if k == 1 else f"NLL (every {k}th token)",
                               hovertemplate="step %{x}<br>NLL %{y:.2f} nats<extra></extra>"), row=1, col=1)
    if len(nll):
        valid = np.where(np.isfinite(nll), nll, 0.0)
        count = np.cumsum(np.isfinite(nll))
        total = np.cumsum(valid)
        lo = np.maximum(np.arange(len(nll)) - span, -1)
        n = count - np.where(lo >= 0, count[np.maximum(lo, 0)], 0)
        roll = (total - np.where(lo >= 0, total[np.maximum(lo, 0)], 0)) / np.maximum(n, 1)
        roll[n == 0] = np.nan
        fig.add_trace(go.Scattergl(x=step[::k], y=roll[::k], mode="lines", line=dict(color=STREAM_COLOR, width=2),
                                   name=f"NLL, mean of last {span}",
                                   hovertemplate="step %{x}<br>rolling NLL %{y:.2f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scattergl(x=step[::k], y=ent[::k], mode="lines", line=dict(color="#ff7f0e", width=1),
                               name="entropy",
                               hovertemplate="step %{x}<br>entropy %{y:.2f} nats<extra></extra>"), row=1, col=1)
    drift = [(r["step"], nll[i]) for i, r in enumerate(rows) if r["drift"]]
    if drift:
        fig.add_trace(go.Scattergl(x=[d[0] for d in drift], y=[d[1] for d in drift], mode="markers",
                                   marker=dict(size=6, color=SINK_COLOR, symbol="x"), name="drift flag",
                                   hoverinfo="skip"), row=1, col=1)
    keep = _cache_points(rows, k)
    fig.add_trace(go.Scattergl(x=[step[i] for i in keep], y=[rows[i]["cache_length"] for i in keep], mode="lines",
                               name="cache length",
                               line=dict(color=DENSE_COLOR, width=2, shape="hv"), showlegend=False,
                               hovertemplate="step %{x}<br>cache %{y} tokens<extra></extra>"), row=2, col=1)
    fig.add_trace(go.Scattergl(x=[step[i] for i in keep], y=[rows[i]["cache_bytes"] / 2**20 for i in keep],
                               mode="lines", showlegend=False,
                               name="cache memory", line=dict(color=RECOMPUTE_COLOR, width=2, shape="hv"),
                               hovertemplate="step %{x}<br>cache %{y:.2f} MiB<extra></extra>"), row=3, col=1)
    # One rectangle per stretch with sinks off, over all three panels (paper height, the shared step axis); set
    # in one layout update: add_vrect(row="all") validates each shape per panel and cost more than the traces.
    fig.update_layout(shapes=[dict(type="rect", xref="x", yref="paper", x0=a - 0.5, x1=b + 0.5, y0=0, y1=1,
                                   fillcolor=SINK_COLOR, opacity=0.12, line_width=0, layer="below")
                              for a, b in _off_spans(rows)])
    if rows and any(not r["sinks_enabled"] for r in rows):  # a legend entry for the shading
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="sinks evicted",
                                 marker=dict(size=10, symbol="square", color=SINK_COLOR, opacity=0.3)), row=1, col=1)
    _layout(fig, "", 520, legend=dict(orientation="h", x=0, y=1.02, yanchor="bottom"),
            margin=dict(l=60, r=20, t=40, b=40), uirevision="stream")
    fig.update_yaxes(title_text="nats", row=1, col=1)
    fig.update_yaxes(title_text="tokens", rangemode="tozero", row=2, col=1)
    fig.update_yaxes(title_text="MiB", rangemode="tozero", row=3, col=1)
    fig.update_xaxes(title_text="stream step (token)", row=3, col=1)
    return fig


def _cache_points(rows: list[dict[str, Any]], k: int) -> list[int]:
    """Rows for the step-shaped cache traces: every k-th, and every row where the cache changed size (so a
    thinned trace still drops and climbs at the right token)."""
    out = [i for i, r in enumerate(rows) if i % k == 0 or i == len(rows) - 1
           or (i and (r["cache_length"] != rows[i - 1]["cache_length"]
                      or r["cache_bytes"] != rows[i - 1]["cache_bytes"]))]
    return out


def _off_spans(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """[first, last] steps of each run of tokens streamed with sinks off."""
    spans: list[tuple[int, int]] = []
    for r in rows:
        if r["sinks_enabled"]:
            continue
        if spans and spans[-1][1] == r["step"] - 1:
            spans[-1] = (spans[-1][0], r["step"])
        else:
            spans.append((r["step"], r["step"]))
    return spans


_KIND_COLORS = {"bos": "#d62728", "newline": "#ff7f0e", "space": "#9467bd", "punct": "#2ca02c", "word": "#4c78a8"}


def _kind_color(kind: str) -> str:
    return _KIND_COLORS.get(kind, "#7f7f7f")


def _layer_colors(layers: list[int]) -> list[str]:
    """One colour of :data:`MASS_SCALE` per layer, placed by layer number so it matches the layer colour bar."""
    from plotly.colors import sample_colorscale

    lo, hi = min(layers), max(layers)
    span = (hi - lo) or 1
    return sample_colorscale(MASS_SCALE, [(layer - lo) / span for layer in layers])


__all__ = ["attention_map", "entropy_heatmap", "first_token_heatmap", "label_text", "learned_sink_heatmap",
           "per_prompt_sink_rate", "sink_mass_curves", "sink_positions_chart", "stream_live", "stream_ppl_by_sinks",
           "stream_rolling_nll", "visible_token"]
