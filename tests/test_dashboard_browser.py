"""The dashboard in real headless Chromium (dash's ``dash_duo``: the app served from this process, Selenium
driving Debian's chromium + chromedriver). A tiny random-weight Llama keeps these tests fast; the real
SmolLM2 is exercised in ``test_dashboard_real_model``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

from dashboard import Limits, create_app
from dashboard.serve import shutdown_services

pytestmark = pytest.mark.browser

TYPED = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree, and the sun rose."
LIMITS = Limits(max_prompt_tokens=50_000, max_new_tokens=1000, max_analysis_tokens=250)


@pytest.fixture(autouse=True)
def _need_chromium():
    if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
        msg = "chromium and chromedriver are not installed (make browser installs Debian's packages)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def app(tiny_llama, request):
    limits = getattr(request, "param", LIMITS)
    app = create_app({"tiny-llama": tiny_llama}, limits=limits)
    yield app
    shutdown_services(app)  # streams, analyses and evaluations: none may run on past the test


def set_value(dash_duo, selector: str, value: str) -> None:
    """Replace an input's value as a user would (select all, type, Enter: debounced inputs commit on Enter)."""
    el = dash_duo.find_element(selector)
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(value)
    if el.tag_name == "input":
        el.send_keys(Keys.ENTER)


_last_status = ""


def status(dash_duo) -> str:
    global _last_status
    _last_status = dash_duo.find_element("#stream-status").text
    return _last_status


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; status: {_last_status}")


def press(dash_duo, selector: str) -> None:
    """Click a button with a JS click: a busy page (thousands of token spans, a chart redrawn every 16 tokens)
    can drop a pointer click that lands while it re-lays out."""
    dash_duo.driver.execute_script("arguments[0].click();", dash_duo.find_element(selector))


def switch_sinks(dash_duo, on: bool) -> None:
    """Tick or untick "keep sinks" (a JS click: no coordinates to miss while the page grows)."""
    box = dash_duo.find_element("#keep-sinks input")
    if box.is_selected() != on:
        dash_duo.driver.execute_script("arguments[0].click();", box)
    wait_until(lambda: dash_duo.find_element("#keep-sinks input").is_selected() == on, what="the box to change")


def token_count(dash_duo) -> int:
    return len(dash_duo.find_elements("#stream-text .tok"))


def streamed(dash_duo) -> int:
    """Tokens streamed so far, from the status line ("running N tokens"): the text pane keeps only the last
    512-1024 tokens, so counting its tokens stops growing on a long stream."""
    import re

    m = re.search(r"(\d+) tokens ·", status(dash_duo))
    return int(m.group(1)) if m else 0


def analyse_typed(dash_duo) -> None:
    dash_duo.select_dcc_dropdown("#prompt-choice", "type your own")
    set_value(dash_duo, "#prompt-text", TYPED)
    press(dash_duo, "#analyze")
    # (the page analysed its default prompt on load: wait for this one's result)
    wait_until(lambda: "typed prompt:" in dash_duo.find_element("#analysis-status").text
               and "analysed in" in dash_duo.find_element("#analysis-status").text, timeout=30,
               what="the typed prompt's analysis")


def test_page_loads_analysis_renders_and_head_click_updates_the_map(dash_duo, app):
    dash_duo.start_server(app)
    dash_duo.wait_for_contains_text("#model-status", "3 layers x 4 heads", timeout=20)
    analyse_typed(dash_duo)
    dash_duo.wait_for_element("#heatmap .hm, #heatmap .heatmaplayer", timeout=10)
    dash_duo.wait_for_contains_text("#recommendation", "Keep", timeout=10)
    dash_duo.wait_for_contains_text("#head-map .gtitle", "Layer", timeout=10)
    assert dash_duo.find_elements("#sink-curves .scatterlayer .trace")
    assert dash_duo.find_elements("#sink-positions .barlayer .trace")
    dash_duo.wait_for_contains_text("#activations .gtitle", "Residual norms per layer", timeout=10)
    assert len(dash_duo.find_elements("#activations .scatterlayer .trace")) >= 3  # first, median, largest
    dash_duo.wait_for_contains_text("#mechanism", "How queries meet the first token", timeout=10)
    assert "Dormant heads" in dash_duo.find_element("#mechanism").text

    # Click the top-left cell (layer 0, head 0), then the bottom-right one (layer 2, head 3): 3 x 4 cells.
    drag = dash_duo.find_element("#heatmap .nsewdrag")
    w, h = drag.size["width"], drag.size["height"]
    for (dx, dy), title in (((-3 * w / 8, -h / 3), "Layer 0, head 0"), ((3 * w / 8, h / 3), "Layer 2, head 3")):
        ActionChains(dash_duo.driver).move_to_element(drag).move_by_offset(int(dx), int(dy)).click().perform()
        dash_duo.wait_for_contains_text("#head-map .gtitle", title, timeout=10)

    dash_duo.find_element("#scale input[value='log']").click()
    dash_duo.wait_for_contains_text("#head-map .gtitle", "(log)", timeout=10)

    # The atlas: the checkout's first two saved reports beside this page's analysis, one line per model.
    press(dash_duo, "#atlas-compare")
    dash_duo.wait_for_contains_text("#atlas-table", "Sink rate: heads whose", timeout=20)
    header = dash_duo.find_element("#atlas-table table thead").text
    assert "tiny" in header and len(dash_duo.find_elements("#atlas-table table thead th")) == 4  # label + 3
    wait_until(lambda: len(dash_duo.find_elements("#atlas-layers .scatterlayer .trace")) == 3, what="the atlas lines")
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


@pytest.fixture
def sink_logit_app(tok_bos):
    """The dashboard on a tiny gpt-oss whose heads have large learned sink logits."""
    import torch
    from conftest import loaded
    from families import build

    model = build("gpt_oss")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(4.0)
    app = create_app({"tiny-gpt-oss": loaded(model, tok_bos, "tiny-gpt-oss")}, limits=LIMITS)
    yield app
    shutdown_services(app)  # streams, analyses and evaluations: none may run on past the test


def test_learned_sink_view_of_a_gpt_oss_style_model(dash_duo, sink_logit_app):
    dash_duo.start_server(sink_logit_app)
    dash_duo.wait_for_contains_text("#model-status", "2 layers x 4 heads", timeout=20)
    assert not dash_duo.find_element("#heatmap-views").is_displayed()  # hidden until a learned-sink model runs
    analyse_typed(dash_duo)
    dash_duo.wait_for_element("#heatmap .hm, #heatmap .heatmaplayer", timeout=10)
    wait_until(lambda: dash_duo.find_element("#heatmap-views").is_displayed(), what="the heatmap switch")
    dash_duo.wait_for_contains_text("#heatmap .gtitle", "first token", timeout=10)
    dash_duo.find_element("#heatmap-view input[value='learned-sink']").click()
    dash_duo.wait_for_contains_text("#heatmap .gtitle", "learned sink", timeout=10)
    dash_duo.wait_for_contains_text("#head-detail", "learned-sink mass", timeout=10)
    dash_duo.wait_for_contains_text("#recommendation", "learned sink", timeout=10)
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_stream_shows_tokens_arriving_and_the_switch_changes_the_cache(dash_duo, app):
    dash_duo.start_server(app)
    press(dash_duo, "#start")  # the default text (a long sample), S = 4, W = 128
    wait_until(lambda: token_count(dash_duo) > 0, what="first tokens")
    first = streamed(dash_duo)
    wait_until(lambda: streamed(dash_duo) > first + 20, what="more tokens")  # arriving, not in one block
    wait_until(lambda: "cache 131 tokens" in status(dash_duo), what="a full cache (S + W - 1 = 131)")
    assert "sinks on" in status(dash_duo)

    switch_sinks(dash_duo, False)  # evict the sinks mid-stream
    wait_until(lambda: "cache 127 tokens" in status(dash_duo), what="the cache without its 4 sinks")
    assert "sinks EVICTED" in status(dash_duo)
    wait_until(lambda: dash_duo.find_elements("#stream-text .tok.off"), what="tokens streamed without sinks")

    switch_sinks(dash_duo, True)  # and back: re-prefilled
    wait_until(lambda: "cache 131 tokens" in status(dash_duo), what="the sinks back")
    assert "sinks on" in status(dash_duo)

    press(dash_duo, "#stop")
    wait_until(lambda: "stopped" in status(dash_duo), what="the stream to stop")
    assert not app.sinkscope.streams.running()
    wait_until(lambda: dash_duo.find_elements("#stream-chart .scatterlayer .trace"), what="the live chart")
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def second_browser():
    """Another headless Chromium: a second user with a session of their own."""
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("DASH_TEST_CHROMEPATH", "/usr/bin/chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts)


def test_two_sessions_stream_independently(dash_duo, app):
    from selenium.webdriver.common.by import By

    dash_duo.start_server(app)
    press(dash_duo, "#start")
    wait_until(lambda: "cache 131 tokens" in status(dash_duo), what="session 1 streaming with W = 128")

    other = second_browser()
    try:
        other.get(dash_duo.server_url)

        def other_status() -> str:
            found = other.find_elements(By.ID, "stream-status")
            return found[0].text if found else ""

        wait_until(lambda: other.find_elements(By.ID, "window"), what="the second page")
        box = other.find_element(By.ID, "window")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys("32", Keys.ENTER)
        other.execute_script("arguments[0].click();", other.find_element(By.ID, "start"))
        wait_until(lambda: "cache 35 tokens" in other_status(), what="session 2 streaming with W = 32")
        other.execute_script("arguments[0].click();", other.find_element(By.CSS_SELECTOR, "#keep-sinks input"))
        wait_until(lambda: "cache 31 tokens" in other_status(), what="session 2 without sinks")
        assert len(app.sinkscope.streams.running()) == 2

        before = streamed(dash_duo)
        wait_until(lambda: streamed(dash_duo) > before, what="session 1 still streaming")
        assert "cache 131 tokens" in status(dash_duo) and "sinks on" in status(dash_duo)  # untouched
        press(dash_duo, "#stop")
        try:
            wait_until(lambda: "stopped" in status(dash_duo), timeout=30, what="session 1 to stop")
        except AssertionError:
            # Seen once in a full CI run (two Chromiums and two streams on 2 cores, ~1000 token spans in the
            # page): the press left no trace for 60 s. Say what the page and server saw, then press again as
            # a user would; the single-session stream test holds one press to the strict standard.
            ack = dash_duo.find_element("#stop-ack").get_attribute("textContent")
            states = [(x.state, len(x.tokens)) for x in app.sinkscope.streams.running()]
            warnings.warn(f"Stop press not seen in 30 s (stop-ack {ack!r}, running streams {states}); "
                          "pressing again", stacklevel=1)
            press(dash_duo, "#stop")
            wait_until(lambda: "stopped" in status(dash_duo), what="session 1 to stop")
        assert "running" in other_status()  # session 2 goes on
    finally:
        other.quit()


QUICK_REAPER = dataclasses.replace(LIMITS, idle_seconds=4.0)


@pytest.mark.parametrize("app", [QUICK_REAPER], indirect=True)
def test_a_stream_stops_when_its_page_goes_away(dash_duo, app):
    dash_duo.start_server(app)
    press(dash_duo, "#start")
    wait_until(lambda: token_count(dash_duo) > 0, what="tokens")
    (stream,) = app.sinkscope.streams.running()
    dash_duo.driver.get("about:blank")
    wait_until(lambda: not stream.running, timeout=QUICK_REAPER.idle_seconds + 10,
               what="the reaper to stop the orphaned stream")
    assert "stopped polling" in stream.stop_reason


def test_bad_input_is_explained_in_the_page(dash_duo, app):
    dash_duo.start_server(app)
    set_value(dash_duo, "#stream-prompt", " ")
    press(dash_duo, "#start")
    dash_duo.wait_for_contains_text("#stream-message", "the prompt is empty", timeout=10)

    set_value(dash_duo, "#stream-prompt", TYPED)
    set_value(dash_duo, "#window", "300")  # S + W = 304 > the tiny model's 256 positions
    press(dash_duo, "#start")
    dash_duo.wait_for_contains_text("#stream-message", "256 positions", timeout=10)

    set_value(dash_duo, "#window", "64")
    press(dash_duo, "#start")  # the page is still usable
    wait_until(lambda: token_count(dash_duo) > 0, what="a stream after the refusals")
    dash_duo.wait_for_text_to_equal("#stream-message", "", timeout=10)

    dash_duo.select_dcc_dropdown("#prompt-choice", "type your own")
    set_value(dash_duo, "#prompt-text", "x" * 400)  # past --max-analysis-tokens (250 here)
    press(dash_duo, "#analyze")
    dash_duo.wait_for_contains_text("#analysis-status", "the prompt has 401 tokens; the dashboard analyses at most "
                                    "250", timeout=20)


def test_server_restart_mid_stream_is_explained(dash_duo, app):
    dash_duo.start_server(app)
    press(dash_duo, "#start")
    wait_until(lambda: token_count(dash_duo) > 0, what="tokens")
    app.sinkscope.streams.shutdown()  # what a restart looks like to the page: its stream is unknown
    dash_duo.wait_for_contains_text("#stream-message", "gone from the server", timeout=10)
    press(dash_duo, "#start")  # and it can start again
    dash_duo.wait_for_text_to_equal("#stream-message", "", timeout=10)
    wait_until(lambda: "running" in status(dash_duo), what="a new stream")


PPL_TEXT = ("Attention sinks: a model parks the attention it does not need on the first tokens, so a cache that "
            "evicts them breaks the model. Keep a few sinks and a window of recent tokens, and the loss stays low. ")


def test_perplexity_by_sinks_panel_draws_the_curve_beside_a_stream(dash_duo, app):
    dash_duo.start_server(app)
    set_value(dash_duo, "#stream-prompt", PPL_TEXT)  # 202 tokens: 8 sinks + W 24 + 170 scored
    set_value(dash_duo, "#window", "24")
    press(dash_duo, "#start")
    wait_until(lambda: token_count(dash_duo) > 0, what="the stream's first tokens")
    press(dash_duo, "#ppl-run")  # while the stream runs: the two take turns on the model
    dash_duo.wait_for_contains_text("#ppl-caption", "scored tokens", timeout=60)
    caption = dash_duo.find_element("#ppl-caption").text
    assert f"{len(PPL_TEXT) + 1} text tokens · window 24 · {len(PPL_TEXT) + 1 - 8 - 24} scored tokens" in caption
    assert "best: S = " in caption and "dense " in caption
    assert dash_duo.find_element("#ppl-figure").is_displayed()
    dash_duo.wait_for_contains_text("#ppl-chart .gtitle", "Perplexity vs sink count (window 24", timeout=10)
    assert dash_duo.find_elements("#ppl-chart .scatterlayer .trace")
    assert dash_duo.find_element("#ppl-status").text == ""
    assert dash_duo.find_element("#ppl-run").is_enabled()
    assert token_count(dash_duo) > 0 and "error" not in status(dash_duo)  # the stream carried on
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_perplexity_by_sinks_panel_explains_a_short_prompt(dash_duo, app):
    dash_duo.start_server(app)
    set_value(dash_duo, "#stream-prompt", "Too short to evaluate.")  # 23 tokens: 8 sinks + W 16 + 32 need 56
    press(dash_duo, "#ppl-run")
    dash_duo.wait_for_contains_text("#ppl-status", "has 23 tokens; evaluating sinks up to 8 with a window of 16 "
                                                   "needs at least 56", timeout=30)
    assert "\n" not in dash_duo.find_element("#ppl-status").text
    assert not dash_duo.find_element("#ppl-figure").is_displayed()
    assert dash_duo.find_element("#ppl-caption").text == ""
    press(dash_duo, "#start")  # the rest of the page is untouched
    wait_until(lambda: token_count(dash_duo) > 0, what="a stream after the refusal")
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


@pytest.mark.real
def test_real_smollm2_analysis_and_stream(dash_duo, smollm2):
    """The README's dashboard on the real default model: an analysis renders, a stream runs and switches."""
    app = create_app({"smollm2-135m": smollm2})
    try:
        dash_duo.start_server(app)
        dash_duo.wait_for_contains_text("#model-status", "30 layers x 9 heads", timeout=30)
        # The page opens on an analysis of its default prompt, without a click.
        dash_duo.wait_for_contains_text("#analysis-status", "prose: 593 tokens", timeout=60)
        dash_duo.wait_for_contains_text("#recommendation", "Keep 1 sink token.", timeout=10)
        assert "In the " in dash_duo.find_element("#recommendation").text  # sentences, not a dump of the evidence
        jobs = len(app.sinkscope.analyses._jobs)
        dash_duo.driver.refresh()  # a reload (or another tab) shares the finished analysis
        dash_duo.wait_for_contains_text("#analysis-status", "prose: 593 tokens", timeout=30)
        assert len(app.sinkscope.analyses._jobs) == jobs
        analyse_typed(dash_duo)
        dash_duo.wait_for_contains_text("#head-map .gtitle", "Layer", timeout=30)
        set_value(dash_duo, "#window", "32")
        press(dash_duo, "#start")
        wait_until(lambda: "cache 35 tokens" in status(dash_duo), timeout=120, what="a full S + W - 1 cache")
        switch_sinks(dash_duo, False)
        wait_until(lambda: "cache 31 tokens" in status(dash_duo), timeout=60, what="the sinks evicted")
        assert dash_duo.get_logs() == [], dash_duo.get_logs()
    finally:
        shutdown_services(app)


def analysis_says(dash_duo, text: str, timeout: float) -> None:
    global _last_status

    def says() -> bool:
        global _last_status
        _last_status = dash_duo.find_element("#analysis-status").text
        return text in _last_status

    wait_until(says, timeout=timeout, what=f"{text!r} in the analysis status")


def test_a_reload_mid_analysis_shares_the_running_job_and_the_page_recovers(dash_duo, app, monkeypatch):
    import threading

    import sinkscope

    real, gate, calls = sinkscope.analyze, threading.Event(), []

    def held(lm, prompt, **kw):  # an analysis that takes as long as the test wants
        calls.append(prompt.text)
        assert gate.wait(60)
        return real(lm, prompt, **kw)

    def analyse(text: str, expect: str) -> None:
        dash_duo.select_dcc_dropdown("#prompt-choice", "type your own")
        set_value(dash_duo, "#prompt-text", text)
        press(dash_duo, "#analyze")
        analysis_says(dash_duo, expect, 20)

    monkeypatch.setattr(sinkscope, "analyze", held)
    dash_duo.start_server(app)
    analyse(TYPED, "analysing typed prompt")
    dash_duo.driver.refresh()  # mid-analysis: a new page, a new session
    analyse(TYPED, "analysing typed prompt")  # the same text: it follows the running job
    gate.set()
    analysis_says(dash_duo, "analysed in", 30)
    assert calls == [TYPED]  # one analysis for the two pages

    gate.clear()
    other = TYPED.replace("cat", "fox")
    analyse(other, "analysing typed prompt")
    dash_duo.driver.refresh()  # the page leaves while its job runs (and holds the model)
    analyse(TYPED, "analysed in")  # the kept result, at once, though the model is busy
    assert dash_duo.find_element("#recommendation").text.strip()
    gate.set()
    analyse(other, "analysed in")  # the job left behind finished, and is shared too
    assert calls == [TYPED, other]
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_a_server_killed_mid_stream_is_shown_and_the_page_recovers_on_restart(dash_duo, llama_dir):
    import signal
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from dashboard_load import Server

    def serve(port: int | None = None) -> Server:
        return Server(str(llama_dir), max_streams=2, extra=["--max-prompt-tokens", "20000"], port=port)

    server = serve()
    try:
        dash_duo.driver.get(server.base)
        analysis_says(dash_duo, "analysed in", 60)
        assert not dash_duo.find_element("#server-banner").is_displayed()
        press(dash_duo, "#start")  # the long sample: 16k tokens read one by one, far longer than this test
        wait_until(lambda: "running" in status(dash_duo) and token_count(dash_duo) > 0,
                   what=f"the stream ({dash_duo.find_element('#stream-message').text})")
        server.proc.send_signal(signal.SIGKILL)  # no shutdown: the page's requests just fail
        server.proc.wait(10)
        dash_duo.wait_for_contains_text("#server-banner", "has not answered since", timeout=30)
        assert "running" in status(dash_duo)  # what the page knew stays on it

        server = serve(server.port)  # the same address, a new process
        wait_until(lambda: not dash_duo.find_element("#server-banner").is_displayed(), timeout=30,
                   what="the notice to go once the server answers")
        dash_duo.wait_for_contains_text("#stream-message", "gone from the server", timeout=20)
        press(dash_duo, "#start")
        dash_duo.wait_for_text_to_equal("#stream-message", "", timeout=20)
        wait_until(lambda: "running" in status(dash_duo) or "done" in status(dash_duo), what="a new stream")
    finally:
        server.stop()
