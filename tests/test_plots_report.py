"""Figures (sinkscope.plots) and report files (sinkscope.report) on a small synthetic SinkProfile: no model."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from sinkscope import _io, plots, report
from sinkscope.analysis import (
    SCHEMA,
    AttentionMaps,
    PromptResult,
    SinkPosition,
    SinkProfile,
    recommend_from_attention,
)
from sinkscope.errors import ConfigError, OutputError
from sinkscope.models import ModelSpec

K = 4
LAYERS = [0, 1, 3]  # not contiguous: labels must be the real layer numbers, rows their index
EVIL_TOKEN = "<script>alert(1)</script>"
EVIL_NAME = "<b>evil</b> | name"

FTM0 = np.array([[0.9, 0.1, 0.05, 0.2], [0.6, 0.35, 0.1, 0.0], [0.2, 0.1, 0.8, 0.05]])
FTM1 = np.array([[0.7, 0.1, 0.05, 0.2], [0.2, 0.55, 0.1, 0.0], [0.2, 0.1, 0.6, 0.05]])
# mean: [[.8 .1 .05 .2] [.4 .45 .1 0] [.2 .1 .7 .05]] -> sink heads L0H0 .8, L3H2 .7, L1H1 .45, L1H0 .4


def _sink_mass(ftm: np.ndarray) -> np.ndarray:
    return ftm[..., None] + (1 - ftm)[..., None] * np.linspace(0.0, 0.3, K)


def _spec() -> ModelSpec:
    return ModelSpec(name="tiny<llama>&co", source="/models/tiny", architecture="LlamaForCausalLM",
                     model_type="llama", n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, positional="rope",
                     max_positions=128, sliding_window=None, layer_types=None, adds_bos=True, dtype="float32",
                     device="cpu")


@pytest.fixture
def profile() -> SinkProfile:
    rng = np.random.default_rng(0)
    tokens0 = ["<s>", " the", "\n", " cat", " sat", EVIL_TOKEN, " on", "a|b", " mat", "."]
    bins = [(0, 1), (1, 2), (2, 3), (3, 6), (6, 10)]
    labels = [f"{a}: {tokens0[a]!r}" if b - a == 1 else f"{a}-{b - 1}" for a, b in bins]
    maps = rng.random((len(LAYERS), 4, len(bins), len(bins))).astype(np.float32)
    p0 = PromptResult(
        name="plain", n_tokens=10, tokens=tokens0, first_token_mass=FTM0, sink_mass=_sink_mass(FTM0),
        entropy=rng.random((3, 4)) * 2,
        sink_positions=[SinkPosition(0, "<s>", "bos", 0.5, 12.0), SinkPosition(2, "\n", "newline", 0.1, 3.0),
                        SinkPosition(5, EVIL_TOKEN, "word", 0.05, 1.5), SinkPosition(7, "a|b", "punct", 0.02, 0.8)],
        attention=AttentionMaps(maps=maps, bins=bins, labels=labels))
    p1 = PromptResult(
        name=EVIL_NAME, n_tokens=12, tokens=["<s>"] + ["x"] * 11, first_token_mass=FTM1,
        sink_mass=_sink_mass(FTM1), entropy=rng.random((3, 4)) * 2,
        sink_positions=[SinkPosition(0, "<s>", "bos", 0.4, 9.0)], attention=None)
    ftm = np.mean([FTM0, FTM1], axis=0)
    sm = np.mean([_sink_mass(FTM0), _sink_mass(FTM1)], axis=0)
    rec = recommend_from_attention(sm, ftm, share=0.9)
    settings = {"dtype": "float32", "device": "cpu", "max_tokens": None, "map_size": 5}
    return SinkProfile(model=_spec(), prompts=[p0, p1], layers=list(LAYERS), k_max=K, settings=settings,
                       recommendation=rec)


# --------------------------------------------------------------------------------------------------- plots


def test_first_token_heatmap(profile: SinkProfile) -> None:
    fig = plots.first_token_heatmap(profile)
    assert isinstance(fig, go.Figure)
    hm = fig.data[0]
    assert hm.type == "heatmap"
    z = np.asarray(hm.z)
    assert z.shape == (3, 4)
    np.testing.assert_allclose(z, profile.first_token_mass)
    assert list(hm.y) == LAYERS and list(hm.x) == [0, 1, 2, 3]
    assert (hm.zmin, hm.zmax) == (0.0, 1.0)
    assert "0.3" in hm.colorbar.title.text
    assert fig.layout.yaxis.autorange == "reversed" and "top" in fig.layout.yaxis.title.text
    # the ring overlay marks exactly the sink heads
    rings = fig.data[1]
    assert sorted(zip(rings.y, rings.x, strict=True)) == [(0, 0), (1, 0), (1, 1), (3, 2)]


def test_sink_mass_curves(profile: SinkProfile) -> None:
    fig = plots.sink_mass_curves(profile)
    layer_lines = [t for t in fig.data if (t.name or "").startswith("layer ")]
    assert [t.name for t in layer_lines] == ["layer 0", "layer 1", "layer 3"]
    for i, t in enumerate(layer_lines):
        assert list(t.x) == [1, 2, 3, 4]
        np.testing.assert_allclose(t.y, profile.sink_mass[i].mean(axis=0))
    bold = next(t for t in fig.data if (t.name or "").startswith("mean over sink heads"))
    np.testing.assert_allclose(bold.y, profile.recommendation.evidence["curve"])
    assert bold.line.width > layer_lines[0].line.width
    # the recommendation (share 0.9) and its vertical marker
    rec = profile.recommendation
    curve = np.asarray(rec.evidence["curve"])
    assert rec.sinks == int(np.argmax(curve >= 0.9 * curve[-1])) + 1
    vlines = [s for s in fig.layout.shapes if s.x0 == s.x1 and s.xref == "x"]
    assert [s.x0 for s in vlines] == [rec.sinks]


def test_sink_mass_curves_without_curve_in_evidence(profile: SinkProfile) -> None:
    profile.recommendation.evidence.pop("curve")
    fig = plots.sink_mass_curves(profile)
    bold = next(t for t in fig.data if (t.name or "").startswith("mean over sink heads"))
    chosen = profile.first_token_mass > profile.threshold
    np.testing.assert_allclose(bold.y, profile.sink_mass[chosen].mean(axis=0))


def test_attention_map_picks_layer_and_head(profile: SinkProfile) -> None:
    maps = profile.prompts[0].attention.maps
    fig = plots.attention_map(profile, layer=3, head=2)
    hm = fig.data[0]
    np.testing.assert_allclose(np.asarray(hm.z), maps[2, 2])  # layer 3 is row 2
    assert not np.allclose(np.asarray(hm.z), maps[2, 1])
    labels = profile.prompts[0].attention.labels
    assert list(hm.x) == [plots.label_text(lb) for lb in labels] == list(hm.y)
    assert list(hm.x)[2] == "2: '\\n'" and list(hm.x)[3] == "3-5"
    assert fig.layout.yaxis.autorange == "reversed"
    assert "Layer 3, head 2" in fig.layout.title.text
    # the same figure through the SinkProfile method
    np.testing.assert_allclose(np.asarray(profile.plot_attention(1, 0).data[0].z), maps[1, 0])


def test_attention_map_log(profile: SinkProfile) -> None:
    maps = profile.prompts[0].attention.maps.copy()
    maps[0, 1, 4, 0] = 0.0
    profile.prompts[0].attention.maps = maps
    fig = plots.attention_map(profile, layer=0, head=1, log=True)
    z = np.asarray(fig.data[0].z)
    np.testing.assert_allclose(z, np.log10(np.clip(maps[0, 1], 1e-6, None)), rtol=1e-6)  # float32 maps
    assert z[4, 0] == pytest.approx(-6.0)
    assert "log10" in fig.data[0].colorbar.title.text
    np.testing.assert_allclose(np.asarray(fig.data[0].customdata), maps[0, 1])  # hover keeps the raw value


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layer": 0, "head": 4}, "head 4 out of range"),
    ({"layer": 0, "head": -1}, "head -1 out of range"),
    ({"layer": 2, "head": 0}, "layer 2 was not analysed"),
    ({"layer": 0, "head": 0, "prompt": 1}, "no attention maps"),
    ({"layer": 0, "head": 0, "prompt": 7}, "out of range"),
    ({"layer": 0, "head": 0, "prompt": "nope"}, "no prompt named"),
])
def test_attention_map_errors(profile: SinkProfile, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plots.attention_map(profile, **kwargs)


def test_sink_positions_chart(profile: SinkProfile) -> None:
    fig = plots.sink_positions_chart(profile)
    bar = fig.data[0]
    assert bar.orientation == "h"
    assert list(bar.x) == [0.5, 0.1, 0.05, 0.02]
    assert [c[0] for c in bar.customdata] == [12.0, 3.0, 1.5, 0.8]
    assert list(bar.text) == ["12.0x uniform", "3.0x uniform", "1.5x uniform", "0.8x uniform"]
    assert "x uniform" in bar.hovertemplate
    assert list(bar.y[:2]) == ["#0 '&lt;s&gt;' · bos", "#2 '\\n' · newline"]  # the newline shows as \n
    assert "\n" not in "".join(bar.y) + "".join(c[3] for c in bar.customdata)
    assert bar.y[2] == "#5 '&lt;script&gt;alert(1)&lt;/scri… · word"  # cut, then escaped for plotly's labels
    assert bar.customdata[2][3] == "'&lt;script&gt;alert(1)&lt;/script&gt;'"  # whole token in the hover
    assert "<script>" not in "".join(bar.y) + "".join(c[3] for c in bar.customdata)
    assert fig.layout.yaxis.autorange == "reversed"  # strongest on top
    assert list(plots.sink_positions_chart(profile, prompt=EVIL_NAME).data[0].x) == [0.4]


def test_entropy_heatmap(profile: SinkProfile) -> None:
    fig = plots.entropy_heatmap(profile)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (3, 4)
    np.testing.assert_allclose(z, np.mean([p.entropy for p in profile.prompts], axis=0))
    assert "nats" in fig.data[0].colorbar.title.text
    assert list(fig.data[0].y) == LAYERS


def test_per_prompt_sink_rate(profile: SinkProfile) -> None:
    fig = plots.per_prompt_sink_rate(profile)
    bar = fig.data[0]
    np.testing.assert_allclose(bar.y, [4 / 12, 3 / 12])
    assert list(bar.x) == ["plain", "&lt;b&gt;evil&lt;/b&gt; | name"]
    assert list(bar.customdata) == [10, 12]
    assert [s.y0 for s in fig.layout.shapes] == [pytest.approx((4 / 12 + 3 / 12) / 2)]  # mean over prompts


def test_profile_plot_methods_delegate(profile: SinkProfile) -> None:
    np.testing.assert_allclose(np.asarray(profile.plot_heatmap().data[0].z), profile.first_token_mass)
    assert len(profile.plot_sink_mass().data) == len(plots.sink_mass_curves(profile).data)
    assert list(profile.plot_sink_positions(0).data[0].x) == [0.5, 0.1, 0.05, 0.02]


# -------------------------------------------------------------------------------------------------- report


def test_write_report_files(profile: SinkProfile, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    paths = report.write_report(profile, out)
    assert paths == {"json": out / "report.json", "html": out / "report.html", "md": out / "report.md"}
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    doc = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert doc == json.loads(json.dumps(profile.to_dict()))
    assert doc["schema"] == SCHEMA == "sinkscope.report/1"
    assert [h["layer"] for h in doc["sink_heads"]] == [0, 3, 1, 1]
    assert doc["recommendation"]["sinks"] == profile.recommendation.sinks
    assert paths["html"].read_text(encoding="utf-8") == report.render_html(profile).replace("\r\n", "\n")
    assert paths["md"].read_text(encoding="utf-8") == report.render_markdown(profile)
    mode = stat.S_IMODE(paths["json"].stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # a normal file, not mkstemp's 0600


def test_html_is_offline_and_self_contained(profile: SinkProfile) -> None:
    from plotly.offline import get_plotlyjs

    page = report.render_html(profile)
    bundle = get_plotlyjs()
    assert page.count(bundle) == 1
    assert page.count(bundle[:300]) == 1
    assert page.index(bundle) < page.index("</head>")
    assert '<script src="http' not in page and "<script src=" not in page
    outside = page.replace(bundle, "")  # the bundle itself names URLs (the plotly logo link), never loads them
    assert "http://" not in outside and "https://" not in outside
    # one script for plotly.js, one per figure: 1 heatmap + curves + 4 maps + 2 position charts + entropy + rates
    n_figures = page.count('class="plotly-graph-div"')
    assert n_figures == 1 + 1 + 4 + 2 + 1 + 1
    assert page.count("<script") == 1 + n_figures
    assert page.count("Plotly.newPlot") == n_figures


def test_html_content_and_escaping(profile: SinkProfile) -> None:
    page = report.render_html(profile, figures_for_heads=2)
    assert "<title>sinkscope report: tiny&lt;llama&gt;&amp;co</title>" in page
    assert "tiny<llama>" not in page
    assert "&lt;b&gt;evil&lt;/b&gt; | name" in page and "<b>evil</b>" not in page
    assert "alert(1)</script>" not in page and EVIL_TOKEN not in page
    assert page.count('class="plotly-graph-div"') == 1 + 1 + 2 + 2 + 1 + 1
    for layer, head in profile.strongest_heads(2):
        assert f'id="fig-attn-{layer}-{head}"' in page
    assert profile.strongest_heads(2) == [(0, 0), (3, 2)]
    sinks = profile.recommendation.sinks
    assert f'<div class="big">{sinks} <small>' in page
    assert f'<th class="hlc">{sinks}</th>' in page  # the recommended k is highlighted in the curve table
    assert "33.3%" in page and "25.0%" in page  # per-prompt sink rates
    assert "4 x 4 query heads, 2 KV heads" in page
    assert "sinkscope 0.1.0" in page and "sinkscope.report/1" in page


def test_html_without_maps(profile: SinkProfile) -> None:
    profile.prompts[0].attention = None
    page = report.render_html(profile)
    assert "No attention maps were kept" in page
    assert "fig-attn-" not in page


def test_markdown(profile: SinkProfile) -> None:
    md = report.render_markdown(profile)
    assert md.startswith("# Attention sinks in tiny\\<llama\\>\\&co\n")
    rec = profile.recommendation
    assert f"**Keep {rec.sinks} sink token" in md
    lines = md.splitlines()
    heads = lines[lines.index("## Top sink heads") + 4: lines.index("## Top sink heads") + 8]
    assert heads == ["| 1 | 0 | 0 | 0.800 |", "| 2 | 3 | 2 | 0.700 |", "| 3 | 1 | 1 | 0.450 |",
                     "| 4 | 1 | 0 | 0.400 |"]
    per_layer = lines.index("## First-token mass per layer")
    assert lines[per_layer + 4] == f"| 0 | {np.mean([0.8, 0.1, 0.05, 0.2]):.3f} | 0.800 | 1 |"
    assert lines[per_layer + 6] == "| 3 | 0.263 | 0.700 | 1 |"
    assert "| 7 | 'a\\|b' | punct | 0.0200 | 0.8 |" in lines
    assert "| 2 | '\\\\n' | newline | 0.1000 | 3.0 |" in lines  # renders as '\n'
    assert "| 5 | '\\<script\\>alert(1)\\</script\\>' | word | 0.0500 | 1.5 |" in lines
    assert "### \\<b\\>evil\\</b\\> \\| name (12 tokens)" in lines
    # every table row has the same number of unescaped pipes as its header
    for line in lines:
        if line.startswith("| "):
            cells = line.replace("\\|", "").count("|")
            assert cells >= 3 and line.endswith(" |")
    assert "|" not in EVIL_NAME.replace("|", "") and "\\| name" in md


# --------------------------------------------------------------------------------------------- output dir


def test_output_dir_is_a_file(profile: SinkProfile, tmp_path: Path) -> None:
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(OutputError, match="is an existing file"):
        report.check_output_dir(f)
    with pytest.raises(OutputError, match="is an existing file"):
        report.write_report(profile, f)
    assert f.read_text() == "x"


def test_output_dir_under_a_file(tmp_path: Path) -> None:
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(OutputError, match="part of that path is a file") as info:
        report.check_output_dir(f / "sub" / "dir")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_dir_not_writable(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="can't write to output directory"):
            report.check_output_dir(d)
        with pytest.raises(OutputError, match="can't create output directory"):
            report.check_output_dir(d / "new")
    finally:
        d.chmod(0o700)


def test_check_output_dir_creates_and_leaves_nothing(tmp_path: Path) -> None:
    d = tmp_path / "x" / "y"
    assert report.check_output_dir(d) == d
    assert d.is_dir() and list(d.iterdir()) == []
    assert report.check_output_dir(str(d)) == d  # existing directory: fine, still empty
    assert list(d.iterdir()) == []


# --------------------------------------------------------------------------------------------- atomicity


def test_interrupt_while_rendering_leaves_nothing(profile: SinkProfile, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_profile: SinkProfile) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "render_markdown", boom)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(profile, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupt_while_writing_keeps_old_report(profile: SinkProfile, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    old = {name: f"old {name}\n" for name in ("report.json", "report.html", "report.md")}
    for name, text in old.items():
        (out / name).write_text(text)
    real_fsync, calls = os.fsync, []

    def fsync_then_interrupt(fd: int) -> None:  # the third staged file is interrupted mid-write
        calls.append(fd)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(_io.os, "fsync", fsync_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(profile, out)
    assert len(calls) == 3
    assert {p.name: p.read_text() for p in out.iterdir()} == old  # untouched, no temp files left


def test_a_full_disk_is_one_line_and_keeps_the_old_report(profile: SinkProfile, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", full)
    with pytest.raises(report.OutputError) as e:
        report.write_report(profile, out)
    assert "No space left on device" in str(e.value) and "free some space" in str(e.value)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"report.json": "old\n"}


def test_a_writer_killed_outright_leaves_the_old_report_and_its_leftover_goes_later(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing the three report files (a subprocess that kills itself in its second
    fsync): the old files are intact; the temporary file it left is removed by the next write once stale."""
    import signal
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "out"
    out.mkdir()
    old = {name: f"old {name}\n" for name in ("report.json", "report.html", "report.md")}
    for name, text in old.items():
        (out / name).write_text(text)
    script = textwrap.dedent(f"""
        import os, signal
        from sinkscope import _io
        calls = []
        real = os.fsync
        def fsync(fd):
            calls.append(fd)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real(fd)
        _io.os.fsync = fsync
        _io.atomic_write_many({{{str(out / 'report.json')!r}: "new", {str(out / 'report.html')!r}: "new",
                                {str(out / 'report.md')!r}: "new"}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert {p.name: p.read_text() for p in out.iterdir() if not p.name.startswith(".")} == old
    leftovers = [p for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers and all(p.name.endswith(_io.TMP_SUFFIX) for p in leftovers)
    for p in leftovers:  # make them look old: a fresh one may be a write in progress and is kept
        os.utime(p, (p.stat().st_atime - 2 * _io.STALE_SECONDS, p.stat().st_mtime - 2 * _io.STALE_SECONDS))
    _io.atomic_write_many({out / "report.json": "new\n", out / "report.html": "new\n", out / "report.md": "new\n"})
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]


def test_atomic_write_text_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    assert _io.atomic_write_text(target, "new ünïcode\n") == target
    assert target.read_text(encoding="utf-8") == "new ünïcode\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_output_dir_write_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an unwritable directory looks like even to root: the probe file can't be created."""

    def refuse(*_args: object, **_kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(report.os, "open", refuse)
    with pytest.raises(OutputError, match=r"can't write to output directory .*Permission denied; choose"):
        report.check_output_dir(tmp_path)


def test_heatmap_marks_global_layers_of_hybrid_models(profile: SinkProfile) -> None:
    from dataclasses import replace

    types = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
    hybrid = replace(profile, model=replace(profile.model, layer_types=types, sliding_window=4))
    fig = plots.first_token_heatmap(hybrid)
    assert list(fig.layout.yaxis.ticktext) == ["0", "1 global", "3 global"]  # LAYERS = [0, 1, 3]
    assert list(fig.layout.yaxis.tickvals) == [0, 1, 3]
    assert plots.first_token_heatmap(profile).layout.yaxis.ticktext is None  # uniform layers: plain numbers


# ------------------------------------------------------------------------------- learned sinks (gpt-oss)

# Hand-made learned-sink mass per prompt [3 layers, 4 heads], and its mean worked out by hand.
LSM0 = np.array([[0.05, 0.6, 0.6, 0.1], [0.2, 0.3, 0.5, 0.65], [0.0, 0.35, 0.1, 0.6]])
LSM1 = np.array([[0.15, 0.5, 0.4, 0.1], [0.2, 0.5, 0.3, 0.55], [0.2, 0.15, 0.1, 0.6]])
LSM = np.array([[0.1, 0.55, 0.5, 0.1], [0.2, 0.4, 0.4, 0.6], [0.1, 0.25, 0.1, 0.6]])
# above 0.3: L0H1 .55, L0H2 .5, L1H1 .4, L1H2 .4, L1H3 .6, L3H3 .6; mean over all 3.9 / 12 = 0.325
LSM_HEADS = [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (3, 3)]


def _learned(profile: SinkProfile, ftm_scale: float = 1.0) -> SinkProfile:
    """``profile`` as a model with learned sinks would give it; ``ftm_scale`` < 1 shrinks the token sinks."""
    from dataclasses import replace

    prompts = []
    for p, lsm in zip(profile.prompts, (LSM0, LSM1), strict=True):
        ftm = p.first_token_mass * ftm_scale
        prompts.append(replace(p, learned_sink_mass=lsm, first_token_mass=ftm, sink_mass=_sink_mass(ftm) * ftm_scale))
    out = replace(profile, prompts=prompts)
    out.recommendation = recommend_from_attention(out.sink_mass, out.first_token_mass, share=0.9,
                                                  learned_sink_mass=out.learned_sink_mass)
    return out


@pytest.fixture
def learned(profile: SinkProfile) -> SinkProfile:
    return _learned(profile)


def test_learned_sink_heatmap(learned: SinkProfile) -> None:
    fig = plots.learned_sink_heatmap(learned)
    hm = fig.data[0]
    assert hm.type == "heatmap"
    np.testing.assert_allclose(np.asarray(hm.z), LSM, atol=1e-12)
    assert list(hm.y) == LAYERS and list(hm.x) == [0, 1, 2, 3]
    assert (hm.zmin, hm.zmax) == (0.0, 1.0)
    assert "learned-sink mass" in hm.colorbar.title.text and "learned-sink mass" in hm.hovertemplate
    np.testing.assert_allclose(np.asarray(hm.customdata), np.mean([FTM0, FTM1], axis=0))  # hover: first-token mass
    assert "first-token mass %{customdata:.3f}" in hm.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"
    rings = fig.data[1]
    assert sorted(zip(rings.y, rings.x, strict=True)) == LSM_HEADS
    np.testing.assert_allclose(np.asarray(learned.plot_learned_sinks().data[0].z), LSM, atol=1e-12)
    # the first-token heatmap keeps its numbers and gains the learned-sink mass in its hover
    ft = plots.first_token_heatmap(learned).data[0]
    np.testing.assert_allclose(np.asarray(ft.z), np.mean([FTM0, FTM1], axis=0))
    np.testing.assert_allclose(np.asarray(ft.customdata), LSM, atol=1e-12)
    assert "learned-sink mass %{customdata:.3f}" in ft.hovertemplate


def test_learned_sink_heatmap_refuses_a_model_without_learned_sinks(profile: SinkProfile) -> None:
    with pytest.raises(ConfigError, match="has no learned sinks"):
        plots.learned_sink_heatmap(profile)
    with pytest.raises(ConfigError, match="has no learned sinks"):
        profile.plot_learned_sinks()
    ft = plots.first_token_heatmap(profile).data[0]
    assert ft.customdata is None and "learned" not in ft.hovertemplate


def test_attention_map_title_gives_the_heads_learned_sink(learned: SinkProfile, profile: SinkProfile) -> None:
    assert plots.attention_map(learned, layer=3, head=3).layout.title.text.endswith(" · learned sink 0.600")
    assert "learned" not in plots.attention_map(profile, layer=3, head=3).layout.title.text


def test_learned_sinks_in_report_json(learned: SinkProfile, profile: SinkProfile, tmp_path: Path) -> None:
    doc = json.loads(report.write_report(learned, tmp_path)["json"].read_text(encoding="utf-8"))
    np.testing.assert_allclose(doc["learned_sink_mass"], LSM, atol=1e-6)
    assert doc["model"] == profile.to_dict()["model"]
    ev = doc["recommendation"]["evidence"]
    assert ev["learned_sink_heads"] == len(LSM_HEADS)
    assert ev["learned_sink_mass_mean"] == pytest.approx(0.325)
    np.testing.assert_allclose(ev["learned_sink_mass_by_layer"], [1.25 / 4, 1.6 / 4, 1.05 / 4], atol=1e-6)
    # the token sink heads are counted as before: the same sink count as without learned sinks
    assert doc["recommendation"]["sinks"] == profile.recommendation.sinks
    assert ev["curve"] == profile.recommendation.evidence["curve"]
    assert json.loads(json.dumps(profile.to_dict()))["learned_sink_mass"] is None


def test_learned_sinks_in_report_html(learned: SinkProfile) -> None:
    page = report.render_html(learned)
    assert 'id="fig-learned-sink"' in page
    assert page.count('class="plotly-graph-div"') == 1 + 1 + 1 + 4 + 2 + 1 + 1  # one more: the learned-sink map
    assert "Attention on the learned sink" in page
    assert "needs no pinned token for it" in page and "<code>sinkscope eval-stream</code>" in page
    assert f"heads give it {0.325:.1%} of their attention on average ({len(LSM_HEADS)} of 12 heads" in page
    for i, layer in enumerate(LAYERS):  # the per-layer table, numbers from the hand-made arrays
        row = f"<td>{layer}</td><td>{LSM[i].mean():.3f}</td><td>{LSM[i].max():.3f}</td><td>{(LSM[i] > 0.3).sum()}</td>"
        assert row in page
    assert "<th>learned-sink mass</th>" in page  # top sink heads: L0H0 first, learned-sink mass 0.1
    assert "<td>0</td><td>0</td><td>0.800</td>" in page and "<td>0.100</td></tr>" in page


def test_learned_sinks_in_report_markdown(learned: SinkProfile) -> None:
    md = report.render_markdown(learned)
    lines = md.splitlines()
    at = lines.index("## Learned sinks")
    assert "needs no pinned token for it" in lines[at + 2] and "`sinkscope eval-stream`" in lines[at + 2]
    table = lines[lines.index("| layer | mean learned-sink mass | max | heads above threshold |"):][2:5]
    assert table == [f"| {layer} | {LSM[i].mean():.3f} | {LSM[i].max():.3f} | {(LSM[i] > 0.3).sum()} |"
                     for i, layer in enumerate(LAYERS)]
    heads = lines[lines.index("## Top sink heads") + 2: lines.index("## Top sink heads") + 8]
    assert heads[0] == "| # | layer | head | first-token mass | learned-sink mass |"
    assert heads[2:] == ["| 1 | 0 | 0 | 0.800 | 0.100 |", "| 2 | 3 | 2 | 0.700 | 0.100 |",
                         "| 3 | 1 | 1 | 0.450 | 0.400 |", "| 4 | 1 | 0 | 0.400 | 0.200 |"]
    assert "| learned-sink mass (mean over heads) | 0.325 |" in md  # the recommendation's evidence table


def test_reports_of_models_without_learned_sinks_say_nothing_of_them(profile: SinkProfile) -> None:
    page, md = report.render_html(profile), report.render_markdown(profile)
    assert "learned" not in page.replace(plots_bundle(), "").lower()
    assert "learned" not in md.lower()


def plots_bundle() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def test_learned_sink_doing_the_job_is_said_in_the_reports(profile: SinkProfile) -> None:
    """No head above 0.3 on its first tokens, six on the learned sink: 0 sink tokens, and the reports say why."""
    weak = _learned(profile, ftm_scale=0.25)
    assert not (weak.first_token_mass > 0.3).any() and not (weak.sink_mass[..., -1] > 0.3).any()
    rec = weak.recommendation
    assert rec.sinks == 0 and rec.evidence["learned_sink_carries_excess"] is True
    for text in (report.render_html(weak), report.render_markdown(weak)):
        assert "the learned sink does the job" in text
        assert "the learned sink takes the excess, so a StreamingLLM cache needs no pinned token" in text


def test_model_card_names_what_the_scheme_found(profile: SinkProfile) -> None:
    """Learned sinks, soft-capping, value dims and hybrid layers appear in the model card only when present."""
    from dataclasses import replace

    plain = report.render_markdown(profile)
    assert "learned sinks" not in plain and "soft-cap" not in plain and "attention layers" not in plain
    odd = replace(profile, model=replace(profile.model, learned_sinks=True, softcap=50.0, v_head_dim=6,
                                         attention_layers=(1, 3)))
    md = report.render_markdown(odd)
    for row in ("| learned sinks | a sink logit per head |", "| soft-cap | 50 |",
                f"| head dim | {profile.model.head_dim} (values 6) |",
                "| attention layers | 1, 3 (the others have none) |"):
        assert row in md, row
