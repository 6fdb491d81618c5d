"""report.html in real headless Chromium: every figure renders, offline, with no console errors."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
from conftest import REPO_ROOT, TEXT_60

import sinkscope
from sinkscope.report import write_report

pytestmark = pytest.mark.browser

_spec = importlib.util.spec_from_file_location("screenshot", REPO_ROOT / "docs" / "screenshot.py")
screenshot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screenshot)


@pytest.fixture(scope="module")
def report_html(sink_llama, tmp_path_factory):
    if screenshot.find_chromium() is None:
        msg = "chromium is not installed (make browser installs Debian's chromium and chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    profile = sinkscope.analyze(sink_llama, [TEXT_60, TEXT_60[::-1]], k_max=4, map_size=16, progress=False)
    return write_report(profile, tmp_path_factory.mktemp("report"))["html"]


def test_all_figures_render(report_html):
    html_source = report_html.read_text()
    n_figures = html_source.count('class="plotly-graph-div"')
    assert n_figures >= 6  # heatmap, curves, attention maps, positions, entropy, per-prompt rate
    dom, log = screenshot.dump_dom(report_html)
    # plotly replaces each empty graph div with a rendered container holding its SVG layers.
    rendered = len(re.findall(r'class="[^"]*js-plotly-plot', dom))
    assert rendered == n_figures, log[-2000:]
    assert dom.count('class="main-svg"') >= n_figures
    assert "Uncaught" not in log and "ReferenceError" not in log, log[-2000:]
    assert "Recommended" in dom


def test_screenshot_is_made(report_html, tmp_path):
    png = screenshot.screenshot(report_html, tmp_path / "shot.png", height=900)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a blank page compresses to a few kB
