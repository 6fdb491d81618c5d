"""Write a :class:`~sinkscope.analysis.SinkProfile` as ``report.json``, ``report.html`` and ``report.md``.

* ``report.json`` is exactly ``profile.to_dict()`` (schema ``sinkscope.report/1``);
* ``report.html`` is one self-contained file that opens offline: plotly.js is embedded once in the head and
  every figure comes from :mod:`sinkscope.plots`;
* ``report.md`` holds the summary tables.

Nothing here computes a new metric: it selects, formats and escapes what the profile holds. Everything that
comes from a model or a prompt (names, token text) is escaped for the format it goes into.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__, metrics, plots
from ._io import atomic_write_many, temp_path_for
from .analysis import SCHEMA, Recommendation, attention_estimate
from .compare import AtlasEntry, atlas_rows
from .errors import OutputError
from .metrics import sink_rate

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from .analysis import PromptResult, SinkProfile

REPORT_FILES = {"json": "report.json", "html": "report.html", "md": "report.md"}
N_POSITION_PROMPTS = 3  # sink-position charts in the HTML report: the first few prompts
N_TOP_HEADS = 10
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2},
                  "modeBarButtonsToRemove": ["select2d", "lasso2d", "zoomIn2d", "zoomOut2d", "autoScale2d"]}


# --------------------------------------------------------------------------------------------- output dir


def check_output_dir(out_dir: str | Path) -> Path:
    """Make sure ``out_dir`` is a directory sinkscope can write to, creating it if needed; return its path.

    Cheap, so the CLI calls it before loading a model. Raises :class:`OutputError` with a message that says
    what to do when the path is a file, sits under a file, or can't be created or written.
    """
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} is an existing file, not a directory; pass a directory path "
                          f"(--out DIR) or remove the file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"can't create output directory {path}: part of that path is a file; "
                          f"choose another directory (--out DIR)") from None
    except OSError as exc:
        raise OutputError(f"can't create output directory {path}: {exc.strerror or exc}; "
                          f"choose a directory you can write to (--out DIR)") from None
    probe = temp_path_for(path / ".sinkscope-write-test")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"can't write to output directory {path}: {exc.strerror or exc}; "
                          f"choose a directory you can write to (--out DIR)") from None
    finally:
        probe.unlink(missing_ok=True)
    return path


def write_report(profile: SinkProfile, out_dir: str | Path, *, figures_for_heads: int = 4) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` and ``report.md`` into ``out_dir``; return their paths by kind.

    All three documents are rendered in memory first, then written through temporary files and renamed into
    place, so an interruption leaves either the previous files or the complete new ones, never a part.

    Args:
        profile: the result of :func:`sinkscope.analyze`.
        out_dir: the output directory (created if missing).
        figures_for_heads: how many of the strongest sink heads get an attention-map figure in the HTML.

    Raises:
        OutputError: ``out_dir`` can't be created or written.
    """
    out = check_output_dir(out_dir)
    texts = {
        "json": json.dumps(profile.to_dict(), indent=1) + "\n",
        "html": render_html(profile, figures_for_heads=figures_for_heads),
        "md": render_markdown(profile),
    }
    return _write_files(out, REPORT_FILES, texts, "the report")


def _write_files(out: Path, names: dict[str, str], texts: dict[str, str], what: str) -> dict[str, Path]:
    """Write all files or none (atomic renames); an OS failure becomes a one-line OutputError."""
    paths = {kind: out / name for kind, name in names.items()}
    try:
        atomic_write_many({paths[kind]: text for kind, text in texts.items()})
    except OSError as exc:
        raise OutputError(f"can't write {what} into {out}: {exc.strerror or exc}; "
                          f"free some space or choose another directory (--out DIR)") from None
    return paths


# ------------------------------------------------------------------------------------------------- format


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(value)


def _float(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _ppl(value: Any) -> str:
    """A perplexity with two decimals (None when missing)."""
    v = _float(value)
    return "None" if v is None else f"{v:.2f}"


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _token(text: str) -> str:
    """A token as a visible literal (newlines as ``\\n``), not yet escaped for any format."""
    return plots.visible_token(text)


def _md(text: Any) -> str:
    """Text made inert in a Markdown table cell: control characters visible, markup characters escaped."""
    s = str(text).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    out = []
    for c in s:
        if c in "\\`*_[]<>|~&#!":
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def _md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    aligns = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in aligns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], cls: str = "", highlight: int | None = None) -> str:
    """A table whose cells are already-escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    hl = ' class="hl"'
    body = "".join(
        f"<tr{hl if i == highlight else ''}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
        for i, r in enumerate(rows))
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _layers_text(profile: SinkProfile) -> str:
    if profile.layers == list(range(profile.model.n_layers)):
        return f"all {profile.model.n_layers}"
    return ", ".join(str(x) for x in profile.layers)


def _head_rows(profile: SinkProfile, n: int) -> tuple[list[dict[str, Any]], bool]:
    """The top ``n`` sink heads (above threshold); if none, the strongest heads anyway (flag False)."""
    heads = profile.sink_heads()[:n]
    if heads:
        return heads, True
    ftm = profile.first_token_mass
    return [{"layer": layer, "head": h, "first_token_mass": float(ftm[profile.layer_row(layer), h])}
            for layer, h in profile.strongest_heads(n)], False


def _model_rows(profile: SinkProfile) -> list[tuple[str, str]]:
    m = profile.model
    rows = [("name", m.name), ("source", m.source), ("architecture", f"{m.architecture} ({m.model_type})"),
            ("layers x heads", f"{m.n_layers} x {m.n_heads} query heads, {m.n_kv_heads} KV heads"),
            ("head dim", str(m.head_dim) + (f" (values {m.v_head_dim})" if m.v_head_dim else "")),
            ("positions", m.positional),
            ("context", str(m.max_positions) if m.max_positions else "unknown")]
    if m.sliding_window:
        rows.append(("sliding window", str(m.sliding_window)))
    if m.attention_layers:
        rows.append(("attention layers", ", ".join(map(str, m.attention_layers)) + " (the others have none)"))
    if m.learned_sinks:
        rows.append(("learned sinks", "a sink logit per head"))
    if m.softcap:
        rows.append(("soft-cap", f"{m.softcap:g}"))
    rows.append(("weights", f"{m.dtype} on {m.device}"))
    return rows


def _settings(profile: SinkProfile) -> dict[str, Any]:
    return {**profile.to_dict()["settings"], "layers": _layers_text(profile)}


def _learned_sink_sentences(profile: SinkProfile, code: Any) -> list[str]:
    """What the learned sinks mean for a streaming cache, as sentences (empty without learned sinks).

    Fixed words and numbers only (no model or prompt text, nothing to escape) apart from ``code(text)``, which
    marks a command up for the target format.
    """
    lsm = profile.learned_sink_mass
    if lsm is None:
        return []
    n, thr = len(profile.learned_sink_heads()), profile.threshold
    out = [f"This model has learned sinks: each softmax row has an extra outcome that belongs to no token, and "
           f"the heads give it {float(lsm.mean()):.1%} of their attention on average ({n} of {lsm.size} heads more "
           f"than {thr:g}).",
           "That sink travels with every query, so a streaming (StreamingLLM) cache needs no pinned token for it: "
           "the recommended sink count is for the first-token mass that remains.",
           f"{code('sinkscope eval-stream')} (and the report's validation, on by default) confirms it by "
           "perplexity under eviction."]
    if attention_estimate(profile.recommendation).evidence.get("learned_sink_carries_excess"):
        out.insert(2, "No head parks its excess on the first tokens: the learned sink does the job, and the "
                      "attention estimate is 0 sink tokens.")
    return out


def _learned_layer_rows(profile: SinkProfile) -> list[list[str]]:
    """Per analysed layer: mean and max learned-sink mass over heads, heads above the threshold."""
    lsm = profile.learned_sink_mass
    if lsm is None:
        return []
    return [[str(layer), f"{lsm[i].mean():.3f}", f"{lsm[i].max():.3f}", str(int((lsm[i] > profile.threshold).sum()))]
            for i, layer in enumerate(profile.layers)]


LEARNED_LAYER_COLUMNS = ["layer", "mean learned-sink mass", "max", "heads above threshold"]


# ---------------------------------------------------------------------------------------------------- HTML

_CSS = """
:root { --fg: #1d232b; --muted: #5b6675; --line: #e3e7ed; --bg: #f5f7fa; --card: #fff; --accent: #d62728; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
.container { max-width: 1180px; margin: 0 auto; padding: 24px 20px 40px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header .sub { color: var(--muted); margin: 0 0 18px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em;
  background: #eef1f5; padding: 1px 4px; border-radius: 4px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px;
  margin: 0 0 18px; box-shadow: 0 1px 2px rgba(0,0,0,.04); min-width: 0; }
.card h2 { font-size: 18px; margin: 0 0 6px; }
.card h3 { font-size: 15px; margin: 14px 0 6px; }
.note { color: var(--muted); margin: 0 0 8px; font-size: 14px; }
.summary { display: grid; grid-template-columns: minmax(420px, 1.8fr) minmax(220px, 1fr) minmax(220px, 1fr);
  gap: 18px; }
.summary .card { margin: 0; }
.rec .big { font-size: 60px; font-weight: 700; line-height: 1.05; color: var(--accent); }
.rec .big small { font-size: 18px; font-weight: 500; color: var(--fg); }
.rec .method { margin: 6px 0 10px; }
/* fixed columns: a figure is drawn as soon as its script runs, before its neighbours exist */
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 14px; }
.grid > div { min-width: 0; }
table { border-collapse: collapse; width: 100%; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
table.numeric td:not(:first-child), table.numeric th:not(:first-child) { text-align: right; }
tr.hl td { background: #fdeaea; font-weight: 600; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; width: 1%; }
table.kv td { overflow-wrap: anywhere; }
.rec table.kv td:first-child { white-space: normal; width: 45%; }  /* long labels wrap inside the card */
.rec table.curve { font-size: 12px; }
.rec table.curve td, .rec table.curve th { padding: 3px 4px; }
.scroll { overflow-x: auto; }
table.curve { font-size: 13px; }
table.curve td, table.curve th { text-align: right; padding: 3px 5px; }
table.curve .hlc { background: #fdeaea; font-weight: 700; }
table.curve th:first-child, table.curve td:first-child { text-align: left; }
.stat { font-size: 28px; font-weight: 700; }
.tok { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre; }
footer { color: var(--muted); font-size: 13px; margin-top: 26px; text-align: center; }
@media (max-width: 900px) { .summary { grid-template-columns: 1fr; } .grid { grid-template-columns: 1fr; } }
"""


def _fig_html(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config=_PLOTLY_CONFIG, div_id=div_id)


def _plural(n: Any, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def attention_sentences(rec: Recommendation) -> str:
    """How the attention statistics chose ``rec.sinks``, in sentences (the card, report.md, report.html)."""
    ev = rec.evidence
    if rec.sinks == 0 and ev.get("note"):
        return f"{str(ev['note'])[:1].upper()}{str(ev['note'])[1:]}."
    curve, excess = ev.get("curve"), ev.get("excess_curve")
    k_max, used, total = ev.get("k_max"), ev.get("heads_used"), ev.get("heads_total")
    spread = "sink_mass" in str(ev.get("heads_basis", ""))
    which = (f"whose first {k_max} tokens hold more than {ev.get('threshold'):g} of their attention (no head passes "
             "it on the first token alone)") if spread else f"with first-token mass above {ev.get('threshold'):g}"
    out = [f"In the {used} heads of {total} {which}"]
    if isinstance(curve, list) and curve and isinstance(excess, list) and excess:
        out[0] += (f", the first {k_max} tokens hold {curve[-1]:.3f} of the attention, {excess[-1]:.3f} of it above "
                   f"chance (what uniform attention gives a token: {ev.get('chance', 0):.3f}).")
        mass = _float(ev.get("mass_at_recommended"))
        if mass is not None:
            first = "The first token keeps" if rec.sinks == 1 else f"The first {rec.sinks} tokens keep"
            out.append(f"{first} {mass:.3f}: at least {ev.get('share', 0):.0%} of that above-chance mass, so more "
                       "sinks add little.")
    else:
        out[0] += "."
    if ev.get("learned_sink_note"):
        note = str(ev["learned_sink_note"])
        out.append(f"{note[:1].upper()}{note[1:]}.")
    return " ".join(out)


def stream_sentences(rec: Recommendation) -> str:
    """How streaming validated ``rec.sinks``, in sentences (empty when it was not validated)."""
    ev = rec.evidence
    if "tolerance" not in ev:
        return ""
    at = next((r.get("ppl") for r in _ppl_rows(rec) if r.get("sinks") == rec.sinks), None)
    out = [f"Streamed through SinkCache with a window of {ev.get('window')} ({ev.get('n_targets')} scored tokens of "
           f"{ev.get('text')}), {_plural(rec.sinks, 'sink')} is the smallest count whose perplexity ({_ppl(at)}) is "
           f"within {ev['tolerance']:.0%} of the best ({_ppl(ev.get('best_ppl'))}, with {ev.get('best_sinks')})."]
    if _float(ev.get("dense_ppl")) is not None:
        out.append(f"Dense attention (a full cache) scores {_ppl(ev.get('dense_ppl'))}.")
    cheap = ev.get("cheapest_cache")
    if isinstance(cheap, dict):
        out.append(f"The smallest cache within {ev['tolerance']:.0%} of dense over the windows tried: "
                   f"{cheap.get('sinks')} sinks + a window of {cheap.get('window')} ({_ppl(cheap.get('ppl'))}).")
    if "agrees_with_attention_estimate" in ev:
        est = attention_estimate(rec)
        out.append("The attention statistics alone give the same count." if ev["agrees_with_attention_estimate"]
                   else f"The attention statistics alone estimated {est.sinks}.")
    return " ".join(out)


def evidence_rows(rec: Recommendation) -> list[tuple[str, str]]:
    """The recommendation's evidence as a small table of labelled quantities (no raw dictionary)."""
    ev, est = rec.evidence, attention_estimate(rec)
    rows: list[tuple[str, str]] = []
    if "tolerance" in ev:
        rows += [("text", f"{ev.get('text')} ({ev.get('tokens')} tokens, {ev.get('n_targets')} scored)"),
                 ("window", str(ev.get("window"))), ("streamed", str(ev.get("streamed") or "token by token"))]
        for label, key in (("dense (full cache)", "dense_ppl"), ("sliding window + recompute", "recompute_ppl")):
            if _float(ev.get(key)) is not None:
                rows.append((label, _ppl(ev.get(key))))
    e = est.evidence
    if e.get("heads_used") is not None:
        rows.append(("heads used", f"{e.get('heads_used')} of {e.get('heads_total')}"))
    if _float(e.get("chance")) is not None:
        rows.append(("chance mass per token", f"{e['chance']:.4f}"))
    if _float(e.get("target")) is not None:
        rows.append((f"target ({e.get('share', 0):.0%} of the above-chance mass)", f"{e['target']:.3f}"))
    if _float(e.get("learned_sink_mass_mean")) is not None:
        rows.append(("learned-sink mass (mean over heads)", f"{e['learned_sink_mass_mean']:.3f}"))
        rows.append(("learned-sink heads", str(e.get("learned_sink_heads"))))
    if e.get("spread_out_heads_skipped"):
        rows.append(("heads spread over the first tokens, not counted", str(e["spread_out_heads_skipped"])))
    return rows


def _curve_table(curve: list[float], sinks: int, excess: list[float] | None = None) -> str:
    basis = excess if excess else curve
    total = basis[-1] if basis and basis[-1] else None

    def cell(tag: str, k: int, text: str) -> str:
        return f'<{tag} class="hlc">{text}</{tag}>' if k == sinks else f"<{tag}>{text}</{tag}>"

    ks = range(1, len(curve) + 1)
    head = "<th>k</th>" + "".join(cell("th", k, str(k)) for k in ks)
    rows = ["<tr><td>mass</td>" + "".join(cell("td", k, f"{v:.3f}") for k, v in zip(ks, curve, strict=True))
            + "</tr>"]
    if excess:
        rows.append("<tr><td>above chance</td>"
                    + "".join(cell("td", k, f"{v:.3f}") for k, v in zip(ks, excess, strict=True)) + "</tr>")
    if total:
        rows.append("<tr><td>share</td>"
                    + "".join(cell("td", k, f"{v / total:.0%}") for k, v in zip(ks, basis, strict=True)) + "</tr>")
    return (f'<div class="scroll"><table class="curve"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _evidence_html(profile: SinkProfile) -> str:
    rec = profile.recommendation
    est = attention_estimate(rec)
    parts = []
    if est is not rec:
        parts.append(f'<p class="note">{_esc(stream_sentences(rec))}</p>' + _ppl_table_html(rec))
        parts.append(f'<h3>Attention-statistics estimate: {est.sinks} sink{"s" if est.sinks != 1 else ""}</h3>')
    parts.append(f'<p class="note">{_esc(attention_sentences(est))}</p>')
    curve = est.evidence.get("curve")
    if isinstance(curve, list) and curve and all(isinstance(v, (int, float)) for v in curve):
        excess = est.evidence.get("excess_curve")
        excess = [float(v) for v in excess] if isinstance(excess, list) and len(excess) == len(curve) else None
        parts.append(_curve_table([float(v) for v in curve], est.sinks, excess))
    rows = evidence_rows(rec)
    if rows:
        parts.append(_html_table(["evidence", ""], [[_esc(k), _esc(v)] for k, v in rows], cls="kv"))
    return "".join(parts)


def _ppl_rows(rec: Recommendation) -> list[dict[str, Any]]:
    rows = rec.evidence.get("ppl_by_sinks")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _ppl_table_html(rec: Recommendation) -> str:
    rows = _ppl_rows(rec)
    if not rows:
        return ""
    tol = rec.evidence.get("tolerance")
    tol_text = f"{tol:.0%}" if isinstance(tol, (int, float)) else "?"
    hl = next((i for i, r in enumerate(rows) if r.get("sinks") == rec.sinks), None)
    return _html_table(["sinks", "perplexity", f"within {tol_text}"],
                       [[_esc(r.get("sinks")), _esc(_ppl(r.get("ppl"))), "yes" if r.get("within_tolerance") else "no"]
                        for r in rows], cls="numeric", highlight=hl)


def _summary_html(profile: SinkProfile) -> str:
    rec = profile.recommendation
    n_heads = profile.first_token_mass.size
    n_sink = len(profile.sink_heads())
    rec_card = (
        f'<div class="card rec"><h2>Recommended sink tokens</h2>'
        f'<div class="big">{rec.sinks} <small>sink token{"s" if rec.sinks != 1 else ""} to keep</small></div>'
        f'<div class="method note">{_esc(rec.method)}</div>{_evidence_html(profile)}</div>')
    model_card = ('<div class="card"><h2>Model</h2>'
                  + _html_table(["", ""], [[_esc(k), _esc(v)] for k, v in _model_rows(profile)], cls="kv")
                  + "</div>")
    prompt_rows = [[_esc(c) for c in _prompt_row(profile, p)] for p in profile.prompts]
    prompts_card = (
        f'<div class="card"><h2>Sinks</h2><div class="stat">{_pct(profile.sink_rate)}</div>'
        f'<div class="note">sink rate: share of heads that put more than {profile.threshold:g} of their '
        f"attention on the first token, mean over prompts. On the mean profile, {n_sink} of {n_heads} heads are "
        f"sink heads.</div>"
        + (f'<div class="note">learned sinks: mean learned-sink mass {float(lsm.mean()):.3f}; '
           f"{len(profile.learned_sink_heads())} of {lsm.size} heads park more than {profile.threshold:g} there "
           f"(no token, no cache slot).</div>" if (lsm := profile.learned_sink_mass) is not None else "")
        + _html_table(PROMPT_COLUMNS, prompt_rows, cls="numeric") + "</div>")
    return f'<section class="summary">{rec_card}{model_card}{prompts_card}</section>'


PROMPT_COLUMNS = ["prompt", "tokens", "sink rate", "measured from"]
_CAPTURE_NAMES = {"maps": "whole maps", "stats": "statistics mode"}


def _prompt_row(profile: SinkProfile, p: PromptResult) -> list[str]:
    tokens = f"{p.n_tokens} (past the {profile.model.max_positions}-token context)" if p.beyond_context \
        else str(p.n_tokens)
    return [p.name, tokens, _pct(_prompt_rate(profile, p)), _CAPTURE_NAMES.get(p.capture, p.capture)]


def _prompt_rate(profile: SinkProfile, p: PromptResult) -> float:
    return sink_rate(p.first_token_mass, profile.threshold)


def _heads_table_html(profile: SinkProfile) -> str:
    heads, above = _head_rows(profile, N_TOP_HEADS)
    sm, ent, lsm = profile.sink_mass, profile.entropy, profile.learned_sink_mass
    rows = []
    for h in heads:
        r = profile.layer_row(h["layer"])
        rows.append([str(h["layer"]), str(h["head"]), f"{h['first_token_mass']:.3f}",
                     f"{sm[r, h['head'], -1]:.3f}", f"{ent[r, h['head']]:.2f}"]
                    + ([] if lsm is None else [f"{lsm[r, h['head']]:.3f}"]))
    note = ("" if above else f'<p class="note">No head is above the threshold ({profile.threshold:g}); these are '
            f"the strongest heads anyway.</p>")
    return note + _html_table(["layer", "head", "first-token mass", f"mass on first {profile.k_max}",
                               "entropy (nats)"] + ([] if lsm is None else ["learned-sink mass"]), rows,
                              cls="numeric")


def _learned_sink_html(profile: SinkProfile) -> str:
    """The learned-sink card: what it means for streaming, the heatmap, the per-layer table ("" without)."""
    if not profile.has_learned_sinks:
        return ""
    # The sentences hold only numbers and fixed words (no model or prompt text), so they need no escaping.
    text = " ".join(_learned_sink_sentences(profile, lambda c: f"<code>{_esc(c)}</code>"))
    table = _html_table([_esc(c) for c in LEARNED_LAYER_COLUMNS], _learned_layer_rows(profile), cls="numeric")
    return _card("Attention on the learned sink",
                 f"Mean mass each head gives its learned sink (the softmax outcome of no token), per layer and "
                 f"head; ringed cells park more than {profile.threshold:g} there. {text}",
                 _fig_html(plots.learned_sink_heatmap(profile), "fig-learned-sink")
                 + f'<div class="scroll">{table}</div>')


def _positions_html(profile: SinkProfile) -> str:
    figs = []
    for i, _p in enumerate(profile.prompts[:N_POSITION_PROMPTS]):
        figs.append(f"<div>{_fig_html(plots.sink_positions_chart(profile, prompt=i), f'fig-positions-{i}')}</div>")
    more = len(profile.prompts) - N_POSITION_PROMPTS
    tail = (f'<p class="note">{more} more prompt(s): see <code>sink_positions</code> in report.json and the tables '
            f"in report.md.</p>" if more > 0 else "")
    return f'<div class="grid">{"".join(figs)}</div>{tail}'


SECONDARY_COLUMNS = ["position", "token", "kind", "sink in layers", "peak (layer)", "x uniform"]


def _layer_ranges(layers: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs: list[list[int]] = []
    for x in sorted(layers):
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _secondary_rows(p: PromptResult, token: Any) -> list[list[str]]:
    return [[str(s.position), token(_token(s.token)), s.kind, _layer_ranges(s.layers), f"{s.peak:.3f} ({s.peak_layer})",
             f"{s.vs_uniform:.0f}"] for s in p.secondary_sinks]


def _secondary_note() -> str:
    return (f"Positions beyond the first that distant queries of a layer favour: at least "
            f"{metrics.SECONDARY_MASS:g} of their attention per head and {metrics.SECONDARY_RATIO:g}x uniform. A "
            "StreamingLLM cache keeps the first S tokens and the last W, so these drop out once they leave the "
            "window. Pinning them is tested by streaming the prompt with them pinned, against as many more "
            "leading tokens (the same cache size), in one pass each.")


def _pinning_sentence(profile: SinkProfile) -> str:
    """What ``report --pins`` found, as one sentence (or why it did not run)."""
    pin = profile.pinning
    if pin is None:
        return "Pinning not tested (sinkscope report --pins, the default, tests it)."
    if "unavailable" in pin:
        return f"Pinning not tested: {pin['unavailable']}."
    where = ", ".join(f"{p} ({_token(t)})" if t else str(p) for p, t in zip(pin["positions"], pin["tokens"],
                                                                             strict=True))
    return (f"Pinned on {pin['prompt']} (positions {where}; S = {pin['sinks']}, W = {pin['window']}, tokens "
            f"{pin['scored_from']}-{pin['n_tokens'] - 1} scored): {pin['verdict'][:1].upper()}{pin['verdict'][1:]}; "
            f"SinkCache(S, W) alone: {pin['baseline_ppl']:.3f}.")


def _secondary_html(profile: SinkProfile) -> str:
    shown = [p for p in profile.prompts if p.secondary_sinks][:N_POSITION_PROMPTS]
    if not shown:
        return _card("Secondary sinks", _esc(_secondary_note()),
                     '<p class="note">No position beyond the first is a sink in any layer.</p>')
    body = f'<p class="verdict">{_esc(_pinning_sentence(profile))}</p>' + "".join(
        f"<h3>{_esc(p.name)} ({p.n_tokens} tokens)</h3>"
        + _html_table(SECONDARY_COLUMNS, _secondary_rows(p, lambda t: f"<code>{_esc(t)}</code>")) for p in shown)
    return _card("Secondary sinks", _esc(_secondary_note()), body)


def _activations_html(profile: SinkProfile) -> str:
    which = next((i for i, p in enumerate(profile.prompts) if p.activations is not None), None)
    if which is None:
        why = next((p.activations_unavailable for p in profile.prompts if p.activations_unavailable), None)
        return f'<p class="note">No residual norms: {_esc(why or "none were recorded")}.</p>'
    return _fig_html(plots.massive_activations(profile, prompt=which), "fig-activations")


def _activation_rows(p: PromptResult) -> list[list[str]]:
    acts = p.activations
    assert acts is not None
    med = acts.median_norm
    rows = []
    for i in range(len(acts.median)):
        t, d, v = int(acts.top_tokens[i, 0]), int(acts.top_dims[i, 0]), float(acts.top_values[i, 0])
        rows.append([str(i), f"{acts.norms[i, 0]:.4g}", f"{med[i]:.4g}", f"{v:.4g}",
                     f"{t} {_md(_token(p.tokens[t]))}", str(d), f"{acts.ratio[i]:.3g}",
                     "yes" if acts.massive[i] else ""])
    return rows


INPUT_COLUMNS = ["variant", "change", "tokens", "first tokens", "sink rate", "first-token mass",
                 "first-K mass", "sink heads", "recommended sinks"]


def _input_rows(inputs: dict[str, Any], text: Any, token: Any) -> list[list[str]]:
    return [[text(v["name"]), text(v["change"]), str(v["n_tokens"]),
             " ".join(token(_token(t)) for t in v["first_tokens"]), _pct(v["sink_rate"]),
             f"{v['first_token_mass']:.3f}", f"{v['sink_mass']:.3f}", str(v["sink_heads"]),
             str(v["recommended_sinks"])] for v in inputs["variants"]]


def _inputs_note(inputs: dict[str, Any]) -> str:
    missing = "; ".join(f"{k}: {v}" for k, v in (inputs.get("unavailable") or {}).items())
    return (f"The same text ({inputs['prompt']}) fed as the tokenizer gives it, with the BOS token toggled and in "
            "the chat template: does the sink depend on how a serving stack feeds the model?"
            + (f" Not measured: {missing}." if missing else ""))


def _inputs_html(profile: SinkProfile) -> str:
    inputs = profile.inputs
    if not inputs:
        return ""
    body = (_html_table(INPUT_COLUMNS, _input_rows(inputs, _esc, lambda t: f"<code>{_esc(t)}</code>"))
            + f'<p class="verdict"><b>{_esc(inputs["verdict"][:1].upper() + inputs["verdict"][1:])}.</b></p>')
    return _card("BOS and chat template", _esc(_inputs_note(inputs)), body)


GEOMETRY_COLUMNS = ["layer", "sink heads", "cos(q, k0)", "cos(q, other keys)", "sink margin", "|k0| / median |k|",
                    "|v0| / median |v|", "|v0 W_O| / output"]


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)


def _fmt_mean(x: np.ndarray, spec: str) -> str:
    """The mean of the finite entries (the margin is undefined where no sampled query sees the first token)."""
    x = np.asarray(x, dtype=float)
    return format(float(x[np.isfinite(x)].mean()), spec) if np.isfinite(x).any() else "—"


def _geometry_summary(profile: SinkProfile) -> str | None:
    """One sentence on the sink heads' geometry (None when it was not measured or there are no sink heads)."""
    sc, oc = profile.geometry("sink_key_cos"), profile.geometry("other_key_cos")
    sn, kn = profile.geometry("sink_key_norm"), profile.geometry("key_norm_median")
    sink = profile.first_token_mass > profile.threshold
    if sc is None or oc is None or sn is None or kn is None or not sink.any():
        return None
    text = (f"Over the {int(sink.sum())} sink heads, queries meet the first token's key at a mean cosine of "
            f"{sc[sink].mean():.3f}, against {oc[sink].mean():.3f} for the other keys they see; that key's norm is "
            f"{_ratio(sn, kn)[sink].mean():.2f}x the median key's (direction, more than norm, makes the sink: Gu "
            "et al. 2024).")
    margin, vn, vm = (profile.geometry(n) for n in ("sink_margin", "sink_value_norm", "value_norm_median"))
    if margin is not None and vn is not None and vm is not None:
        text += (f" The first token's score beats the best other key's by a median {_fmt_mean(margin[sink], '.2f')} "
                 f"logits in sink heads ({_fmt_mean(margin[~sink], '.2f')} elsewhere), and its value's norm is "
                 f"{_ratio(vn, vm)[sink].mean():.2f}x the median value's.")
    return text


def _geometry_rows(profile: SinkProfile) -> list[list[str]]:
    sc, oc = profile.geometry("sink_key_cos"), profile.geometry("other_key_cos")
    sn, kn = profile.geometry("sink_key_norm"), profile.geometry("key_norm_median")
    margin, vn, vm = (profile.geometry(n) for n in ("sink_margin", "sink_value_norm", "value_norm_median"))
    first, out = profile.first_row_norm, profile.output_norm
    sink = profile.first_token_mass > profile.threshold
    rows = []
    for i, layer in enumerate(profile.layers):
        vo = "—" if first is None or out is None else f"{np.mean(first[i] / np.maximum(out[i], 1e-30)):.2f}"
        rows.append([str(layer), str(int(sink[i].sum())), f"{sc[i].mean():.3f}", f"{oc[i].mean():.3f}",
                     "—" if margin is None else _fmt_mean(margin[i], ".2f"), f"{_ratio(sn[i], kn[i]).mean():.2f}",
                     "—" if vn is None or vm is None else f"{_ratio(vn[i], vm[i]).mean():.2f}", vo])
    return rows


def _geometry_note() -> str:
    return ("How each layer's queries (rotated, as the scores see them) meet the first token's key, mean over heads "
            "and queries q >= K: their cosine with k0 and their mean cosine with the other keys they see; the sink "
            "margin, k0's score minus the best other key's in logits (median over sampled queries; positive: the "
            "first token wins outright); k0's and v0's norms against the median key's and value's; and what the "
            "first token's value adds through the output projection against the head's mean output (a small "
            "value makes parked mass a near no-op).")


def _missing(info: dict[str, Any], what: str) -> str | None:
    """"No <what>: <why>." for a part of report.json that says why it is empty, else None."""
    return f"No {what}: {info['unavailable']}." if "unavailable" in info else None


def _geometry_html(profile: SinkProfile) -> str:
    missing = _missing(profile.geometry_dict(), "key geometry")
    if missing:
        body = f'<p class="note">{_esc(missing)}</p>'
    else:
        summary = _geometry_summary(profile)
        body = (f'<p class="verdict">{_esc(summary)}</p>' if summary else "") + _html_table(
            GEOMETRY_COLUMNS, _geometry_rows(profile))
    return _card("How queries meet the first token", _esc(_geometry_note()), body)


DORMANT_COLUMNS = ["layer", "head", "first-token mass", "output / layer median", "output norm"]


def _dormant_note(profile: SinkProfile) -> str:
    return ("What each head writes into the residual stream: the norm of its attention output through its slice of "
            "the output projection, mean over queries. A sink head whose output is below "
            f"{metrics.DORMANT_RATIO:g}x its layer's median head is flagged dormant (Guo et al. 2024: heads that park "
            "on the sink and do little).")


def _dormant_rows(profile: SinkProfile) -> list[list[str]]:
    return [[str(d["layer"]), str(d["head"]), f"{d['first_token_mass']:.3f}", f"{d['output_ratio']:.2f}",
             f"{d['output_norm']:.4g}"] for d in profile.dormant_heads()]


def _ablation_sentence(profile: SinkProfile) -> str | None:
    ab = profile.ablation
    if not ab:
        return None
    return (f"Ablation on {ab['prompt']} ({ab['n_tokens']} tokens, perplexity {ab['base_ppl']:.3f}): "
            f"{ab['verdict']}.")


def _dormant_html(profile: SinkProfile) -> str:
    missing = _missing(profile.head_outputs_dict(), "head outputs")
    if missing:
        body = f'<p class="note">{_esc(missing)}</p>'
    else:
        rows = _dormant_rows(profile)
        body = (_html_table(DORMANT_COLUMNS, rows) if rows else
                '<p class="note">No sink head is dormant by this rule.</p>')
        sentence = _ablation_sentence(profile)
        body += (f'<p class="verdict">{_esc(sentence)}</p>' if sentence else
                 '<p class="note">Not ablated (<code>sinkscope report --ablate</code> zeroes the flagged heads and '
                 "measures the perplexity change against random other heads).</p>")
    return _card("Dormant heads", _esc(_dormant_note(profile)), body)


def _deploy_note(profile: SinkProfile) -> str:
    d = profile.deploy
    state = "validated by streaming perplexity" if d.validated else "the attention estimate, not validated"
    return (f"The recommendation ({d.sinks} sink token{'s' * (d.sinks != 1)}, {state}) with a window of {d.window} "
            f"({d.window_from}), as settings for the caches people serve with.")


def _deploy_html(profile: SinkProfile) -> str:
    d = profile.deploy
    blocks = [f"<h3>{_esc(target)}</h3><pre><code>{_esc(code)}</code></pre>" for target, code in d.snippets().items()]
    if d.cache_refused:
        blocks.insert(0, f'<p class="note">No SinkCache snippet: {_esc(d.cache_refused)}.</p>')
    notes = "".join(f"<li>{_esc(n)}</li>" for n in d.notes)
    body = "".join(blocks) + (f"<ul>{notes}</ul>" if notes else "")
    return _card("What to deploy", _esc(_deploy_note(profile)), body)


def _deploy_markdown(profile: SinkProfile) -> list[str]:
    d = profile.deploy
    out = ["## What to deploy", "", _md(_deploy_note(profile)), ""]
    if d.cache_refused:
        out += [f"No SinkCache snippet: {_md(d.cache_refused)}.", ""]
    lang = {"transformers": "python", "kvpress": "python", "llama.cpp": "sh"}
    for target, code in d.snippets().items():
        out += [f"**{_md(target)}**", "", f"```{lang.get(target, '')}", code, "```", ""]
    out += [f"- {_md(n)}" for n in d.notes] + [""]
    return out


def _attention_html(profile: SinkProfile, n: int) -> str:
    which = next((i for i, p in enumerate(profile.prompts) if p.attention is not None), None)
    if which is None:
        return ('<p class="note">No attention maps were kept (analysed with <code>map_size=None</code>); '
                "re-run with a map size to see them.</p>")
    p = profile.prompts[which]
    heads = profile.strongest_heads(n) if n > 0 else []
    figs = [f"<div>{_fig_html(plots.attention_map(profile, layer, head, prompt=which), f'fig-attn-{layer}-{head}')}"
            "</div>" for layer, head in heads]
    bins = len(p.attention.labels)
    note = (f'<p class="note">The {len(heads)} heads with the most first-token mass, on prompt '
            f"<b>{_esc(p.name)}</b> ({p.n_tokens} tokens pooled to {bins} x {bins} bins: a cell is the share of "
            f"attention the queries of a row bin give the keys of a column bin; position 0 keeps its own bin). "
            f"A bright first column is the sink.</p>")
    return note + f'<div class="grid">{"".join(figs)}</div>'


def _stream_eval_html(profile: SinkProfile) -> str:
    ev = profile.stream_eval
    if not ev:
        return ""
    rec = profile.recommendation
    body = _stream_eval_body(ev, rec if attention_estimate(rec) is not rec else None, "report")
    return f'<section class="card"><h2>Streaming evaluation: perplexity under eviction</h2>{body}</section>'


_STREAM_COLUMNS = ("mode", "sinks", "window", "cache_budget", "ppl", "ppl_on_recompute_targets", "mean_nll",
                   "n_targets", "streamed", "stride", "beyond_context", "seconds")


def _stream_eval_body(ev: Any, recommendation: Recommendation | None, prefix: str) -> str:
    """The stream-eval table, a note on the targets, and the two figures (when the document is well formed)."""
    results = ev.get("results") if isinstance(ev, dict) else None
    if not (isinstance(results, list) and results and all(isinstance(r, dict) for r in results)):
        return f"<code>{_esc(json.dumps(ev, default=str))}</code>"
    keys = [k for k in _STREAM_COLUMNS if any(k in r for r in results)]
    hl = None
    if recommendation is not None:
        hl = next((i for i, r in enumerate(results)
                   if r.get("mode") == "streaming" and r.get("sinks") == recommendation.sinks
                   and r.get("window", ev.get("window")) == ev.get("window")), None)
    table = _html_table([_esc(k.replace("_", " ")) for k in keys],
                        [[_esc(_num(r.get(k, ""))) for k in keys] for r in results], cls="numeric", highlight=hl)
    methods: dict[str, str] = {}  # one line per mode (the streaming ones differ only in S)
    for r in results:
        if isinstance(r.get("method"), str):
            methods.setdefault(str(r.get("mode")), r["method"])
    method_html = "".join(f"<li><b>{_esc(m)}</b>: {_esc(text)}</li>" for m, text in methods.items())
    t = ev.get("targets") or {}
    text = ev.get("text") or {}
    rt = ev.get("recompute_targets") or {}
    sub = (f" Recompute scored one target in {rt.get('stride')} ({rt.get('count')} tokens); <i>ppl on recompute "
           f"targets</i> gives every mode's perplexity on exactly those." if (rt.get("stride") or 1) > 1 else "")
    windows = ev.get("windows") or [ev.get("window")]
    win = (f"windows {_esc(', '.join(map(str, windows)))} (recompute and the bold line at {_esc(ev.get('window'))})"
           if len(windows) > 1 else f"window {_esc(ev.get('window'))}")
    note = (f'<p class="note">Text <code>{_esc(text.get("name"))}</code>, first {_esc(ev.get("tokens"))} tokens, '
            f"{win}. Every mode is scored on the same {_esc(t.get('count'))} target tokens "
            f"(positions {_esc(t.get('first'))} to {_esc(t.get('last'))}: from the largest sink count plus the "
            f"window on); perplexity = exp(mean NLL).{sub}</p>")
    figs = ""
    try:
        figs = ('<div class="grid">'
                f"<div>{_fig_html(plots.stream_ppl_by_sinks(ev, recommendation), f'fig-{prefix}-stream-ppl')}</div>"
                f"<div>{_fig_html(plots.stream_rolling_nll(ev), f'fig-{prefix}-stream-nll')}</div>"
                + (f"<div>{_fig_html(plots.stream_ppl_grid(ev), f'fig-{prefix}-stream-grid')}</div>"
                   if len(windows) > 1 else "") + "</div>")
    except (KeyError, TypeError, ValueError):  # a hand-made or older document: the table is still shown
        figs = ""
    return note + figs + f'<div class="scroll">{table}</div><ul class="note">{method_html}</ul>'


def render_html(profile: SinkProfile, *, figures_for_heads: int = 4) -> str:
    """The self-contained ``report.html`` (plotly.js embedded once; opens offline) as a string."""
    from plotly.offline import get_plotlyjs

    name = _esc(profile.model.name)
    m = profile.model
    total_tokens = sum(p.n_tokens for p in profile.prompts)
    sections = [
        _summary_html(profile),
        _card("Attention on the first token",
              f"Mean attention that queries (from position {profile.k_max} on) give to token 0, per layer and head. "
              f"Ringed cells are sink heads (more than {profile.threshold:g}).",
              _fig_html(plots.first_token_heatmap(profile), "fig-first-token")),
        _learned_sink_html(profile),
        _card("How many leading tokens hold the sink?",
              "Attention mass on the first k tokens: thin lines are layers (mean over heads), the bold line is the "
              "mean over sink heads, the dashed red line its part above chance (what the recommendation reads); "
              "the vertical line marks the recommended k.",
              _fig_html(plots.sink_mass_curves(profile), "fig-sink-mass")),
        _card("Attention maps of the strongest sink heads", "", _attention_html(profile, figures_for_heads)),
        _card("Which tokens are sinks?",
              "Positions that draw the most attention from queries at least 8 tokens later, averaged over all "
              "layers and heads (hover: how many times more than uniform attention would give).",
              _positions_html(profile)),
        _secondary_html(profile),
        _card("Massive activations",
              "The residual stream after each decoder layer: the first token's L2 norm against the median token's "
              "and the largest (log scale); stars mark layers with an activation at least 1000x the median "
              "magnitude (Sun et al. 2024), which is what makes a token a sink.",
              _activations_html(profile)),
        _inputs_html(profile),
        _geometry_html(profile),
        _dormant_html(profile),
        _card("Attention entropy", "Mean entropy of each head's attention (nats): low is focused, high is spread.",
              _fig_html(plots.entropy_heatmap(profile), "fig-entropy")),
        _card("Sink rate per prompt", "", _fig_html(plots.per_prompt_sink_rate(profile), "fig-prompt-rate")),
        _card("Top sink heads", "", _heads_table_html(profile)),
        _stream_eval_html(profile),
        _deploy_html(profile),
        _card("Settings", "", _html_table(["", ""], [[_esc(k), _esc(_num(v))] for k, v in _settings(profile).items()],
                                          cls="kv")),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<meta name=\"generator\" content=\"sinkscope {_esc(__version__)}\">\n"
        f"<title>sinkscope report: {name}</title>\n<style>{_CSS}</style>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n<main class=\"container\">\n"
        f"<header><h1>Attention sinks in <code>{name}</code></h1>"
        f"<p class=\"sub\">{_esc(m.architecture)} · {m.n_layers} layers x {m.n_heads} heads · "
        f"{len(profile.prompts)} prompt{'s' * (len(profile.prompts) != 1)}, {total_tokens} tokens · "
        f"K = {profile.k_max}</p></header>\n"
        + "\n".join(s for s in sections if s)
        + f"\n<footer>sinkscope {_esc(__version__)} · schema <code>{_esc(SCHEMA)}</code> · the numbers are in "
        "report.json next to this file</footer>\n</main>\n</body>\n</html>\n"
    )


def _card(title: str, note: str, body: str) -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section class="card"><h2>{_esc(title)}</h2>{note_html}{body}</section>'


# ------------------------------------------------------------------------------------------------ Markdown


def recommendation_markdown(profile: SinkProfile) -> str:
    """The recommendation with its evidence, in Markdown (``report.md`` and the dashboard's card): what to keep,
    how it was decided in sentences, the tables behind it."""
    rec = profile.recommendation
    est = attention_estimate(rec)
    out = [f"**Keep {_plural(rec.sinks, 'sink token')}.**"]
    if est is not rec:  # validated by streaming: its sentences and perplexity table, then the attention estimate
        out[0] += f" {_md(stream_sentences(rec))}"
        tol = rec.evidence.get("tolerance")
        tol_text = f"{tol:.0%}" if isinstance(tol, (int, float)) else "?"
        out += ["", _md_table(["sinks", "perplexity", f"within {tol_text}"],
                              [[f"**{r.get('sinks')}**" if r.get("sinks") == rec.sinks else _md(r.get("sinks")),
                                _md(_ppl(r.get("ppl"))), "yes" if r.get("within_tolerance") else "no"]
                               for r in _ppl_rows(rec)]), "",
                f"### Attention-statistics estimate: {_plural(est.sinks, 'sink')}", "", _md(attention_sentences(est))]
    else:
        out[0] += f" {_md(attention_sentences(est))} Not validated by streaming (`sinkscope report` validates " \
                  "unless `--no-validate`; `sinkscope eval-stream` on its own)."
    out.append("")
    curve = est.evidence.get("curve")
    if isinstance(curve, list) and curve and all(isinstance(v, (int, float)) for v in curve):
        ks = range(1, len(curve) + 1)
        out += [_md_table(["k", *[f"**{k}**" if k == est.sinks else str(k) for k in ks]],
                          [["mass on first k", *[f"{v:.3f}" for v in curve]],
                           *([["above chance", *[f"{v:.3f}" for v in est.evidence["excess_curve"]]]]
                             if isinstance(est.evidence.get("excess_curve"), list) else [])]), ""]
    rows = evidence_rows(rec)
    if rows:
        out += [_md_table(["evidence", ""], [[_md(k), _md(v)] for k, v in rows], "ll"), ""]
    return "\n".join(out)


def mechanism_markdown(profile: SinkProfile, level: str = "##") -> str:
    """Why the model sinks, in Markdown: how queries meet the first token's key, and the dormant heads with
    their ablation (``report.md`` and the dashboard's card)."""
    out: list[str] = []
    out += [f"{level} How queries meet the first token", ""]
    missing = _missing(profile.geometry_dict(), "key geometry")
    if missing:
        out += [_md(missing), ""]
    else:
        summary = _geometry_summary(profile)
        out += [_md(_geometry_note()), ""] + ([_md(summary), ""] if summary else []) + [
            _md_table(GEOMETRY_COLUMNS, _geometry_rows(profile), "rrrrrrrr"), ""]

    out += [f"{level} Dormant heads", ""]
    missing = _missing(profile.head_outputs_dict(), "head outputs")
    if missing:
        out += [_md(missing), ""]
    else:
        rows = _dormant_rows(profile)
        out += [_md(_dormant_note(profile)), "",
                _md_table(DORMANT_COLUMNS, rows, "rrrrr") if rows else "No sink head is dormant by this rule.", ""]
        sentence = _ablation_sentence(profile)
        out += [_md(sentence) if sentence else "Not ablated (`sinkscope report --ablate` tests the flag).", ""]

    return "\n".join(out).rstrip()


def render_markdown(profile: SinkProfile) -> str:
    """``report.md``: the summary tables in Markdown (token text with ``|`` and newlines escaped)."""
    m = profile.model
    out = [f"# Attention sinks in {_md(m.name)}", "",
           f"sinkscope {__version__} · schema `{SCHEMA}` · K = {profile.k_max} · "
           f"sink head: first-token mass > {profile.threshold:g}", ""]

    out += ["## Recommendation", "", recommendation_markdown(profile)]
    out.append("")
    if profile.stream_eval:
        out += _stream_eval_markdown(profile.stream_eval)

    out += _deploy_markdown(profile)

    out += ["## Model", "", _md_table(["", ""], [[_md(k), _md(v)] for k, v in _model_rows(profile)], "ll"), ""]

    out += ["## Prompts", "",
            _md_table(PROMPT_COLUMNS, [[_md(c) for c in _prompt_row(profile, p)] for p in profile.prompts], "lrrl"),
            "", f"Sink rate (mean over prompts): **{_pct(profile.sink_rate)}**. On the mean profile "
                f"{len(profile.sink_heads())} of {profile.first_token_mass.size} heads are sink heads.", ""]

    heads, above = _head_rows(profile, N_TOP_HEADS)
    out += ["## Top sink heads", ""]
    if not above:
        out += [f"No head is above the threshold ({profile.threshold:g}); the strongest heads:", ""]
    lsm = profile.learned_sink_mass
    out += [_md_table(["#", "layer", "head", "first-token mass"] + ([] if lsm is None else ["learned-sink mass"]),
                      [[str(i), str(h["layer"]), str(h["head"]), f"{h['first_token_mass']:.3f}"]
                       + ([] if lsm is None else [f"{lsm[profile.layer_row(h['layer']), h['head']]:.3f}"])
                       for i, h in enumerate(heads, start=1)]), ""]

    ftm = profile.first_token_mass
    out += ["## First-token mass per layer", "",
            _md_table(["layer", "mean over heads", "max", "sink heads"],
                      [[str(layer), f"{ftm[i].mean():.3f}", f"{ftm[i].max():.3f}",
                        str(int((ftm[i] > profile.threshold).sum()))] for i, layer in enumerate(profile.layers)]),
            ""]

    if profile.has_learned_sinks:
        out += ["## Learned sinks", "", " ".join(_learned_sink_sentences(profile, lambda c: f"`{c}`")), "",
                f"Learned-sink mass per layer (heads above threshold: more than {profile.threshold:g}):", "",
                _md_table(LEARNED_LAYER_COLUMNS, _learned_layer_rows(profile)), ""]

    acts_prompt = next((p for p in profile.prompts if p.activations is not None), None)
    why = next((p.activations_unavailable for p in profile.prompts if p.activations_unavailable), None)
    if acts_prompt is None and why:
        out += ["## Massive activations", "", f"No residual norms: {_md(why)}.", ""]
    if acts_prompt is not None:
        first = acts_prompt.activations.first_massive_layer
        out += ["## Massive activations", "",
                f"The residual stream after each decoder layer on {_md(acts_prompt.name)}: token norms and the largest "
                "activation (massive: at least 1000x the median magnitude and 100, Sun et al. 2024). "
                + (f"The first massive activation appears after layer {first}." if first is not None
                   else "No layer has a massive activation."), "",
                _md_table(["layer", "first-token norm", "median token norm", "largest activation", "token", "dim",
                           "x median", "massive"], _activation_rows(acts_prompt), "rrrrlrrl"), ""]

    out += [mechanism_markdown(profile), ""]

    if profile.inputs:
        inp = profile.inputs
        out += ["## BOS and chat template", "", _md(_inputs_note(inp)), "",
                _md_table(INPUT_COLUMNS, _input_rows(inp, _md, lambda t: f"[{_md(t)}]"), "llrlrrrrr"), "",
                f"**{_md(inp['verdict'][:1].upper() + inp['verdict'][1:])}.**", ""]

    out += ["## Top sink positions", "",
            "Mean attention each position receives from queries at least 8 tokens later (all layers and heads).", ""]
    for p in profile.prompts:
        out += [f"### {_md(p.name)} ({p.n_tokens} tokens)", ""]
        if not p.sink_positions:
            out += ["No positions ranked.", ""]
            continue
        out += [_md_table(["position", "token", "kind", "received", "x uniform"],
                          [[str(s.position), _md(_token(s.token)), _md(s.kind), f"{s.received:.4f}",
                            f"{s.vs_uniform:.1f}"] for s in p.sink_positions], "rllrr"), ""]

    out += ["## Secondary sinks", "", _md(_secondary_note()), ""]
    if any(p.secondary_sinks for p in profile.prompts):
        out += [_md(_pinning_sentence(profile)), ""]
    for p in profile.prompts:
        if p.secondary_sinks:
            out += [f"### {_md(p.name)} ({p.n_tokens} tokens)", "",
                    _md_table(SECONDARY_COLUMNS, _secondary_rows(p, _md), "rlllrr"), ""]
    if not any(p.secondary_sinks for p in profile.prompts):
        out += ["No position beyond the first is a sink in any layer.", ""]

    out += ["## Settings", "", _md_table(["", ""], [[_md(k), _md(_num(v))] for k, v in _settings(profile).items()],
                                         "ll"), ""]
    return "\n".join(out)


def _stream_eval_markdown(ev: Any) -> list[str]:
    results = ev.get("results") if isinstance(ev, dict) else None
    if not isinstance(results, list):
        return []
    t, text = ev.get("targets") or {}, ev.get("text") or {}
    cols = ["mode", "sinks", "ppl", "ppl_on_recompute_targets", "n_targets", "exact", "seconds"]
    cols = [c for c in cols if any(isinstance(r, dict) and c in r for r in results)]
    return ["## Streaming evaluation", "",
            f"Text {_md(text.get('name'))}, first {_md(ev.get('tokens'))} tokens, window {_md(ev.get('window'))}; "
            f"every mode scored on the same {_md(t.get('count'))} tokens (positions {_md(t.get('first'))} to "
            f"{_md(t.get('last'))}).", "",
            _md_table([c.replace("_", " ") for c in cols],
                      [[_md(_num(r.get(c, ""))) for c in cols] for r in results if isinstance(r, dict)]), ""]


# ---------------------------------------------------------------------------------------------- stream eval

STREAM_EVAL_FILES = {"json": "stream_eval.json", "html": "stream_eval.html"}


def render_stream_eval_html(stream_eval: Any, *, recommendation: Recommendation | None = None) -> str:
    """A small self-contained page (plotly.js embedded once) with the stream-eval table and its two figures."""
    from plotly.offline import get_plotlyjs

    ev = stream_eval.to_dict() if hasattr(stream_eval, "to_dict") else stream_eval
    m = ev.get("model") or {}
    name = _esc(m.get("name", "model"))
    rec_html = ""
    if recommendation is not None:
        rec_html = (f'<section class="card rec"><h2>Recommended sink tokens</h2><div class="big">{recommendation.sinks}'
                    f' <small>sink token{"s" if recommendation.sinks != 1 else ""} to keep</small></div>'
                    f'<div class="method note">{_esc(recommendation.method)}</div>'
                    f'<p class="note">{_esc(stream_sentences(recommendation))}</p>'
                    f"{_ppl_table_html(recommendation)}</section>")
    body = _stream_eval_body(ev, recommendation, "stream")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<meta name=\"generator\" content=\"sinkscope {_esc(__version__)}\">\n"
        f"<title>sinkscope stream eval: {name}</title>\n<style>{_CSS}</style>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n<main class=\"container\">\n"
        f"<header><h1>Perplexity under eviction: <code>{name}</code></h1>"
        f"<p class=\"sub\">{_esc(m.get('architecture', ''))} · window {_esc(ev.get('window'))} · sinks "
        f"{_esc(', '.join(str(x) for x in ev.get('sinks') or []))} · {_esc(ev.get('tokens'))} tokens</p></header>\n"
        f"{rec_html}<section class=\"card\"><h2>Results</h2>{body}</section>\n"
        f"<footer>sinkscope {_esc(__version__)} · schema <code>{_esc(ev.get('schema'))}</code> · the numbers are in "
        "stream_eval.json next to this file</footer>\n</main>\n</body>\n</html>\n")


# ------------------------------------------------------------------------------------------------ the atlas

COMPARE_FILES = {"html": "compare.html", "md": "compare.md", "json": "compare.json"}


ATLAS_NOTE = ("Sink rate: heads whose first-token mass exceeds the report's threshold. Recommended cache: the "
              "report's sink count (and its deploy window). Dormant heads: sink heads that write less than half of "
              "their layer's median head. Each report's own page has the numbers behind each cell.")


def atlas_markdown(entries: list[AtlasEntry]) -> str:
    """The atlas table in Markdown, one column per model, and what its rows mean (``compare.md``'s body and
    the dashboard's atlas card)."""
    rows = [[_md(q), *[_md(c) for c in cells]] for q, cells in atlas_rows(entries)]
    return "\n".join([_md_table(["", *[_md(e.name) for e in entries]], rows), "", ATLAS_NOTE, ""])


def render_compare_markdown(entries: list[AtlasEntry]) -> str:
    """``compare.md``: the atlas table."""
    return "\n".join([
        "# Attention sinks across models", "",
        f"sinkscope {__version__} · {len(entries)} reports: " + ", ".join(_md(e.path) for e in entries), "",
        atlas_markdown(entries)])


def render_compare_html(entries: list[AtlasEntry], base: str | Path | None = None) -> str:
    """``compare.html``: the atlas table and the sink strength of every model by relative depth (plotly.js
    embedded once; opens offline); links to each report relative to ``base`` (where the page is written)."""
    from plotly.offline import get_plotlyjs

    table = _html_table(["", *[_esc(e.name) for e in entries]],
                        [[_esc(q), *[_esc(c) for c in cells]] for q, cells in atlas_rows(entries)])
    def href(e: AtlasEntry) -> str:
        page = Path(e.path) / "report.html"
        return Path(os.path.relpath(page, base)).as_posix() if base is not None else page.as_posix()

    links = " · ".join(f'<a href="{_esc(href(e))}">{_esc(e.name)}</a>' for e in entries)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<meta name=\"generator\" content=\"sinkscope {_esc(__version__)}\">\n"
        f"<title>sinkscope atlas: {_esc(', '.join(e.name for e in entries))}</title>\n<style>{_CSS}</style>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n<main class=\"container\">\n"
        f"<header><h1>Attention sinks across models</h1><p class=\"sub\">{len(entries)} reports: {links}</p></header>\n"
        + _card("Side by side", "From each report's report.json; a part that a report does not hold says so.", table)
        + _card("Sink strength by depth", "Mean first-token mass of each layer, layers placed by relative depth.",
                _fig_html(plots.atlas_layers(entries), "fig-atlas-layers"))
        + f"\n<footer>sinkscope {_esc(__version__)} · the numbers are in compare.json next to this file</footer>\n"
        "</main>\n</body>\n</html>\n")


def write_compare(entries: list[AtlasEntry], out_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.html``, ``compare.md`` and ``compare.json`` into ``out_dir`` (atomically, as reports)."""
    out = check_output_dir(out_dir)
    texts = {"html": render_compare_html(entries, out), "md": render_compare_markdown(entries),
             "json": json.dumps({"schema": "sinkscope.compare/1", "reports": [e.to_dict() for e in entries]},
                                indent=1) + "\n"}
    return _write_files(out, COMPARE_FILES, texts, "the comparison")


def write_stream_eval(stream_eval: Any, out_dir: str | Path, *,
                      recommendation: Recommendation | None = None) -> dict[str, Path]:
    """Write ``stream_eval.json`` (the ``to_dict()`` document, plus ``recommendation`` when given) and
    ``stream_eval.html`` into ``out_dir``, atomically; return their paths by kind.

    Raises:
        OutputError: ``out_dir`` can't be created or written.
    """
    out = check_output_dir(out_dir)
    ev = stream_eval.to_dict() if hasattr(stream_eval, "to_dict") else dict(stream_eval)
    doc = {**ev, "recommendation": recommendation.to_dict()} if recommendation is not None else ev
    texts = {"json": json.dumps(doc, indent=1) + "\n",
             "html": render_stream_eval_html(ev, recommendation=recommendation)}
    return _write_files(out, STREAM_EVAL_FILES, texts, "the stream evaluation")


__all__ = ["check_output_dir", "render_html", "render_markdown", "render_stream_eval_html", "write_report",
           "write_stream_eval"]
