"""The load test (benchmarks/dashboard_load.py), short: 8 pages at once over HTTP against ``sinkscope dashboard``
(waitress, a subprocess) on the tiny Llama, three rounds each of the page's load-time analysis and a stream."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import dashboard_load


def test_eight_sessions_stream_apart_and_memory_stays_flat(llama_dir):
    server = dashboard_load.Server(str(llama_dir), max_streams=4)
    try:
        row = dashboard_load.load(server.base, 8, rounds=3, new_tokens=300, words=20, round_seconds=120,
                                  server_pid=server.proc.pid)
    finally:
        err = server.stop()
    print(row)
    assert row["errors"] == [] and row["isolation_errors"] == []
    assert row["streams"] + row["refusals"] == 8 * 3 and row["streams"] >= 4 * 3 and row["refusals"] > 0
    assert row["polls"] > 8 and row["poll_ms_p95"] is not None
    rss = dict(row["server_rss_mib_by_round"])
    assert rss[2] - rss[0] < 60, rss  # finished streams give their memory back
    assert server.proc.returncode == 0 and "dashboard stopped" in err and "Traceback" not in err
