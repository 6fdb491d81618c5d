"""The cross-model atlas: two or more reports side by side (``sinkscope compare``).

It reads what ``sinkscope report`` wrote (``report.json``), never a model: each model's sink rate, recommended
cache and how it was decided, sink strength by relative depth, learned-sink mass, the first layer with a massive
activation, the share of dormant heads, the sink margin, what dropping the BOS token does and whether pinning
secondary sinks pays. Parts that a report does not
hold (an older report, a model without them) show as "not in this report", never as a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import SCHEMA
from .errors import ConfigError

REPORT_FILE = "report.json"


@dataclass
class AtlasEntry:
    """One report's row of the atlas."""

    name: str
    path: str
    architecture: str
    layers: int
    heads: int
    tokens: int
    sink_rate: float
    recommended_sinks: int
    validated: bool
    method: str
    window: int | None  # the deploy window (None: not in this report)
    layer_strength: list[float]  # mean first-token mass per analysed layer
    layer_ids: list[int]  # the analysed layers' indices
    learned_sink_mass: float | None  # mean over heads (None: the model has no learned sinks)
    first_massive_layer: int | None
    massive_known: bool  # whether the report holds activations at all
    dormant_share: float | None  # dormant heads / heads (None: not in this report)
    dormant_count: int | None
    bos_change: str | None  # the input-sensitivity verdict (None: not in this report)
    sink_margin: float | None = None  # mean over sink heads of the sink margin, logits (None: not in this report)
    pinning: str | None = None  # the pinning verdict, or why it did not run (None: not in this report)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_report(path: str | Path) -> tuple[dict[str, Any], Path]:
    """``report.json`` of a report directory (or the file itself), checked to be a sinkscope report.

    Raises:
        ConfigError: missing, unreadable, not JSON, or not a sinkscope report (one line each).
    """
    p = Path(path).expanduser()
    file = p / REPORT_FILE if p.is_dir() else p
    if not file.exists():
        where = f"no {REPORT_FILE} in {p}" if p.is_dir() else f"{p} does not exist"
        raise ConfigError(f"{where} (make one with: sinkscope report MODEL --out DIR)")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"can't read {file}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"{file} is not a sinkscope report (schema {found!r}, expected {SCHEMA!r})")
    for key in ("model", "prompts", "first_token_mass", "sink_rate", "recommendation"):
        if key not in doc:
            raise ConfigError(f"{file} is missing {key!r}: not a complete sinkscope report")
    return doc, file


def _entry(doc: dict[str, Any], file: Path) -> AtlasEntry:
    model, rec = doc["model"], doc["recommendation"]
    ftm = np.asarray(doc["first_token_mass"], dtype=float)
    lsm = doc.get("learned_sink_mass")
    acts = [a for a in doc.get("activations") or [] if isinstance(a, dict) and "layers" in a]
    first_massive = next((a.get("first_massive_layer") for a in acts), None)
    heads = doc.get("head_outputs")
    dormant = None if not isinstance(heads, dict) or "dormant_heads" not in heads else len(heads["dormant_heads"])
    inputs = doc.get("inputs") if isinstance(doc.get("inputs"), dict) else None
    deploy = doc.get("deploy") if isinstance(doc.get("deploy"), dict) else None
    evidence = rec.get("evidence") or {}
    geo = doc.get("key_geometry") if isinstance(doc.get("key_geometry"), dict) else {}
    margin = None
    if geo.get("sink_margin") is not None:
        m = np.asarray(geo["sink_margin"], dtype=float)  # null (undefined) entries become nan
        sink = ftm > float((doc.get("settings") or {}).get("threshold", 0.3))
        keep = sink & np.isfinite(m) if m.shape == ftm.shape else np.zeros_like(ftm, dtype=bool)
        margin = float(m[keep].mean()) if keep.any() else None
    pin = doc.get("pinning") if isinstance(doc.get("pinning"), dict) else None
    pinning = None if pin is None else str(pin.get("verdict") or f"not tested: {pin.get('unavailable')}")
    return AtlasEntry(
        name=str(model.get("name")), path=str(file.parent), architecture=str(model.get("architecture")),
        layers=int(model.get("n_layers") or ftm.shape[0]), heads=int(model.get("n_heads") or ftm.shape[1]),
        tokens=sum(int(p.get("n_tokens", 0)) for p in doc["prompts"]), sink_rate=float(doc["sink_rate"]),
        recommended_sinks=int(rec.get("sinks", 0)), validated="attention_estimate" in evidence,
        method=str(rec.get("method", "")), window=None if deploy is None else int(deploy["window"]),
        layer_strength=[float(x) for x in ftm.mean(axis=1)],
        layer_ids=[int(x) for x in doc.get("layers") or range(ftm.shape[0])],
        learned_sink_mass=None if lsm is None else float(np.mean(lsm)),
        first_massive_layer=first_massive, massive_known=bool(acts),
        dormant_share=None if dormant is None else dormant / ftm.size, dormant_count=dormant,
        bos_change=None if inputs is None else str(inputs.get("verdict")), sink_margin=margin, pinning=pinning)


def find_reports(root: str | Path, depth: int = 2) -> list[Path]:
    """Report directories under ``root`` (itself included, ``depth`` levels down): each holding a
    ``report.json`` that :func:`load_report` accepts, sorted by path. Others are skipped, not errors: a folder
    of reports may hold anything else too."""
    base = Path(root).expanduser()
    found: list[Path] = []
    level = [base] if base.is_dir() else []
    for _ in range(depth + 1):
        nxt: list[Path] = []
        for d in level:
            if (d / REPORT_FILE).is_file():
                try:
                    load_report(d)
                except ConfigError:
                    continue
                found.append(d)
            nxt += sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
        level = nxt
    return sorted(found)


def atlas_entry(doc: dict[str, Any], path: str) -> AtlasEntry:
    """The atlas row of one report's ``report.json`` contents (or of ``SinkProfile.to_dict()``: an analysis
    not written anywhere), ``path`` naming where it came from."""
    return _entry(doc, Path(path) / REPORT_FILE)


def compare(paths: list[str | Path]) -> list[AtlasEntry]:
    """The atlas rows of two or more reports, in the order given.

    Raises:
        ConfigError: fewer than two reports, the same report twice, or a report that can't be read.
    """
    if len(paths) < 2:
        raise ConfigError(f"compare needs two or more report directories, got {len(paths)}")
    loaded = [load_report(p) for p in paths]
    files = [f.resolve() for _, f in loaded]
    if len(set(files)) != len(files):
        raise ConfigError("the same report is given twice")
    return [_entry(doc, f) for doc, f in loaded]


def _or_missing(value: Any, fmt: str = "{}") -> str:
    return "not in this report" if value is None else fmt.format(value)


def atlas_rows(entries: list[AtlasEntry]) -> list[tuple[str, list[str]]]:
    """The atlas table: (quantity, one cell per model)."""
    def massive(e: AtlasEntry) -> str:
        if not e.massive_known:
            return "not in this report"
        return "none" if e.first_massive_layer is None else f"after layer {e.first_massive_layer}"

    def dormant(e: AtlasEntry) -> str:
        if e.dormant_share is None:
            return "not in this report"
        return f"{e.dormant_share:.1%} ({e.dormant_count} of {e.layers * e.heads})"

    def cache(e: AtlasEntry) -> str:
        how = "validated by streaming" if e.validated else "attention estimate"
        window = "" if e.window is None else f" + window {e.window}"
        return f"{e.recommended_sinks} sink{'s' * (e.recommended_sinks != 1)}{window} ({how})"

    def strongest(e: AtlasEntry) -> str:
        s = np.asarray(e.layer_strength)
        return f"layer {e.layer_ids[int(s.argmax())]} ({s.max():.3f})"

    return [
        ("architecture", [f"{e.architecture}, {e.layers} layers x {e.heads} heads" for e in entries]),
        ("tokens analysed", [str(e.tokens) for e in entries]),
        ("sink rate", [f"{e.sink_rate:.1%}" for e in entries]),
        ("recommended cache", [cache(e) for e in entries]),
        ("strongest layer (mean first-token mass)", [strongest(e) for e in entries]),
        ("learned-sink mass (mean)", ["no learned sinks" if e.learned_sink_mass is None
                                      else f"{e.learned_sink_mass:.3f}" for e in entries]),
        ("first massive activation", [massive(e) for e in entries]),
        ("dormant heads", [dormant(e) for e in entries]),
        ("sink margin in sink heads (logits)", [_or_missing(e.sink_margin, "{:.2f}") for e in entries]),
        ("BOS and chat template", [_or_missing(e.bos_change) for e in entries]),
        ("pinning secondary sinks", [_or_missing(e.pinning) for e in entries]),
    ]
