"""Serving the dashboard: waitress (a production WSGI server, pure Python) by default, Flask's debug server
only when asked, and a graceful shutdown on SIGINT and SIGTERM.

Why waitress: Dash is a Flask (WSGI) app, waitress needs no compiler and runs on every platform, and its
fixed pool of worker threads and bounded connection count keep a shared dashboard's load bounded. Page polls
are short requests (the work runs in the services' own threads), so a pool sized from the stream limit serves
every open page without queuing behind a slow one.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dash import Dash

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSettings:
    """waitress's knobs, from the dashboard's limits (:func:`server_settings`)."""

    threads: int  # worker threads: requests served at once
    connection_limit: int  # open connections accepted; past it new ones wait in the listen backlog
    backlog: int  # the listen socket's queue
    channel_timeout: int  # seconds before an idle connection is closed


def server_settings(max_streams: int) -> ServerSettings:
    """Enough threads for every stream's page to poll while as many other pages load and analyse: each open
    page polls one request at a time, so 4 threads a stream (at least 8) keep polls from queuing."""
    threads = max(8, 4 * max_streams)
    return ServerSettings(threads=threads, connection_limit=max(100, 16 * threads), backlog=1024, channel_timeout=60)


def exposure_warning(host: str) -> str | None:
    """The warning for a dashboard bound beyond this machine (it has no authentication), or None."""
    if host in LOOPBACK:
        return None
    return (f"warning: the dashboard listens on {host}, beyond this machine, and has no authentication: anyone who "
            "can reach it can run the loaded models on this machine's CPU or GPU. Share it only on a trusted "
            "network, or bind 127.0.0.1 and reach it through an SSH tunnel (docs/dashboard.md).")


def shutdown_services(app: Dash, timeout: float = 10.0) -> None:
    """Stop what the app runs in the background: every stream (its page is told), then wait for running
    analyses and perplexity jobs (each a bounded piece of work) up to ``timeout`` seconds."""
    svc = getattr(app, "sinkscope", None)
    if svc is None:
        return
    svc.streams.shutdown()
    for jobs in (svc.analyses, svc.perplexity):
        jobs.shutdown(timeout)


def serve(app: Dash, host: str = "127.0.0.1", port: int = 8050, *, max_streams: int = 4, debug: bool = False,
          ready: Callable[[Callable[[], None]], None] | None = None) -> None:
    """Serve ``app`` until SIGINT or SIGTERM (in the main thread) or a call of the ``stop`` function that
    ``ready(stop)`` receives once the socket listens (from any thread); then shut its services down
    (:func:`shutdown_services`) and return.

    ``debug``: Flask's development server with Dash's debug tools (hot reload off), for working on the
    dashboard itself, never for sharing it (``ready`` is not called: that server can only be interrupted).
    """
    if debug:
        try:
            app.run(host=host, port=port, debug=True, use_reloader=False, threaded=True)
        finally:
            shutdown_services(app)
        return
    from waitress import wasyncore
    from waitress.server import create_server

    s = server_settings(max_streams)
    server = create_server(app.server, host=host, port=port, threads=s.threads, connection_limit=s.connection_limit,
                           backlog=s.backlog, channel_timeout=s.channel_timeout, ident="sinkscope",
                           clear_untrusted_proxy_headers=True)
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def stop(signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt  # waitress's loop ends on it and shuts its worker threads down

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)

    def close() -> None:
        # Workers first (a worker finishing a response pulls the trigger, which must still be open), then every
        # channel: an empty map ends the loop.
        server.task_dispatcher.shutdown()
        wasyncore.close_all(server._map)

    def stop_from_any_thread() -> None:
        server.trigger.pull_trigger(close)  # the trigger runs it in the server's own loop thread

    try:
        if ready:
            ready(stop_from_any_thread)
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        close()
        shutdown_services(app)
