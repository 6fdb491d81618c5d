"""Load test of the dashboard over HTTP, as its pages drive it: N sessions at once, each a browser tab.

A session loads the page (``/``, the layout, the callbacks), waits for the analysis the page makes on load,
then starts a stream of its own text (read token by token, then generated) and polls it at the page's rate
(400 ms) until it ends, as the page's interval does; then it starts the next round. The server is
``sinkscope dashboard`` in a subprocess on loopback (waitress, as users run it), with ``--max-streams`` at
half the sessions, so that the refusals past the limit are measured too.

Printed (and written to ``--json``): poll latency (median, p95, max), tokens per second per streaming session,
refusals, the server's resident memory after each round (it must not grow with the number of finished
streams), and the isolation check: every session's tokens begin with its own text and hold no other session's
marker. Bounded: ``--sessions`` at most 64, ``--seconds`` per round at most 600, loopback only.

    python benchmarks/dashboard_load.py --sessions 8 16 32 --json load.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLL_S = 0.4  # the page's interval (dashboard.app.POLL_MS)
HEARTBEAT_EVERY = 5  # polls between two heartbeats (dashboard.app.HEARTBEAT_MS = 2000)
MAX_SESSIONS = 64
MAX_ROUND_SECONDS = 600


# ------------------------------------------------------------------------------------------ a tiny Dash client


def _walk(node: Any, out: dict[str, dict[str, Any]]) -> None:
    if isinstance(node, dict):
        props = node.get("props")
        if isinstance(props, dict):
            if isinstance(props.get("id"), str):
                out[props["id"]] = dict(props)
            _walk(props.get("children"), out)
        return
    if isinstance(node, list):
        for x in node:
            _walk(x, out)


def _texts(node: Any) -> list[str]:
    """The text of every token span (``html.Span`` with a ``tok`` class) in a component tree."""
    if isinstance(node, list):
        return [t for x in node for t in _texts(x)]
    if isinstance(node, dict) and isinstance(node.get("props"), dict):
        props = node["props"]
        if "tok" in str(props.get("className", "")).split():
            child = props.get("children")
            return [child if isinstance(child, str) else ""]
        return _texts(props.get("children"))
    return []


class DashClient:
    """One browser tab: the page's component state, and its callbacks fired over HTTP as the renderer does."""

    def __init__(self, base: str, timeout: float = 60.0) -> None:
        self.base, self.timeout = base.rstrip("/"), timeout
        self.props: dict[str, dict[str, Any]] = {}
        self.callbacks: list[dict[str, Any]] = []

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=self.timeout) as r:
            body = r.read()
        return json.loads(body) if path.startswith("/_dash") else body

    def load(self) -> None:
        """GET the page, its layout and its callbacks (what a page load fetches)."""
        self._get("/")
        self.props.clear()
        _walk(self._get("/_dash-layout"), self.props)
        self.callbacks = self._get("/_dash-dependencies")

    def value(self, cid: str, prop: str) -> Any:
        return self.props.get(cid, {}).get(prop)

    def set(self, cid: str, prop: str, value: Any) -> None:
        self.props.setdefault(cid, {})[prop] = value

    def fire(self, cid: str, prop: str, value: Any = None) -> float:
        """Set ``cid.prop`` (when ``value`` is given) and run every callback it is an input of; applies their
        outputs to the page's state; returns the seconds the requests took."""
        if value is not None:
            self.set(cid, prop, value)
        took = 0.0
        for cb in self.callbacks:
            if cb.get("clientside_function"):  # runs in the browser (the heartbeat's notice), not on the server
                continue
            if not any(i["id"] == cid and i["property"] == prop for i in cb["inputs"]):
                continue
            spec = cb["output"]
            parts = spec[2:-2].split("...") if spec.startswith("..") else [spec]
            outputs = [{"id": p.split(".", 1)[0], "property": p.split(".", 1)[1]} for p in parts]
            body = {"output": spec, "outputs": outputs if spec.startswith("..") else outputs[0],
                    "inputs": [{**i, "value": self.value(i["id"], i["property"])} for i in cb["inputs"]],
                    "state": [{**s, "value": self.value(s["id"], s["property"])} for s in cb["state"]],
                    "changedPropIds": [f"{cid}.{prop}"]}
            req = urllib.request.Request(self.base + "/_dash-update-component", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
                    status = r.status
            except urllib.error.HTTPError as exc:
                if exc.code == 204:  # every output no_update
                    took += time.perf_counter() - t0
                    continue
                raise
            took += time.perf_counter() - t0
            if status == 204 or not raw:
                continue
            for out_id, values in json.loads(raw).get("response", {}).items():
                for p, v in values.items():
                    self._apply(out_id, p.split("@", 1)[0], v)
        return took

    def _apply(self, cid: str, prop: str, value: Any) -> None:
        if isinstance(value, dict) and value.get("__dash_patch_update"):
            current = list(self.value(cid, prop) or [])
            for op in value.get("operations", []):
                if op.get("operation") == "Extend" and not op.get("location"):
                    current.extend(op["params"]["value"])
                elif op.get("operation") == "Assign" and not op.get("location"):
                    current = op["params"]["value"]
            value = current
        self.set(cid, prop, value)


# ----------------------------------------------------------------------------------------------- sessions


@dataclass
class SessionResult:
    index: int
    streams: int = 0
    refusals: int = 0
    tokens: int = 0
    stream_seconds: float = 0.0
    polls: list[float] = field(default_factory=list)
    intervals: list[tuple[float, float]] = field(default_factory=list)  # each stream's (start, end), monotonic
    isolation_errors: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def marker(i: int) -> str:
    return f"[s{i:02d}]"


def session_text(i: int, words: int) -> str:
    base = "the cat sat on the mat and the dog ran to the tree while the bird sang "
    return (marker(i) + " " + base * (words // 15 + 1)).strip()[: 6 * words]


def run_session(base: str, i: int, n: int, text: str, new_tokens: int, rounds: int, round_end: list[float],
                result: SessionResult, barrier: threading.Barrier, rss: list[tuple[int, float]],
                server_pid: int | None) -> None:
    page = DashClient(base)
    for r in range(rounds):
        try:
            page.load()
            page.fire("analyze", "n_clicks", 0)  # the page's initial call: its default prompt, analysed on load
            end = time.monotonic() + 120
            while page.value("analysis-poll", "disabled") is False and time.monotonic() < end:
                time.sleep(POLL_S)
                page.fire("analysis-poll", "n_intervals", (page.value("analysis-poll", "n_intervals") or 0) + 1)
            page.set("stream-prompt", "value", text)
            page.set("window", "value", 32)
            page.set("new-tokens", "value", new_tokens)
            page.fire("start", "n_clicks", r + 1)
            if page.value("stream-poll", "disabled") is not False:  # refused (past the limit) or an error
                msg = str(page.value("stream-message", "children") or "")
                if "streams are running" in msg:
                    result.refusals += 1
                else:
                    result.errors.append(f"round {r}: no stream: {msg[:200]}")
            else:
                result.streams += 1
                t0 = time.monotonic()
                deadline = t0 + round_end[0]
                while page.value("stream-poll", "disabled") is False and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    result.polls.append(page.fire("stream-poll", "n_intervals",
                                                  (page.value("stream-poll", "n_intervals") or 0) + 1))
                    if len(result.polls) % HEARTBEAT_EVERY == 0:  # the page's heartbeat, every 2 s
                        page.fire("heartbeat", "n_intervals", (page.value("heartbeat", "n_intervals") or 0) + 1)
                if page.value("stream-poll", "disabled") is False:
                    page.fire("stop", "n_clicks", (page.value("stop", "n_clicks") or 0) + 1)
                    result.errors.append(f"round {r}: the stream did not end within {round_end[0]:.0f} s")
                result.stream_seconds += time.monotonic() - t0
                result.intervals.append((t0, time.monotonic()))
                got = "".join(_texts(page.value("stream-text", "children")))
                result.tokens += len(_texts(page.value("stream-text", "children")))
                others = [marker(j) for j in range(n) if j != i and marker(j) in got]
                if not 0 <= got.find(marker(i)) <= 8 or others:  # (after a BOS token, where the model adds one)
                    result.isolation_errors.append(f"round {r}: text starts {got[:40]!r}; others' markers {others}")
        except Exception as exc:  # a failed request is a finding, not a crash of the benchmark
            result.errors.append(f"round {r}: {type(exc).__name__}: {exc}"[:300])
        try:
            if barrier.wait(timeout=MAX_ROUND_SECONDS + 180) == 0 and server_pid:
                rss.append((r, _rss_mib(server_pid)))
        except threading.BrokenBarrierError:
            pass


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(base: str, sessions: int, *, rounds: int = 2, new_tokens: int = 64, words: int = 40,
         round_seconds: float = 120.0, server_pid: int | None = None) -> dict[str, Any]:
    """Drive ``sessions`` pages against the dashboard at ``base`` for ``rounds`` rounds (module docstring)."""
    if not 1 <= sessions <= MAX_SESSIONS:
        raise SystemExit(f"--sessions must be between 1 and {MAX_SESSIONS}")
    if not base.startswith(("http://127.0.0.1", "http://localhost")):
        raise SystemExit("the load test runs on loopback only")
    results = [SessionResult(i) for i in range(sessions)]
    barrier = threading.Barrier(sessions)
    rss: list[tuple[int, float]] = [(-1, _rss_mib(server_pid))] if server_pid else []
    threads = [threading.Thread(target=run_session, args=(base, i, sessions, session_text(i, words), new_tokens,
                                                          rounds, [min(round_seconds, MAX_ROUND_SECONDS)],
                                                          results[i], barrier, rss, server_pid))
               for i in range(sessions)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    polls = sorted(p for r in results for p in r.polls)
    rates = [r.tokens / r.stream_seconds for r in results if r.streams and r.stream_seconds > 0]

    def q(frac: float) -> float | None:
        return round(polls[min(len(polls) - 1, int(frac * len(polls)))] * 1000, 1) if polls else None

    edges = sorted([(a, 1) for r in results for a, _ in r.intervals]
                   + [(b, -1) for r in results for _, b in r.intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return {
        "sessions": sessions, "rounds": rounds, "seconds": round(time.monotonic() - t0, 1),
        "most_streams_at_once": peak,
        "streams": sum(r.streams for r in results), "refusals": sum(r.refusals for r in results),
        "polls": len(polls), "poll_ms_median": q(0.5), "poll_ms_p95": q(0.95), "poll_ms_max": q(1.0),
        "tokens_per_s_per_stream_median": round(statistics.median(rates), 1) if rates else None,
        "server_rss_mib_by_round": [(r, round(m, 1)) for r, m in rss],
        "isolation_errors": [e for r in results for e in r.isolation_errors],
        "errors": [e for r in results for e in r.errors],
    }


# ------------------------------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``sinkscope dashboard`` in a subprocess on loopback, ready once it answers ``/``."""

    def __init__(self, model: str, max_streams: int, *, new_tokens: int = 1024, extra: list[str] | None = None,
                 port: int | None = None):
        self.port = port or _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sinkscope", "dashboard", "--model", model, "--port", str(self.port),
             "--max-streams", str(max_streams), "--max-new-tokens", str(new_tokens), *(extra or [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"the dashboard exited: {self.proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + "/", timeout=5):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit("the dashboard did not answer within 300 s")

    def stop(self) -> str:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.proc.stderr.read() if self.proc.stderr else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sessions", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=300.0, help="longest a stream may take per round")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    out = []
    for n in args.sessions:
        server = Server(args.model, max(1, n // 2))
        try:
            row = load(server.base, n, rounds=args.rounds, new_tokens=args.new_tokens, round_seconds=args.seconds,
                       server_pid=server.proc.pid)
        finally:
            err = server.stop()
        row["server_exit"] = server.proc.returncode
        row["server_stopped_cleanly"] = "dashboard stopped" in err and "Traceback" not in err
        print(json.dumps(row), flush=True)
        out.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
