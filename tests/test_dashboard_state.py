"""The dashboard's server-side state without a browser: limits, sessions, the reaper, failures."""

from __future__ import annotations

import gc
import socket
import time
import weakref
from pathlib import Path

import pytest
from test_cli import assert_one_line_error

from dashboard import create_app
from dashboard.state import Analyses, DashboardError, Limits, ModelPool, StreamRequest, Streams, describe
from sinkscope import Prompt
from sinkscope.cli import main
from sinkscope.errors import ModelLoadError

TEXT = "The cat sat on the mat. " * 20


def request(**kw) -> StreamRequest:
    return StreamRequest(**{"model": "tiny", "prompt": TEXT, "sinks": 2, "window": 16, "max_new_tokens": 50, **kw})


@pytest.fixture
def streams(tiny_llama):
    s = Streams(ModelPool({"tiny": tiny_llama}), Limits(max_streams=2, max_prompt_tokens=600, max_new_tokens=500,
                                                         idle_seconds=0.5))
    yield s
    s.shutdown()


def wait(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not pred():
        time.sleep(0.02)
    assert pred()


@pytest.mark.parametrize(("kw", "message"), [
    ({"prompt": "  "}, "the prompt is empty"),
    ({"sinks": -1}, "sinks S must be 0 or more"),
    ({"window": 0}, "window W must be between 1 and"),
    ({"max_new_tokens": 501}, "new tokens must be between 0 and 500"),
    ({"prompt": "x" * 700}, "the limit is 600"),
    ({"window": 300}, "256 positions"),  # the SinkCache's own check, passed through
    ({"model": "nope"}, "unknown model 'nope'"),
])
def test_bad_requests_are_refused_with_a_reason(streams, kw, message):
    with pytest.raises(Exception, match=message):
        streams.start("a", request(**kw))
    assert not streams.running()


def test_streams_at_once_are_limited_and_sessions_are_separate(streams):
    a = streams.start("a", request(max_new_tokens=500))
    b = streams.start("b", request(window=8, max_new_tokens=500))
    with pytest.raises(DashboardError, match="2 streams are running"):
        streams.start("c", request())
    assert streams.get("a", b.id) is None  # a session sees only its own stream
    streams.set_sinks("b", b.id, False)
    wait(lambda: b.tokens and not b.tokens[-1].sinks_enabled)
    assert a.streamer.sinks_enabled and a.tokens[-1].sinks_enabled
    again = streams.start("a", request())  # a new stream replaces the session's old one
    wait(lambda: a.state == "stopped")
    assert a.stop_reason == "replaced by a new stream" and streams.get("a", again.id) is again


def test_the_reaper_stops_streams_whose_page_stopped_polling(streams):
    s = streams.start("a", request(max_new_tokens=500))
    # The page was last seen a while ago (set directly: a 500-token tiny stream may finish before any wait).
    s.last_seen -= 60
    assert s.running
    streams.reap()  # what the reaper thread does every second
    wait(lambda s=s: not s.running, timeout=10)
    assert "stopped polling" in s.stop_reason
    assert describe(s)["state"] == "stopped" and len(s.tokens) < 500 + len(TEXT)
    assert streams._reaper.is_alive()
    # Memory returned: the KV cache at once (the page may still come back and read its tokens) ...
    s.join(10)
    assert s.streamer.cache.get_seq_length() == 0 and s.streamer._last_logits is None
    assert all(getattr(layer, "keys", None) is None for layer in s.streamer.cache.layers)
    # ... and the whole stream, tokens and all, once its page has been gone for 10 x idle_seconds (60 s > 5 s).
    gone = weakref.ref(s)
    del s
    streams.reap()
    gc.collect()
    assert gone() is None and streams.get("a", None) is None


def test_a_finished_stream_reports_done(streams):
    s = streams.start("a", request(max_new_tokens=5))
    while s.running:
        streams.get("a", s.id)  # the page polling
        time.sleep(0.02)
    info = describe(s)
    assert info["state"] == "done" and info["tokens"] == len(s.tokens) > 5 and info["cache_length"] <= 2 + 16 - 1
    # What the page shows stays; the KV cache and the last logits are given back (a server holds many such).
    s.join(10)
    assert s.streamer.cache.get_seq_length() == 0 and s.streamer._last_logits is None
    assert all(getattr(layer, "keys", None) is None for layer in s.streamer.cache.layers)


def test_a_model_that_fails_to_load_is_reported_not_raised(tiny_llama):
    def broken(source):
        raise ModelLoadError(f"{source} is not a model")

    pool = ModelPool({"tiny": tiny_llama, "broken": "some/dir"}, loader=broken)
    pool.load_async("broken")
    wait(lambda: pool.error("broken") is not None)
    assert "broken failed to load: some/dir is not a model" in pool.error("broken")
    with pytest.raises(DashboardError, match="failed to load"):
        pool.get("broken")


def test_analysis_runs_in_the_background_and_refuses_long_prompts(tiny_llama):
    jobs = Analyses(ModelPool({"tiny": tiny_llama}), Limits(max_analysis_tokens=100))
    ok = jobs.start("tiny", Prompt("p", TEXT[:80]))
    long = jobs.start("tiny", Prompt("q", TEXT))
    wait(lambda: ok.done and long.done)
    assert ok.error is None and ok.profile is not None and ok.profile.prompts[0].n_tokens > 8
    assert "at most 100" in long.error
    with pytest.raises(DashboardError, match="empty"):
        jobs.start("tiny", Prompt("e", " "))
    assert jobs.get("unknown") is None


def test_layout_gives_each_page_its_own_session(tiny_llama):
    app = create_app({"tiny": tiny_llama})
    try:
        ids = [next(c for c in app.layout().children if getattr(c, "id", None) == "session").data for _ in (1, 2)]
        assert ids[0] != ids[1]
    finally:
        app.sinkscope.streams.shutdown()


def test_cli_refuses_a_port_in_use(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["dashboard", "--port", str(port)])
    assert_one_line_error(code, capsys.readouterr().err, f"can't listen on 127.0.0.1:{port}")


def test_model_lock_serves_waiters_in_order():
    """A thread that re-takes the lock in a loop (a stream, token by token) can't starve another waiter."""
    import threading

    from dashboard.state import FairLock

    lock, stop, got = FairLock(), threading.Event(), []

    def hog():
        while not stop.is_set():
            with lock:
                time.sleep(0.001)

    t = threading.Thread(target=hog)
    t.start()
    time.sleep(0.05)
    start = time.monotonic()
    with lock:
        got.append(time.monotonic() - start)
    stop.set()
    t.join()
    assert got[0] < 0.5


@pytest.mark.parametrize("stop_signal", ["INT", "TERM"])
def test_cli_serves_the_dashboard_until_interrupted(llama_dir, stop_signal):
    """`sinkscope dashboard` on a model directory: prints its URL, serves the page (waitress, not Flask's
    development server), stops on SIGINT (Ctrl-C) and on SIGTERM (a service manager) and says so."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sinkscope", "dashboard", "--model", str(llama_dir), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sig = signal.SIGTERM if stop_signal == "TERM" else signal.SIGINT
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, line + proc.stderr.read()
        for _ in range(100):  # the server starts listening just after the line is printed
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200 and "sinkscope" in page.read().decode()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("the dashboard did not answer")
    finally:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "development server" not in err and "dashboard stopped" in err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_waitress_serves_and_a_stop_ends_streams_and_jobs(tiny_llama):
    """The production server (waitress, not Flask's): pages served; stopping it ends every stream with the reason
    and lets a running analysis finish; new jobs are refused while it shuts down."""
    import threading
    import urllib.request

    from dashboard import run
    from dashboard.serve import exposure_warning, server_settings

    app = create_app({"tiny": tiny_llama}, limits=Limits(max_streams=3, max_prompt_tokens=600, max_new_tokens=100_000))
    port, got = _free_port(), {}
    ready = threading.Event()
    server = threading.Thread(target=run, args=(app, "127.0.0.1", port),
                              kwargs={"ready": lambda stop: (got.setdefault("stop", stop), ready.set())})
    server.start()
    assert ready.wait(10)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
        assert page.status == 200 and page.headers["Server"] == "sinkscope" and "sinkscope" in page.read().decode()
    svc = app.sinkscope
    stream = svc.streams.start("a", request(max_new_tokens=100_000))
    job = svc.analyses.start("tiny", Prompt("p", TEXT))
    wait(lambda: stream.tokens)
    got["stop"]()
    server.join(30)
    assert not server.is_alive()
    assert stream.state == "stopped" and stream.stop_reason == "the server is shutting down"
    assert job.done and (job.profile is not None or job.error)
    with pytest.raises(DashboardError, match="shutting down"):
        svc.analyses.start("tiny", Prompt("p", TEXT))
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    assert server_settings(3).threads == 12 and server_settings(1).threads == 8
    assert exposure_warning("127.0.0.1") is None and "no authentication" in exposure_warning("0.0.0.0")


# ------------------------------------------------------------------------------- learned sinks (gpt-oss)

# Hand-made learned-sink mass for the tiny Llama's 3 layers x 4 heads, as capture gives it for gpt-oss.
LEARNED = [[0.1, 0.7, 0.2, 0.0], [0.5, 0.05, 0.9, 0.3], [0.0, 0.0, 0.4, 0.1]]


@pytest.fixture
def learned_analyze(monkeypatch):
    """sinkscope.analyze as it runs for a model with learned sinks: every prompt carries LEARNED."""
    from dataclasses import replace

    import numpy as np

    import sinkscope

    real = sinkscope.analyze

    def analyze(*args, **kwargs):
        prof = real(*args, **kwargs)
        return replace(prof, prompts=[replace(p, learned_sink_mass=np.array(LEARNED)) for p in prof.prompts])

    monkeypatch.setattr(sinkscope, "analyze", analyze)


def _done_job(analyses, text=TEXT[:80]):
    job = analyses.start("tiny", Prompt("p", text))
    wait(lambda: job.done)
    assert job.error is None, job.error
    return job


def _callback(app, name):
    """A registered callback's own function (Dash keeps it as ``__wrapped__``), to call without a browser."""
    return next(cb["callback"].__wrapped__ for cb in app.callback_map.values()
                if "callback" in cb and cb["callback"].__wrapped__.__name__ == name)  # (not clientside ones)


def test_views_and_head_detail_with_and_without_learned_sinks(tiny_llama, learned_analyze, monkeypatch):
    from dashboard.state import head_detail, heatmap_views

    jobs = Analyses(ModelPool({"tiny": tiny_llama}), Limits())
    p = _done_job(jobs).profile
    assert heatmap_views(p) == ["first-token", "learned-sink"]
    d = head_detail(p, 1, 2)
    assert d["learned_sink_mass"] == pytest.approx(0.9) and d["learned_sink_head"] is True
    assert d["first_token_mass"] == pytest.approx(float(p.prompts[0].first_token_mass[1, 2]))
    assert d["sink_mass_k"] == pytest.approx(float(p.prompts[0].sink_mass[1, 2, -1])) and d["k_max"] == 8
    assert head_detail(p, 2, 3)["learned_sink_mass"] == pytest.approx(0.1)
    assert head_detail(p, 2, 3)["learned_sink_head"] is False
    with pytest.raises(DashboardError, match="head 4 out of range"):
        head_detail(p, 0, 4)
    monkeypatch.undo()  # the plain analysis: no learned sinks
    plain = _done_job(jobs).profile
    assert heatmap_views(plain) == ["first-token"]
    assert head_detail(plain, 1, 2)["learned_sink_mass"] is None
    assert head_detail(plain, 1, 2)["learned_sink_head"] is False


def test_analysis_view_shows_learned_sinks_only_for_models_that_have_them(tiny_llama, learned_analyze,
                                                                          monkeypatch):
    """The page's callbacks, called as Dash would: heatmap switch, hover and head line for a learned-sink model."""
    import numpy as np
    from dash import no_update

    app = create_app({"tiny": tiny_llama})
    try:
        poll, switch = _callback(app, "poll_analysis"), _callback(app, "switch_heatmap")
        head_map = _callback(app, "head_map")
        job = _done_job(app.sinkscope.analyses)
        out = poll(1, job.id, "first-token")
        heatmap, options, value, hidden = out[2], out[8], out[9], out[10]
        assert "Residual norms per layer" in out[5].layout.title.text  # the massive-activations figure
        assert "### How queries meet the first token" in out[11] and "### Dormant heads" in out[11]
        assert [o["value"] for o in options] == ["first-token", "learned-sink"] and hidden is False
        assert value is no_update  # the user's pick stays
        np.testing.assert_allclose(np.asarray(heatmap.data[0].customdata), LEARNED)  # hover: learned-sink mass
        assert "learned-sink mass" in heatmap.data[0].hovertemplate
        fig = switch("learned-sink", job.id)
        np.testing.assert_allclose(np.asarray(fig.data[0].z), LEARNED)
        assert "learned sink" in fig.layout.title.text
        assert poll(2, job.id, "learned-sink")[2].layout.title.text == fig.layout.title.text  # the pick is kept
        head_fig, text = head_map({"layer": 1, "head": 2}, "linear", job.id)
        assert "learned-sink mass 0.900 (parks its excess on the learned sink" in text
        assert head_fig.layout.title.text.endswith("learned sink 0.900")
        monkeypatch.undo()  # a model without learned sinks: one view, hidden, reset to the first-token map
        plain = _done_job(app.sinkscope.analyses)
        out = poll(3, plain.id, "learned-sink")
        assert [o["value"] for o in out[8]] == ["first-token"] and out[9] == "first-token" and out[10] is True
        assert out[2].data[0].customdata is None and "first token" in out[2].layout.title.text
        np.testing.assert_allclose(np.asarray(switch("learned-sink", plain.id).data[0].z),
                                   plain.profile.first_token_mass)
        assert "learned" not in head_map({"layer": 1, "head": 2}, "linear", plain.id)[1]
    finally:
        app.sinkscope.streams.shutdown()


# ------------------------------------------------------------------------------------ perplexity by sinks

PPL_TEXT = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree. " * 3  # 219 tokens + BOS


@pytest.fixture
def ppl_jobs(tiny_llama, tiny_gpt2):
    from dashboard.state import PerplexityJobs

    jobs = PerplexityJobs(ModelPool({"tiny": tiny_llama, "gpt2": tiny_gpt2}), Limits(max_prompt_tokens=600))
    yield jobs
    jobs.shutdown(60)


def _finished(job, timeout=60.0):
    wait(lambda: job.done, timeout)
    return job


def _assert_same_numbers(job, expected):
    """The job's evaluation against an independent evaluate_stream call: every mode, to 1e-9."""
    ev = job.result
    assert job.error is None and ev is not None, job.error
    assert ev.n_tokens == expected.n_tokens and ev.window == expected.window
    assert (ev.targets == expected.targets).all()
    assert sorted(ev.ppl_by_sinks) == [0, 1, 2, 4, 8] == sorted(expected.ppl_by_sinks)
    for s, ppl in expected.ppl_by_sinks.items():
        assert ev.ppl_by_sinks[s] == pytest.approx(ppl, rel=1e-9, abs=0)
    assert ev.result("dense").ppl == pytest.approx(expected.result("dense").ppl, rel=1e-9, abs=0)
    got, want = ev.to_dict(include_nll=False), expected.to_dict(include_nll=False)
    assert [(r["mode"], r.get("sinks"), r["n_targets"]) for r in got["results"]] == \
        [(r["mode"], r.get("sinks"), r["n_targets"]) for r in want["results"]]


def test_perplexity_job_gives_the_numbers_of_evaluate_stream(tiny_llama, ppl_jobs):
    from dashboard.state import describe_perplexity
    from sinkscope.streaming.evaluate import evaluate_stream

    job = _finished(ppl_jobs.start("a", "tiny", PPL_TEXT, 24))
    expected = evaluate_stream(tiny_llama, PPL_TEXT, sinks=(0, 1, 2, 4, 8), window=24, modes=("streaming", "dense"),
                               progress=False)
    _assert_same_numbers(job, expected)
    assert job.window == job.window_asked == 24 and job.n_tokens == len(PPL_TEXT) + 1  # characters + BOS
    d = describe_perplexity(job)
    best = min(expected.ppl_by_sinks, key=expected.ppl_by_sinks.get)
    assert d["best_sinks"] == best and d["best_ppl"] == pytest.approx(expected.ppl_by_sinks[best], rel=1e-9)
    assert d["n_targets"] == len(PPL_TEXT) + 1 - 8 - 24 and d["shortened"] is False
    assert d["dense_ppl"] == pytest.approx(expected.result("dense").ppl, rel=1e-9) and d["beyond_context"] is False


def test_perplexity_job_shortens_a_window_too_long_for_the_text(tiny_llama, ppl_jobs):
    from sinkscope.errors import PromptError
    from sinkscope.streaming.evaluate import MIN_TARGETS, evaluate_stream

    job = _finished(ppl_jobs.start("a", "tiny", PPL_TEXT, 200))  # 220 tokens: 8 + 200 + 32 don't fit
    fitted = len(PPL_TEXT) + 1 - 8 - MIN_TARGETS  # the largest window that leaves MIN_TARGETS scored tokens
    assert job.window_asked == 200 and job.window == fitted == 180
    expected = evaluate_stream(tiny_llama, PPL_TEXT, sinks=(0, 1, 2, 4, 8), window=fitted,
                               modes=("streaming", "dense"), progress=False)
    _assert_same_numbers(job, expected)
    assert len(job.result.targets) == MIN_TARGETS
    with pytest.raises(PromptError):  # one more and the library refuses: fitted is the largest
        evaluate_stream(tiny_llama, PPL_TEXT, sinks=(0, 8), window=fitted + 1, modes=("dense",), progress=False)


@pytest.mark.parametrize(("model", "text", "window", "message"), [
    # Too short even at the smallest window (16): the library's refusal, with the tokens it needs.
    ("tiny", "Too short a text.", 128, "the text 'stream text' has 18 tokens; evaluating sinks up to 8 with a window "
                                        "of 16 needs at least 56"),
    ("tiny", "Too short a text.", 8, "with a window of 8 needs at least 48"),  # a W under 16 is kept
    ("gpt2", PPL_TEXT[:60], 16, "SinkCache (stream, eval-stream --exact-stream, dashboard stream) can't serve this "
                                "model: it learns absolute position embeddings"),
    ("tiny", "x" * 700, 16, "the stream's text has 701 tokens; the limit is 600"),
])
def test_perplexity_job_reports_the_library_refusal_in_one_line(ppl_jobs, model, text, window, message):
    job = _finished(ppl_jobs.start("a", model, text, window))
    assert job.result is None and message in job.error
    assert "\n" not in job.error and "Traceback" not in job.error


def test_perplexity_job_takes_the_model_lock_and_one_job_per_page(ppl_jobs):
    with pytest.raises(DashboardError, match="text is empty"):
        ppl_jobs.start("a", "tiny", "  ", 16)
    with pytest.raises(DashboardError, match="window W must be between 1 and 4096, got 0"):
        ppl_jobs.start("a", "tiny", PPL_TEXT, 0)
    with ppl_jobs.pool.lock("tiny"):  # a stream's token (or an analysis) holds the model
        job = ppl_jobs.start("a", "tiny", PPL_TEXT, 16)
        time.sleep(0.3)
        assert job.state == "waiting" and not job.done and job.result is None
        with pytest.raises(DashboardError, match="still running"):
            ppl_jobs.start("a", "tiny", PPL_TEXT, 16)
        other = ppl_jobs.start("b", "tiny", PPL_TEXT, 16)  # another page may queue its own
    _finished(job)
    _finished(other)
    assert job.error is None and other.error is None
    assert ppl_jobs.get(job.id) is job and ppl_jobs.get("unknown") is None
    _finished(ppl_jobs.start("a", "tiny", PPL_TEXT, 16))  # done: the page may start another


def test_perplexity_panel_callbacks(tiny_llama):
    """The panel's callbacks, called as Dash would: start, poll to the figure and caption; a refusal in the panel."""
    from dash import html, no_update

    app = create_app({"tiny": tiny_llama})
    try:
        start, poll = _callback(app, "start_perplexity"), _callback(app, "poll_perplexity")
        job_id, poll_off, status, hidden, caption, button_off = start(1, "s", "tiny", PPL_TEXT, 200)
        assert poll_off is False and hidden is True and button_off is True and "evaluating" in status
        job = _finished(app.sinkscope.perplexity.get(job_id))
        status, poll_off, fig, hidden, caption, button_off = poll(1, job_id)
        assert (status, poll_off, hidden, button_off) == ("", True, False, False)
        streaming = next(t for t in fig.data if t.name.startswith("streaming"))
        assert list(streaming.x) == [0, 1, 2, 4, 8]
        assert list(streaming.y) == pytest.approx([job.result.ppl_by_sinks[s] for s in (0, 1, 2, 4, 8)], rel=1e-12)
        assert caption.startswith(f"tiny: {len(PPL_TEXT) + 1} text tokens · window 180 (the stream's W = 200 leaves "
                                  "too few scored tokens in this text: the largest window that leaves 32) · "
                                  "32 scored tokens · best: S = ")
        assert f"dense {job.result.result('dense').ppl:.2f}" in caption

        job_id, *_ = start(2, "s", "tiny", "Too short.", 24)
        _finished(app.sinkscope.perplexity.get(job_id))
        status, poll_off, fig, hidden, caption, button_off = poll(2, job_id)
        assert isinstance(status, html.Span) and "needs at least 56" in status.children
        assert fig is no_update and hidden is True and caption == "" and button_off is False

        out = start(3, "s", "tiny", "", 24)  # refused at once, the poll left alone
        assert out[0] is no_update and out[1] is no_update and "text is empty" in out[2].children
        assert "gone from the server" in poll(3, "unknown")[0].children
    finally:
        app.sinkscope.streams.shutdown()


# ------------------------------------------------------------------------------------------------------- atlas

REPORTS = Path(__file__).resolve().parent.parent / "docs" / "reports"


def test_atlas_offers_the_saved_reports_and_adds_this_pages_analysis(tiny_llama, tmp_path):
    """The checkout's docs/reports by default; the atlas callback against sinkscope.compare on the same
    report.json files; refusals in the panel, one line."""
    import json

    from dashboard.state import THIS_ANALYSIS, atlas
    from sinkscope.compare import find_reports

    found = find_reports(REPORTS)
    assert REPORTS / "smollm2-135m" in found and REPORTS / "gemma3-270m" in found
    assert REPORTS / "gpu" not in found and REPORTS / "compare" not in found  # folders without a report.json
    app = create_app({"tiny": tiny_llama})
    try:
        assert app.sinkscope.reports["smollm2-135m"] == str(REPORTS / "smollm2-135m")
        show = _callback(app, "show_atlas")
        paths = [str(REPORTS / "smollm2-135m"), str(REPORTS / "gemma3-270m")]
        message, table, fig = show(1, paths, [], None)
        assert message == "" and [t.name for t in fig.data] == ["smollm2-135m", "gemma3-270m"]
        doc = json.loads((REPORTS / "smollm2-135m" / "report.json").read_text())
        assert f"{doc['sink_rate']:.1%}" in table and "Sink rate: heads whose" in table
        job = _done_job(app.sinkscope.analyses)
        message, table, fig = show(2, paths[:1], ["on"], job.id)
        assert message == "" and len(fig.data) == 2 and fig.data[0].name == job.profile.model.name
        assert list(fig.data[0].y) == pytest.approx(job.profile.first_token_mass.mean(axis=1).tolist(), abs=1e-6)
        for bad, why in (([], "pick two or more"), ([str(tmp_path)], "no report.json in")):
            message, table, _ = show(3, bad, [], None)
            assert why in message and "\n" not in message and table == ""
    finally:
        app.sinkscope.streams.shutdown()
    assert atlas(paths[:1], job.profile)[0].path == THIS_ANALYSIS
    assert create_app({"tiny": tiny_llama}, reports=[tmp_path]).sinkscope.reports == {}


def test_an_analysis_of_the_same_model_and_text_is_shared_when_asked(tiny_llama):
    """What the page does on load: the default prompt's finished (or running) analysis is reused; another text,
    a refused one or an explicit Analyze click starts anew."""
    jobs = Analyses(ModelPool({"tiny": tiny_llama}), Limits(max_analysis_tokens=250))
    first = _done_job(jobs)
    assert jobs.start("tiny", Prompt("p", TEXT[:80]), reuse=True) is first
    assert jobs.start("tiny", Prompt("p", TEXT[:80])) is not first  # a click analyses again
    assert jobs.start("tiny", Prompt("p", TEXT[:81]), reuse=True) is not first
    refused = jobs.start("tiny", Prompt("p", "x" * 400), reuse=True)
    wait(lambda: refused.done)
    assert refused.error and jobs.start("tiny", Prompt("p", "x" * 400), reuse=True) is not refused
    jobs.shutdown(60)  # the analyses started above: none may run on into the interpreter's exit (an abort)


def test_concurrent_starts_never_pass_the_stream_limit(tiny_llama):
    """Starts that arrive together (the server's threads) each take a slot under one lock: exactly the limit
    runs, the rest are refused with the reason (8 at once against a limit of 2 ran 8 before)."""
    import threading

    streams = Streams(ModelPool({"tiny": tiny_llama}), Limits(max_streams=2, max_new_tokens=500))
    gate, started, refused = threading.Barrier(8), [], []

    def start(i: int) -> None:
        gate.wait()
        try:
            started.append(streams.start(f"s{i}", request(max_new_tokens=500)))
        except DashboardError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(started) == 2 and len(refused) == 6
        assert all("the limit is 2" in r for r in refused)
    finally:
        streams.shutdown()
