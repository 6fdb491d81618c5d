"""The Dash app: an analysis view (heatmaps, head maps, sink curves, recommendation) beside a live stream.

A thin layer: figures come from :mod:`sinkscope.plots`, the recommendation text from
:func:`sinkscope.report.recommendation_markdown`, analysis and streaming from the library through
:mod:`dashboard.state`. Callbacks only move data between the page and those objects.

The stream pane's perplexity panel evaluates the stream's text with 0, 1, 2, 4 and 8 sinks at the stream's
window (:class:`dashboard.state.PerplexityJobs`, a background job polled like an analysis) and draws
:func:`sinkscope.plots.stream_ppl_by_sinks`.

Each browser tab gets its own session id (a ``dcc.Store`` filled when the layout is served), which keys its
stream on the server; tabs don't share streams.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from dash import ClientsideFunction, Dash, Input, Output, Patch, State, dcc, html, no_update

from sinkscope import plots
from sinkscope.compare import find_reports
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.prompts import Prompt, sample_prompts
from sinkscope.report import atlas_markdown, mechanism_markdown, recommendation_markdown
from sinkscope.streaming.evaluate import MIN_TARGETS
from sinkscope.streaming.memory import format_bytes

from .serve import serve
from .state import (
    HEATMAP_VIEWS,
    PPL_SINKS,
    Analyses,
    DashboardError,
    Limits,
    ModelPool,
    PerplexityJobs,
    StreamRequest,
    Streams,
    atlas,
    describe,
    describe_perplexity,
    head_detail,
    heatmap_views,
)

TYPED = "__typed__"
DEFAULT_SAMPLE = "prose"  # analysed on first click: short enough to take a few seconds on a CPU
STREAM_SAMPLE = "long-document"  # streamed by default: long enough to run far past the window
POLL_MS = 400
# The page asks the server for a heartbeat every HEARTBEAT_MS; past SILENT_MS without an answer it says that the
# server is not answering (killed, stopped, or the network down), and takes the notice away when it answers
# again. Generous: under load a heartbeat may wait behind other requests.
HEARTBEAT_MS = 2000
SILENT_MS = 8000
CHART_EVERY = 16  # tokens between two redraws of the live chart
# The text pane keeps the most recent tokens only (between PAGE_BLOCK and 2 x PAGE_BLOCK of them; the status
# line counts them all): every poll re-renders the pane's children, so a pane of all the tokens of a fast
# stream (hundreds per second on a small model) grew until the page stopped polling.
PAGE_BLOCK = 512
PPL_HEIGHT = 420  # the perplexity-by-sinks figure, a little shorter than in report.html


@dataclass
class Services:
    """What the callbacks of one app use."""

    pool: ModelPool
    analyses: Analyses
    streams: Streams
    limits: Limits
    samples: dict[str, Prompt]
    perplexity: PerplexityJobs
    reports: dict[str, str]  # label -> report directory, for the atlas


def create_app(models: dict[str, str | LoadedModel] | None = None, *, limits: Limits | None = None,
               loader: Callable[[str], LoadedModel] | None = None,
               reports: list[str | Path] | None = None) -> Dash:
    """Build the dashboard. ``models``: display name -> model source or loaded model (first = default);
    ``loader`` turns a source into a model (default: :func:`sinkscope.load_model`); ``reports``: report
    directories, or folders of them, offered in the atlas (default: the checkout's ``docs/reports``).

    The services (model pool, analyses, streams, perplexity jobs) hang on ``app.sinkscope`` for tests and shutdown.
    """
    limits = limits or Limits()
    pool = ModelPool(models or {"smollm2-135m": "smollm2-135m"}, loader)
    try:
        samples = {p.name: p for p in sample_prompts()}
    except SinkscopeError:
        samples = {}
    svc = Services(pool, Analyses(pool, limits), Streams(pool, limits), limits, samples,
                   PerplexityJobs(pool, limits), _report_choices(reports))
    app = Dash(__name__, title="sinkscope", update_title=None, suppress_callback_exceptions=False)
    app.layout = lambda: _layout(svc)
    _register(app, svc)
    app.sinkscope = svc  # type: ignore[attr-defined]
    return app


def _report_choices(roots: list[str | Path] | None) -> dict[str, str]:
    """label -> directory of every report under ``roots`` (default: the checkout's docs/reports)."""
    if roots is None:
        default = Path(__file__).resolve().parent.parent / "docs" / "reports"
        roots = [default] if default.is_dir() else []
    found: dict[str, str] = {}
    for root in roots:
        base = Path(root).expanduser()
        for d in find_reports(base):
            label = d.relative_to(base).as_posix() if d != base else d.name
            found[label if label not in found else str(d)] = str(d)
    return found


# ------------------------------------------------------------------------------------------------- layout


def _number(id_: str, label: str, value: float, lo: float, hi: float | None, step: float = 1) -> html.Label:
    return html.Label([label, dcc.Input(id=id_, type="number", value=value, min=lo, max=hi, step=step,
                                        debounce=True, className="num")], className="field")


def _graph(id_: str, height: int) -> dcc.Graph:
    # No fixed height: each figure sets its own (the heatmap grows with the number of layers).
    return dcc.Graph(id=id_, figure=_placeholder(height), config={"displaylogo": False})


def _placeholder(height: int) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template=plots.TEMPLATE, height=height, xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def _layout(svc: Services) -> html.Div:
    lim = svc.limits
    sample_opts = [{"label": f"sample: {name}", "value": name} for name in svc.samples]
    default_sample = DEFAULT_SAMPLE if DEFAULT_SAMPLE in svc.samples else next(iter(svc.samples), TYPED)
    stream_text = svc.samples[STREAM_SAMPLE].text if STREAM_SAMPLE in svc.samples else ""
    model = svc.pool.names[0]
    return html.Div([
        dcc.Store(id="session", data=uuid.uuid4().hex),
        dcc.Store(id="analysis-job"), dcc.Store(id="head"), dcc.Store(id="stream-id"),
        dcc.Store(id="stream-cursor", data=0),
        dcc.Interval(id="analysis-poll", interval=POLL_MS, disabled=True),
        dcc.Interval(id="stream-poll", interval=POLL_MS, disabled=True),
        dcc.Store(id="ppl-job"), dcc.Interval(id="ppl-poll", interval=POLL_MS, disabled=True),
        dcc.Interval(id="model-poll", interval=1000, disabled=svc.pool.is_loaded(model)),
        dcc.Interval(id="heartbeat", interval=HEARTBEAT_MS), dcc.Store(id="server-beat"),
        dcc.Store(id="server-seen"), dcc.Store(id="silent-ms", data=SILENT_MS),
        html.Div(id="server-banner", className="banner", role="alert", hidden=True),
        html.Header([
            html.H1(["sinkscope", html.Span(" where the model parks its attention", className="sub")]),
            html.Label(["model", dcc.Dropdown(id="model", options=svc.pool.names, value=model, clearable=False,
                                              className="model-pick")], className="field"),
            html.Span(id="model-status", className="status"),
        ], className="top"),
        html.Main([
            html.Section([
                html.H2("Attention sinks"),
                html.Div([
                    dcc.Dropdown(id="prompt-choice", options=[*sample_opts, {"label": "type your own",
                                                                             "value": TYPED}],
                                 value=default_sample, clearable=False, className="prompt-pick"),
                    html.Button("Analyze", id="analyze", n_clicks=0, className="primary"),
                ], className="row"),
                dcc.Textarea(id="prompt-text", value=svc.samples[default_sample].text if default_sample != TYPED
                             else "", className="prompt", placeholder="Type a prompt to analyse"),
                html.Div(id="analysis-status", className="status", role="status"),
                html.Div(dcc.Markdown(id="recommendation", children="Analyze a prompt to see where the model "
                                      "parks its attention and how many sink tokens to keep."), className="card"),
                # Shown only for models with learned sinks (gpt-oss): which layer x head heatmap to show.
                html.Div(dcc.RadioItems(id="heatmap-view", options=_view_options(["first-token"]),
                                        value="first-token", inline=True, className="radio"),
                         id="heatmap-views", hidden=True, className="row"),
                _graph("heatmap", 560),
                html.Div([
                    html.Span("Click a cell above to see that head's attention map.", className="hint"),
                    dcc.RadioItems(id="scale", options=[{"label": "linear", "value": "linear"},
                                                        {"label": "log", "value": "log"}],
                                   value="linear", inline=True, className="radio"),
                ], className="row"),
                html.Div(id="head-detail", className="status"),
                _graph("head-map", 540),
                _graph("sink-curves", 430),
                _graph("sink-positions", 360),
                _graph("activations", 340),
                html.Div(dcc.Markdown(id="mechanism", children=""), className="card"),
                _atlas_panel(svc),
            ], className="pane"),
            html.Section([
                html.H2("Live stream"),
                dcc.Textarea(id="stream-prompt", value=stream_text, className="prompt",
                             placeholder=f"Text to stream (at most {lim.max_prompt_tokens} tokens)"),
                html.Div([
                    _number("sinks", "sinks S", 4, 0, None),
                    _number("window", "window W", 128, 1, lim.max_window),
                    _number("new-tokens", "new tokens", 128, 0, lim.max_new_tokens),
                    _number("temperature", "temperature", 0.8, 0, None, step=0.1),
                ], className="row"),
                dcc.RadioItems(id="read-mode", options=[
                    {"label": "read the text token by token (its NLL is the real loss), then generate",
                     "value": "read"},
                    {"label": "prefill the text, then generate", "value": "prefill"}],
                    value="read", className="radio"),
                html.Div([
                    html.Button("Start", id="start", n_clicks=0, className="primary"),
                    html.Button("Stop", id="stop", n_clicks=0),
                    dcc.Checklist(id="keep-sinks", options=[{"label": "keep sinks (untick to evict them now)",
                                                             "value": "on"}],
                                  value=["on"], className="switch"),
                ], className="row"),
                html.Div(id="stream-message", className="message", role="alert"),
                html.Span(id="stop-ack", hidden=True), html.Span(id="switch-ack", hidden=True),
                dcc.Store(id="stop-base", data=0),
                html.Div(id="stream-status", className="status", role="status"),
                html.Div(html.Div(id="stream-text", className="stream-text", children=[]), className="stream-box"),
                _graph("stream-chart", 520),
                _perplexity_panel(),
            ], className="pane"),
        ], className="panes"),
    ])


def _atlas_panel(svc: Services) -> html.Div:
    """The cross-model atlas (``sinkscope compare``): saved reports side by side, with this page's analysis."""
    return html.Div([
        html.H3("Atlas: other models side by side"),
        html.Div([
            dcc.Dropdown(id="atlas-reports", options=[{"label": k, "value": v} for k, v in svc.reports.items()],
                         value=list(svc.reports.values())[:2], multi=True, className="prompt-pick",
                         placeholder="reports to compare (sinkscope dashboard --reports DIR)"),
            html.Button("Compare", id="atlas-compare", n_clicks=0),
        ], className="row"),
        dcc.Checklist(id="atlas-current", options=[{"label": "with this page's analysis", "value": "on"}],
                      value=["on"], className="switch"),
        html.Div(id="atlas-message", className="message", role="alert"),
        dcc.Markdown(id="atlas-table", children=""),
        _graph("atlas-layers", 380),
    ], className="card")


def _perplexity_panel() -> html.Div:
    """The stream pane's perplexity-by-sinks panel: a button, a status line, the figure (hidden until there is
    one) and its caption."""
    sinks = ", ".join(map(str, PPL_SINKS))
    return html.Div([
        html.H3("Perplexity by sinks"),
        html.Div([
            html.Button("Perplexity by sinks for this prompt", id="ppl-run", n_clicks=0),
            html.Span(f"the text above streamed with S = {sinks} sinks at window W, beside the full cache (dense)",
                      className="hint"),
        ], className="row"),
        html.Div(id="ppl-status", className="status", role="status"),
        html.Div(_graph("ppl-chart", PPL_HEIGHT), id="ppl-figure", hidden=True),
        html.Div(id="ppl-caption", className="status"),
    ], id="ppl-panel", className="subpanel")


def _ppl_caption(d: dict[str, Any]) -> str:
    """The line under the perplexity figure (from :func:`dashboard.state.describe_perplexity`)."""
    window = f"window {d['window']}"
    if d["shortened"]:
        window += (f" (the stream's W = {d['window_asked']} leaves too few scored tokens in this text: the largest "
                   f"window that leaves {MIN_TARGETS})")
    beyond = ", beyond the model's trained context" if d["beyond_context"] else ""
    slow = ", streamed token by token" if d["method"] == "token by token" else ""
    return (f"{d['model']}: {d['n_tokens']} text tokens · {window} · {d['n_targets']} scored tokens · best: "
            f"S = {d['best_sinks']} (perplexity {d['best_ppl']:.2f}) · dense {d['dense_ppl']:.2f}{beyond} · "
            f"{d['seconds']:.1f} s{slow}")


def _view_options(views: list[str]) -> list[dict[str, str]]:
    return [{"label": HEATMAP_VIEWS[v], "value": v} for v in views]


def _heatmap(profile: Any, view: str | None) -> go.Figure:
    """The layer x head heatmap ``view`` of ``profile`` (the first-token mass unless the model has learned
    sinks and the learned-sink view is picked)."""
    if view == "learned-sink" and "learned-sink" in heatmap_views(profile):
        return plots.learned_sink_heatmap(profile)
    return plots.first_token_heatmap(profile)


def _head_text(d: dict[str, Any]) -> str:
    """The head line under the heatmap: that head's numbers (from :func:`dashboard.state.head_detail`)."""
    parts = [f"layer {d['layer']}, head {d['head']}: first-token mass {d['first_token_mass']:.3f}"
             + (" (sink head)" if d["sink_head"] else ""),
             f"mass on first {d['k_max']} {d['sink_mass_k']:.3f}"]
    if d["learned_sink_mass"] is not None:
        parts.append(f"learned-sink mass {d['learned_sink_mass']:.3f}"
                     + (" (parks its excess on the learned sink: no cache slot needed)" if d["learned_sink_head"]
                        else ""))
    parts.append(f"entropy {d['entropy']:.2f} nats")
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------- callbacks


def _register(app: Dash, svc: Services) -> None:
    pool, analyses, streams, ppl_jobs = svc.pool, svc.analyses, svc.streams, svc.perplexity

    @app.callback(Output("model-status", "children"), Output("model-poll", "disabled"),
                  Input("model", "value"), Input("model-poll", "n_intervals"))
    def model_status(model: str, _n: int) -> tuple[str, bool]:
        if pool.is_loaded(model):
            lm = pool.get(model)
            s = lm.spec
            return f"{s.name}: {s.n_layers} layers x {s.n_heads} heads, {s.dtype} on {s.device}", True
        if pool.error(model):
            return pool.error(model) or "", True
        pool.load_async(model)
        return f"loading {model} (first use; a GGUF model is converted once, which takes a minute)...", False

    # The heartbeat: the server answers with the count it was sent; the page notes when each answer came
    # (assets/heartbeat.js) and, between answers, says so if the server has gone quiet.
    @app.callback(Output("server-beat", "data"), Input("heartbeat", "n_intervals"))
    def heartbeat(n: int | None) -> int:
        return n or 0

    app.clientside_callback(ClientsideFunction("sinkscope", "beatSeen"), Output("server-seen", "data"),
                            Input("server-beat", "data"))
    app.clientside_callback(ClientsideFunction("sinkscope", "serverBanner"), Output("server-banner", "children"),
                            Output("server-banner", "hidden"), Input("heartbeat", "n_intervals"),
                            State("server-seen", "data"), State("silent-ms", "data"))

    @app.callback(Output("prompt-text", "value"), Input("prompt-choice", "value"), prevent_initial_call=True)
    def pick_prompt(choice: str) -> str:
        return svc.samples[choice].text if choice in svc.samples else ""

    @app.callback(Output("analysis-job", "data"), Output("analysis-poll", "disabled"),
                  Output("analysis-status", "children"),
                  Input("analyze", "n_clicks"), State("model", "value"), State("prompt-choice", "value"),
                  State("prompt-text", "value"))
    def start_analysis(n: int, model: str, choice: str, text: str | None):
        # Also on page load (n = 0): the default prompt, so that the page opens on a result, not empty axes; a
        # finished analysis of the same model and text is shared, so that opening tabs costs nothing more.
        sample = svc.samples.get(choice)
        name = choice if sample is not None and sample.text == text else "typed prompt"
        if not n and not (text or "").strip():
            return no_update, True, ""
        try:
            job = analyses.start(model, Prompt(name, text or ""), reuse=True)
        except DashboardError as exc:
            return no_update, True, html.Span(str(exc), className="error")
        return job.id, False, f"analysing {name} on {model}..."

    @app.callback(Output("analysis-status", "children", allow_duplicate=True),
                  Output("analysis-poll", "disabled", allow_duplicate=True),
                  Output("heatmap", "figure"), Output("sink-curves", "figure"), Output("sink-positions", "figure"),
                  Output("activations", "figure"), Output("recommendation", "children"), Output("head", "data"),
                  Output("heatmap-view", "options"), Output("heatmap-view", "value"),
                  Output("heatmap-views", "hidden"), Output("mechanism", "children"),
                  Input("analysis-poll", "n_intervals"), State("analysis-job", "data"), State("heatmap-view", "value"),
                  prevent_initial_call=True)
    def poll_analysis(_n: int, job_id: str | None, view: str | None):
        keep = (no_update,) * 10
        job = analyses.get(job_id)
        if job is None:
            return (html.Span("This analysis is gone from the server (it restarted); press Analyze again.",
                              className="error"), True, *keep)
        if not job.done:
            what = "loading the model" if not pool.is_loaded(job.model) else f"analysing {job.prompt_name}"
            return f"{what}... {job.elapsed:.0f} s", False, *keep
        if job.error:
            return html.Span(job.error, className="error"), True, *keep
        p = job.profile
        assert p is not None
        layer, head = p.strongest_heads(1)[0]
        mode = " (statistics mode: no T x T maps)" if p.prompts[0].capture == "stats" else ""
        status = (f"{job.prompt_name}: {p.prompts[0].n_tokens} tokens, sink rate {p.sink_rate:.0%}, "
                  f"analysed in {job.elapsed:.1f} s{mode}")
        views = heatmap_views(p)
        shown = view if view in views else views[0]  # a learned-sink view stays picked while the model has one
        return (status, True, _heatmap(p, shown), plots.sink_mass_curves(p),
                plots.sink_positions_chart(p), plots.massive_activations(p), recommendation_markdown(p),
                {"layer": layer, "head": head},
                _view_options(views), shown if shown != view else no_update, len(views) < 2,
                mechanism_markdown(p, level="###"))

    @app.callback(Output("atlas-message", "children"), Output("atlas-table", "children"),
                  Output("atlas-layers", "figure"), Input("atlas-compare", "n_clicks"),
                  State("atlas-reports", "value"), State("atlas-current", "value"), State("analysis-job", "data"),
                  prevent_initial_call=True)
    def show_atlas(_n: int, paths: list[str] | None, current: list[str] | None, job_id: str | None):
        job = analyses.get(job_id)
        profile = job.profile if job is not None and current and "on" in current else None
        try:
            entries = atlas(list(paths or []), profile)
        except DashboardError as exc:
            return str(exc), "", _placeholder(380)
        return "", atlas_markdown(entries), plots.atlas_layers(entries)

    @app.callback(Output("heatmap", "figure", allow_duplicate=True), Input("heatmap-view", "value"),
                  State("analysis-job", "data"), prevent_initial_call=True)
    def switch_heatmap(view: str | None, job_id: str | None):
        job = analyses.get(job_id)
        if job is None or job.profile is None:
            return no_update
        return _heatmap(job.profile, view)

    @app.callback(Output("head", "data", allow_duplicate=True), Input("heatmap", "clickData"),
                  prevent_initial_call=True)
    def click_head(click: dict[str, Any] | None):
        points = (click or {}).get("points") or []
        if not points or points[0].get("curveNumber", 0) != 0:
            return no_update
        return {"layer": int(points[0]["y"]), "head": int(points[0]["x"])}

    @app.callback(Output("head-map", "figure"), Output("head-detail", "children"), Input("head", "data"),
                  Input("scale", "value"), State("analysis-job", "data"), prevent_initial_call=True)
    def head_map(head: dict[str, int] | None, scale: str, job_id: str | None):
        job = analyses.get(job_id)
        if not head or job is None or job.profile is None:
            return no_update, no_update
        p = job.profile
        return (plots.attention_map(p, head["layer"], head["head"], log=scale == "log"),
                _head_text(head_detail(p, head["layer"], head["head"])))

    @app.callback(Output("stream-id", "data"), Output("stream-cursor", "data"),
                  Output("stream-poll", "disabled"), Output("stream-message", "children"),
                  Output("stream-text", "children"), Output("stop-base", "data"),
                  Input("start", "n_clicks"),
                  State("session", "data"), State("model", "value"), State("stream-prompt", "value"),
                  State("sinks", "value"), State("window", "value"), State("new-tokens", "value"),
                  State("temperature", "value"), State("read-mode", "value"), State("keep-sinks", "value"),
                  State("stop", "n_clicks"), prevent_initial_call=True)
    def start_stream(_n, session, model, prompt, sinks, window, new_tokens, temperature, mode, keep, stops):
        if None in (sinks, window, new_tokens, temperature):
            return (no_update,) * 3 + ("Fill in S, W, new tokens and temperature with numbers in range.",
                                       no_update, no_update)
        try:
            s = streams.start(session, StreamRequest(
                model=model, prompt=prompt or "", sinks=int(sinks), window=int(window),
                max_new_tokens=int(new_tokens), read_prompt=mode == "read", temperature=float(temperature)))
        except SinkscopeError as exc:
            return no_update, no_update, no_update, str(exc), no_update, no_update
        s.streamer.set_sinks("on" in (keep or []))  # the switch as the page shows it (applied from token S on)
        # Stop clicks up to now belong to earlier streams; the poll stops this one once the count passes them.
        return s.id, 0, False, "", [], stops or 0

    # The stop and switch callbacks write outputs of their own: sharing one with the poll callback, which is
    # nearly always in flight, let the Dash renderer drop their requests under load.
    @app.callback(Output("stop-ack", "children"), Input("stop", "n_clicks"), State("session", "data"),
                  prevent_initial_call=True)
    def stop_stream(n, session):
        streams.stop(session, "stopped from the page")
        return str(n)

    @app.callback(Output("switch-ack", "children"), Input("keep-sinks", "value"),
                  State("session", "data"), State("stream-id", "data"), prevent_initial_call=True)
    def switch_sinks(value, session, stream_id):
        on = "on" in (value or [])
        streams.set_sinks(session, stream_id, on)
        return "on" if on else "off"

    @app.callback(Output("stream-text", "children", allow_duplicate=True), Output("stream-cursor", "data",
                                                                                   allow_duplicate=True),
                  Output("stream-status", "children"), Output("stream-chart", "figure"),
                  Output("stream-poll", "disabled", allow_duplicate=True),
                  Output("stream-message", "children", allow_duplicate=True),
                  Input("stream-poll", "n_intervals"), State("session", "data"), State("stream-id", "data"),
                  State("stream-cursor", "data"), State("keep-sinks", "value"), State("stop", "n_clicks"),
                  State("stop-base", "data"), prevent_initial_call=True)
    def poll_stream(_n, session, stream_id, cursor, keep, stops, stop_base):
        s = streams.get(session, stream_id)
        if s is not None:
            # Every poll also carries the switch and the Stop clicks as the page shows them, so the stream obeys
            # the page even if the switch's or Stop's own request was lost (seen under load in headless Chromium).
            s.streamer.set_sinks("on" in (keep or []))
            if (stops or 0) > (stop_base or 0):
                s.stop("stopped from the page")
        if s is None:
            return (no_update, no_update, "", no_update, True,
                    "This stream is gone from the server (it restarted, or stopped the stream after the page "
                    "went quiet). Press Start to stream again.")
        tokens = s.tokens[:]  # a snapshot: the thread keeps appending
        start, first = _page_start(cursor or 0), _page_start(len(tokens))
        new = tokens[cursor or 0:]
        if first != start:  # the pane moves on by a block: send the tokens it keeps, once per block
            text: Any = [_token_span(t) for t in tokens[first:]]
        else:
            text = Patch()
            if new:
                text.extend([_token_span(t) for t in new])
        info = describe(s)
        finished = not s.running
        message = no_update
        if info["state"] == "error":
            message = info["error"]
        elif finished and info["stop_reason"]:
            message = f"Stream stopped: {info['stop_reason']}."
        # The chart is rebuilt every few tokens (_chart_due), not every poll: a figure of thousands of points per
        # poll would cost the server more than the model's forward.
        redraw = finished or (new and _chart_due(cursor or 0, len(tokens)))
        figure = plots.stream_live(tokens) if redraw else no_update
        return text if new else no_update, len(tokens), _status(info), figure, finished, message

    # The perplexity panel: a job of its own (its outputs are the panel's only), polled while it runs; the
    # button is disabled meanwhile (the server refuses a second job of one page as well).
    @app.callback(Output("ppl-job", "data"), Output("ppl-poll", "disabled"), Output("ppl-status", "children"),
                  Output("ppl-figure", "hidden"), Output("ppl-caption", "children"), Output("ppl-run", "disabled"),
                  Input("ppl-run", "n_clicks"), State("session", "data"), State("model", "value"),
                  State("stream-prompt", "value"), State("window", "value"), prevent_initial_call=True)
    def start_perplexity(_n, session, model, text, window):
        # A refusal leaves the poll as it is: it may be following this page's running job.
        if window is None:
            return (no_update, no_update, html.Span("Fill in W with a number in range.", className="error"), True,
                    "", no_update)
        try:
            job = ppl_jobs.start(session, model, text or "", int(window))
        except SinkscopeError as exc:
            return no_update, no_update, html.Span(str(exc), className="error"), True, "", no_update
        return job.id, False, f"evaluating the stream's text on {model}...", True, "", True

    @app.callback(Output("ppl-status", "children", allow_duplicate=True),
                  Output("ppl-poll", "disabled", allow_duplicate=True), Output("ppl-chart", "figure"),
                  Output("ppl-figure", "hidden", allow_duplicate=True),
                  Output("ppl-caption", "children", allow_duplicate=True),
                  Output("ppl-run", "disabled", allow_duplicate=True),
                  Input("ppl-poll", "n_intervals"), State("ppl-job", "data"), prevent_initial_call=True)
    def poll_perplexity(_n, job_id):
        job = ppl_jobs.get(job_id)
        if job is None:
            return (html.Span("This evaluation is gone from the server (it restarted); press the button again.",
                              className="error"), True, no_update, True, "", False)
        if not job.done:
            if job.state == "waiting":
                what = "loading the model" if not pool.is_loaded(job.model) else "waiting for the model"
            else:
                what = (f"evaluating {job.n_tokens} tokens at window {job.window}: "
                        f"{len(PPL_SINKS)} sink counts and dense"
                        + (" (token by token for this model: slower)" if job.method == "token by token" else ""))
            return f"{what}... {job.elapsed:.0f} s", False, no_update, no_update, no_update, no_update
        if job.error:
            return html.Span(job.error, className="error"), True, no_update, True, "", False
        assert job.result is not None
        fig = plots.stream_ppl_by_sinks(job.result)
        fig.update_layout(height=PPL_HEIGHT)
        return "", True, fig, False, _ppl_caption(describe_perplexity(job)), False


def _chart_due(before: int, now: int) -> bool:
    """Whether the live chart is redrawn after the stream went from ``before`` to ``now`` tokens: every
    CHART_EVERY tokens at first, then every 1/32 of the stream (a power of two), so that a fast stream's
    redraws, each of a figure of every token so far, cost the page about the same at any length."""
    step = max(CHART_EVERY, 1 << max(0, (now // 32).bit_length() - 1))
    return before // step != now // step


def _page_start(n: int) -> int:
    """The first token the text pane shows when ``n`` have streamed: a whole block back, so the pane holds
    between PAGE_BLOCK and 2 x PAGE_BLOCK tokens and is replaced once per block, extended in between."""
    return max(0, (n // PAGE_BLOCK - 1) * PAGE_BLOCK)


def _token_span(t) -> html.Span:
    cls = "tok" + ("" if t.sinks_enabled else " off") + (" drift" if t.drift else "") + \
        (" gen" if t.source == "generated" else "")
    nll = "-" if t.nll is None else f"{t.nll:.2f}"
    return html.Span(t.text, className=cls, title=f"step {t.step} · NLL {nll} · cache {t.cache_length}")


def _status(info: dict[str, Any]) -> list[Any]:
    speed = info["tokens_per_second"]
    drift = "; ".join(info["drift"]) if info["drift"] else "none"
    parts = [
        html.Span(info["state"], className=f"badge {info['state']}"),
        f" {info['tokens']} tokens · cache {info['cache_length']} tokens, {format_bytes(info['cache_bytes'])} · ",
        f"{speed:.1f} tok/s · " if speed else "",
        html.Span(f"sinks {'on' if info['sinks_enabled'] else 'EVICTED'}",
                  className="badge " + ("on" if info["sinks_enabled"] else "off"), id="sinks-badge"),
        " · drift: ", html.Span(drift, className="badge drift" if info["drift"] else ""),
    ]
    return parts


def run(app: Dash, host: str = "127.0.0.1", port: int = 8050, *, debug: bool = False,
        ready: Callable[[Callable[[], None]], None] | None = None) -> None:
    """Serve ``app`` with waitress until SIGINT or SIGTERM (``debug``: Flask's debug server), then stop every
    stream and wait for running jobs (:func:`dashboard.serve.serve`)."""
    limits = app.sinkscope.limits  # type: ignore[attr-defined]
    serve(app, host, port, max_streams=limits.max_streams, debug=debug, ready=ready)


__all__ = ["Limits", "create_app", "run"]
