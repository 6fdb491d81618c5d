"""The dashboard's server-side state without a browser: limits, sessions, the reaper, failures."""

from __future__ import annotations

import socket
import time

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
    wait(lambda: not s.running, timeout=10)
    assert "stopped polling" in s.stop_reason
    assert describe(s)["state"] == "stopped" and len(s.tokens) < 500 + len(TEXT)
    assert streams._reaper.is_alive()


def test_a_finished_stream_reports_done(streams):
    s = streams.start("a", request(max_new_tokens=5))
    while s.running:
        streams.get("a", s.id)  # the page polling
        time.sleep(0.02)
    info = describe(s)
    assert info["state"] == "done" and info["tokens"] == len(s.tokens) > 5 and info["cache_length"] <= 2 + 16 - 1


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


def test_cli_serves_the_dashboard_until_interrupted(llama_dir):
    """`sinkscope dashboard` on a model directory: prints its URL, serves the page, stops on SIGINT."""
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
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()
