"""Server-side state of the dashboard: models loaded once, analysis jobs, and one live stream per browser tab.

Everything here runs in the Dash (Flask) server process. Callbacks stay thin: they call these objects and
turn what comes back into components. Work that takes more than a moment (loading a model, an analysis, a
stream, a stream's perplexity by sinks) runs in a background thread; the page polls it with a
``dcc.Interval``, so a callback never blocks.

Forwards of one model are serialised by that model's lock: analysis switches the attention implementation
and installs hooks for its duration, which must not leak into a stream's forward, and two streams of one
model take turns token by token.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sinkscope
from sinkscope.analysis import SinkProfile
from sinkscope.compare import AtlasEntry, atlas_entry, load_report
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.streaming import Streamer
from sinkscope.streaming.evaluate import MIN_TARGETS, StreamEval, prepare_stream_eval
from sinkscope.streaming.streamer import TokenStats

log = logging.getLogger("sinkscope.dashboard")


class DashboardError(SinkscopeError):
    """A request the dashboard refuses; the message is shown in the page."""


@dataclass(frozen=True)
class Limits:
    """Server-side limits, each refusal shown in the page (``sinkscope dashboard --help`` sets them)."""

    max_prompt_tokens: int = 4096  # a stream's prompt (the default text, long-document, has 3359 on SmolLM2)
    max_analysis_tokens: int = 4096  # an analysed prompt (past 1024 tokens in statistics mode: ~20 s at 4096)
    max_new_tokens: int = 1024  # tokens generated after a stream's prompt
    max_window: int = 4096
    max_streams: int = 4  # running at once, all tabs together
    idle_seconds: float = 15.0  # a stream whose page stopped polling this long is stopped


# ------------------------------------------------------------------------------------------------- models


class FairLock:
    """A first-come, first-served lock. A stream re-takes its model's lock for every token; with a plain
    lock it could take it again before a waiting analysis (or another tab's stream) wakes up, and starve it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # next ticket to hand out
        self._serving = 0  # ticket allowed in

    def __enter__(self) -> FairLock:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()



class ModelPool:
    """Loads each model once per process, on first use, and hands out its lock.

    ``sources`` maps a display name to a model source for :func:`sinkscope.load_model` or to an already
    loaded :class:`LoadedModel` (tests pass tiny models that way).
    """

    def __init__(self, sources: dict[str, str | LoadedModel], loader: Callable[[str], LoadedModel] | None = None):
        if not sources:
            raise DashboardError("no model to show")
        self._sources = dict(sources)
        self._loader = loader or (lambda src: sinkscope.load_model(src, progress=False))
        self._loaded: dict[str, LoadedModel] = {k: v for k, v in sources.items() if isinstance(v, LoadedModel)}
        self._errors: dict[str, str] = {}
        self._locks = {name: FairLock() for name in sources}
        self._loading = threading.Lock()

    @property
    def names(self) -> list[str]:
        """Model names, the default first."""
        return list(self._sources)

    def get(self, name: str) -> LoadedModel:
        """The loaded model (loading it now if needed). Raises DashboardError for an unknown or broken model."""
        if name not in self._sources:
            raise DashboardError(f"unknown model {name!r}; this dashboard serves {', '.join(self._sources)}")
        if name in self._loaded:
            return self._loaded[name]
        with self._loading:  # one load at a time: two at once would only compete for memory and cores
            if name not in self._loaded:
                if name in self._errors:
                    raise DashboardError(self._errors[name])
                try:
                    self._loaded[name] = self._loader(self._sources[name])  # type: ignore[arg-type]
                except Exception as exc:  # a broken model must not take the server down
                    self._errors[name] = f"model {name} failed to load: {exc}"
                    raise DashboardError(self._errors[name]) from exc
            return self._loaded[name]

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def error(self, name: str) -> str | None:
        """Why the model failed to load, if it did."""
        return self._errors.get(name)

    def load_async(self, name: str) -> None:
        """Start loading ``name`` in the background (errors are kept for :meth:`error`)."""
        if name in self._sources and name not in self._loaded and name not in self._errors:
            threading.Thread(target=self._try_get, args=(name,), name=f"load-{name}", daemon=True).start()

    def _try_get(self, name: str) -> None:
        with contextlib.suppress(DashboardError):  # kept in self._errors and shown by the page
            self.get(name)

    def lock(self, name: str) -> FairLock:
        """The lock every forward of this model holds."""
        return self._locks[name]



# ---------------------------------------------------------------------------------------------- analysis


class _Timed:
    """What a background job's dataclass shares: whether it is done and for how long it has run."""

    started: float
    finished: float | None

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started


@dataclass
class AnalysisJob(_Timed):
    """One analysis running (or done) in a background thread."""

    id: str
    model: str
    prompt_name: str
    text: str = ""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    profile: SinkProfile | None = None
    error: str | None = None


class _Background:
    """Threads of bounded jobs that a server shutdown waits for, and refuses new ones meanwhile."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._closing = False

    def _check_open(self) -> None:
        if self._closing:
            raise DashboardError("the server is shutting down")

    def _launch(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new jobs and wait up to ``timeout`` seconds in all for the running ones."""
        self._closing = True
        end = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))


class Analyses(_Background):
    """Analysis jobs by id; the last ``keep`` are kept so that head clicks can re-plot from the profile."""

    def __init__(self, pool: ModelPool, limits: Limits, keep: int = 16):
        super().__init__()
        self.pool, self.limits, self.keep = pool, limits, keep
        self._jobs: OrderedDict[str, AnalysisJob] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, model: str, prompt: sinkscope.Prompt, *, reuse: bool = False) -> AnalysisJob:
        """Check the request, then analyse in a thread; returns the job at once. ``reuse``: a kept job of the same
        model and text that is running or succeeded is returned instead (analysis is deterministic)."""
        self._check_open()
        if not prompt.text.strip():
            raise DashboardError("the prompt is empty: type a text or pick a sample prompt")
        job = AnalysisJob(id=uuid.uuid4().hex, model=model, prompt_name=prompt.name, text=prompt.text)
        with self._lock:
            if reuse:
                same = next((j for j in reversed(self._jobs.values()) if j.model == model and j.text == prompt.text
                             and j.prompt_name == prompt.name and not j.error), None)
                if same is not None:
                    self._jobs.move_to_end(same.id)
                    return same
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)
        self._launch(self._run, (job, prompt), f"analysis-{job.id[:8]}")
        return job

    def get(self, job_id: str | None) -> AnalysisJob | None:
        """The job, or None when this server doesn't know it (restarted, or the job was dropped)."""
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def _run(self, job: AnalysisJob, prompt: sinkscope.Prompt) -> None:
        try:
            lm = self.pool.get(job.model)
            n = len(lm.tokenizer(prompt.text).input_ids)
            if n > self.limits.max_analysis_tokens:
                raise DashboardError(f"the prompt has {n} tokens; the dashboard analyses at most "
                                     f"{self.limits.max_analysis_tokens} (sinkscope report has no such limit)")
            with self.pool.lock(job.model):
                job.profile = sinkscope.analyze(lm, prompt, progress=False)
        except SinkscopeError as exc:
            job.error = str(exc)
        except Exception as exc:  # shown in the page; the server and the other sessions carry on
            log.exception("analysis failed")
            job.error = f"analysis failed: {type(exc).__name__}: {exc}"
        finally:
            job.finished = time.monotonic()


HEATMAP_VIEWS = {"first-token": "first-token mass", "learned-sink": "learned-sink mass"}  # value -> label


# ------------------------------------------------------------------------------------------------- atlas

THIS_ANALYSIS = "this page's analysis"


def atlas(paths: list[str], current: SinkProfile | None = None) -> list[AtlasEntry]:
    """The atlas rows of the chosen report directories, and of the page's own analysis when given (first).

    Raises:
        DashboardError: fewer than two in all, or a report that can't be read (one line each).
    """
    entries = [] if current is None else [atlas_entry(current.to_dict(), THIS_ANALYSIS)]
    for path in dict.fromkeys(paths):
        try:
            doc, file = load_report(path)
        except SinkscopeError as exc:
            raise DashboardError(str(exc)) from None
        entries.append(atlas_entry(doc, str(file.parent)))
    if len(entries) < 2:
        raise DashboardError("pick two or more reports (or one, with a prompt analysed on this page) to compare")
    return entries


def heatmap_views(profile: SinkProfile) -> list[str]:
    """The layer x head heatmaps the analysis view offers for ``profile``: the first-token mass, and for a model
    with learned sinks (gpt-oss) the learned-sink mass as well (keys of :data:`HEATMAP_VIEWS`)."""
    return ["first-token", "learned-sink"] if profile.has_learned_sinks else ["first-token"]


def head_detail(profile: SinkProfile, layer: int, head: int) -> dict[str, Any]:
    """One head's numbers as the profile holds them (means over prompts), for the page's head line.

    ``learned_sink_mass`` is None for a model without learned sinks. Raises a SinkscopeError for a layer that
    was not analysed or a head out of range.
    """
    row = profile.layer_row(layer)
    ftm = profile.first_token_mass
    if not 0 <= head < ftm.shape[1]:
        raise DashboardError(f"head {head} out of range: layer {layer} has heads 0..{ftm.shape[1] - 1}")
    lsm = profile.learned_sink_mass
    return {
        "layer": layer, "head": head,
        "first_token_mass": float(ftm[row, head]),
        "sink_mass_k": float(profile.sink_mass[row, head, -1]), "k_max": profile.k_max,
        "entropy": float(profile.entropy[row, head]),
        "sink_head": bool(ftm[row, head] > profile.threshold),
        "learned_sink_mass": None if lsm is None else float(lsm[row, head]),
        "learned_sink_head": lsm is not None and bool(lsm[row, head] > profile.threshold),
    }


# ---------------------------------------------------------------------------------------- perplexity by sinks

PPL_SINKS = (0, 1, 2, 4, 8)  # the sink counts the stream pane's perplexity panel evaluates
PPL_MODES = ("streaming", "dense")
PPL_MIN_WINDOW = 16  # the panel shortens the stream's window for a short text, never below this
PPL_TEXT_NAME = "stream text"  # the text's name in the library's messages and the result


def fit_window(n_tokens: int, window: int, sinks: tuple[int, ...] = PPL_SINKS) -> int:
    """The window the perplexity panel evaluates ``n_tokens`` at: the stream's ``window`` when the text leaves
    :data:`~sinkscope.streaming.evaluate.MIN_TARGETS` scored tokens after ``max(sinks) + window``, else the
    largest window that does, but never below :data:`PPL_MIN_WINDOW` (nor above ``window``): a text too short
    even for that gets the library's refusal, which says how many tokens it needs."""
    return min(window, max(PPL_MIN_WINDOW, n_tokens - max(sinks) - MIN_TARGETS))


@dataclass
class PerplexityJob(_Timed):
    """One perplexity-by-sinks evaluation of a stream's text, running (or done) in a background thread."""

    id: str
    session: str
    model: str
    window_asked: int  # the stream's W
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    state: str = "waiting"  # waiting (for the model: a stream's token, another job), evaluating, done
    n_tokens: int | None = None
    window: int | None = None  # the window evaluated: window_asked, or shorter for a short text (fit_window)
    method: str | None = None  # how streaming is computed: "one pass" or "token by token" (slower)
    result: StreamEval | None = None
    error: str | None = None


class PerplexityJobs(_Background):
    """Perplexity-by-sinks jobs by id (the last ``keep``), at most one running per browser session.

    Each job evaluates the text with :data:`PPL_SINKS` sinks at the stream's window, streaming and dense, through
    :func:`sinkscope.streaming.evaluate.prepare_stream_eval`, under the model's lock (the evaluation's forwards
    take one turn: a stream of that model waits for them, for a few seconds on a 1000-token text).
    """

    def __init__(self, pool: ModelPool, limits: Limits, keep: int = 16):
        super().__init__()
        self.pool, self.limits, self.keep = pool, limits, keep
        self._jobs: OrderedDict[str, PerplexityJob] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, session: str, model: str, text: str, window: int) -> PerplexityJob:
        """Check the request, then evaluate in a thread; returns the job at once."""
        self._check_open()
        if not text.strip():
            raise DashboardError("the stream's text is empty: type a text to evaluate")
        if not 1 <= window <= self.limits.max_window:
            raise DashboardError(f"window W must be between 1 and {self.limits.max_window}, got {window}")
        job = PerplexityJob(id=uuid.uuid4().hex, session=session, model=model, window_asked=window)
        with self._lock:
            if any(j.session == session and not j.done for j in self._jobs.values()):
                raise DashboardError("this page's perplexity evaluation is still running; wait for it to finish")
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)
        self._launch(self._run, (job, text), f"ppl-{job.id[:8]}")
        return job

    def get(self, job_id: str | None) -> PerplexityJob | None:
        """The job, or None when this server doesn't know it (restarted, or the job was dropped)."""
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def _run(self, job: PerplexityJob, text: str) -> None:
        try:
            lm = self.pool.get(job.model)
            n = len(lm.tokenizer(text).input_ids)
            if n > self.limits.max_prompt_tokens:
                raise DashboardError(f"the stream's text has {n} tokens; the limit is {self.limits.max_prompt_tokens}")
            job.n_tokens, job.window = n, fit_window(n, job.window_asked)
            with self.pool.lock(job.model):  # the plan's SinkCache probe and every forward, in one turn
                plan = prepare_stream_eval(lm, text, sinks=PPL_SINKS, window=job.window, modes=PPL_MODES,
                                           text_name=PPL_TEXT_NAME)
                job.n_tokens, job.method, job.state = len(plan.ids), plan.streaming_method, "evaluating"
                job.result = plan.run(progress=False)
        except SinkscopeError as exc:
            job.error = str(exc)
        except Exception as exc:  # shown in the page; the server and the other sessions carry on
            log.exception("perplexity evaluation failed")
            job.error = f"the evaluation failed: {type(exc).__name__}: {exc}"
        finally:
            job.state = "done"
            job.finished = time.monotonic()


def describe_perplexity(job: PerplexityJob) -> dict[str, Any]:
    """A finished job's caption facts, read off its :class:`StreamEval`: text tokens, window (and whether the
    stream's was shortened), scored tokens, the sink count of lowest perplexity, dense perplexity."""
    ev = job.result
    if ev is None:
        raise DashboardError(job.error or "the evaluation has no result yet")
    by_sinks = ev.ppl_by_sinks
    best = min(by_sinks, key=lambda s: (by_sinks[s], s))  # ties: fewer sinks
    dense = ev.result("dense")
    return {
        "model": job.model, "n_tokens": ev.n_tokens, "window": ev.window, "window_asked": job.window_asked,
        "shortened": ev.window < job.window_asked, "n_targets": len(ev.targets), "ppl_by_sinks": by_sinks,
        "best_sinks": best, "best_ppl": by_sinks[best], "dense_ppl": dense.ppl,
        "beyond_context": bool(dense.info.get("beyond_context")), "method": ev.settings.get("streaming"),
        "seconds": job.elapsed,
    }


# ----------------------------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class StreamRequest:
    """What the page asks to stream."""

    model: str
    prompt: str
    sinks: int
    window: int
    max_new_tokens: int
    read_prompt: bool = True  # feed the prompt token by token (its NLL is the real loss) rather than prefill
    temperature: float = 0.0
    seed: int | None = None


class Stream:
    """One running stream: a Streamer driven by a thread, its tokens appended to a list the page polls."""

    def __init__(self, request: StreamRequest, lm: LoadedModel, ids: list[int], pool: ModelPool):
        self.id = uuid.uuid4().hex
        self.request = request
        self.streamer = Streamer(lm, sinks=request.sinks, window=request.window)
        self.tokens: list[TokenStats] = []
        self.error: str | None = None
        self.state = "running"  # running, done, stopped, error
        self.stop_reason: str | None = None
        self.last_seen = time.monotonic()
        self._stop = threading.Event()
        self._ids, self._pool = ids, pool
        self._thread = threading.Thread(target=self._run, name=f"stream-{self.id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: str) -> None:
        """Ask the thread to stop after the current token."""
        if self.state == "running":
            self.stop_reason = reason
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def tokens_per_second(self, last: int = 16) -> float | None:
        recent = self.tokens[-last:]
        total_ms = sum(t.latency_ms for t in recent)
        return 1000 * len(recent) / total_ms if recent and total_ms > 0 else None

    def _tokens(self) -> Iterator[TokenStats]:
        r = self.request
        yield from self.streamer.feed(self._ids, chunk=1 if r.read_prompt else None)
        yield from self.streamer.generate(r.max_new_tokens, temperature=r.temperature, seed=r.seed)

    def _run(self) -> None:
        lock = self._pool.lock(self.request.model)
        tokens = self._tokens()
        try:
            while not self._stop.is_set():
                with lock:
                    tok = next(tokens, None)
                if tok is None:
                    break
                self.tokens.append(tok)
            self.state = "stopped" if self._stop.is_set() else "done"
        except SinkscopeError as exc:
            self.error, self.state = str(exc), "error"
        except Exception as exc:  # shown in the page; the server and the other sessions carry on
            log.exception("stream failed")
            self.error, self.state = f"the stream failed: {type(exc).__name__}: {exc}", "error"
        finally:
            # A finished stream keeps what its page shows (its tokens), not its KV cache and last logits: the
            # page may poll it for minutes, and a server may hold hundreds (benchmarks/dashboard_load.py).
            tokens.close()
            with lock:
                self.streamer.release()


class Streams:
    """At most one stream per browser session (tab), limits on all of them, and a reaper for lost pages."""

    def __init__(self, pool: ModelPool, limits: Limits, reap_every: float = 1.0):
        self.pool, self.limits = pool, limits
        self._by_session: dict[str, Stream] = {}
        self._starting = 0  # slots taken by starts still building their stream (counted against the limit)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, args=(reap_every,), name="stream-reaper",
                                        daemon=True)
        self._reaper.start()

    def start(self, session: str, request: StreamRequest) -> Stream:
        """Validate ``request`` against the limits and the model, stop the session's old stream, start a new one."""
        lim = self.limits
        if not request.prompt.strip():
            raise DashboardError("the prompt is empty: type a text to stream")
        if request.sinks < 0:
            raise DashboardError(f"sinks S must be 0 or more, got {request.sinks}")
        if not 1 <= request.window <= lim.max_window:
            raise DashboardError(f"window W must be between 1 and {lim.max_window}, got {request.window}")
        if not 0 <= request.max_new_tokens <= lim.max_new_tokens:
            raise DashboardError(f"new tokens must be between 0 and {lim.max_new_tokens}, got "
                                 f"{request.max_new_tokens}")
        if request.temperature < 0:
            raise DashboardError(f"temperature must be 0 or more, got {request.temperature}")
        with self._lock:
            old = self._by_session.get(session)
        if old is not None:  # one stream per page: the old one ends after its current token
            old.stop("replaced by a new stream")
            old.join(timeout=30)
        # The check and the slot are taken under one lock: concurrent starts (the server's threads) that all
        # counted before any registered let twice the limit run (found by benchmarks/dashboard_load.py).
        with self._lock:
            running = sum(s.running for s in self._by_session.values()) + self._starting
            if running >= lim.max_streams:
                raise DashboardError(f"{running} streams are running on this server (the limit is "
                                     f"{lim.max_streams}); stop one or wait for one to finish")
            self._starting += 1
        try:
            lm = self.pool.get(request.model)
            ids = lm.tokenizer(request.prompt).input_ids
            if not ids:
                raise DashboardError("the prompt is empty after tokenization")
            if len(ids) > lim.max_prompt_tokens:
                raise DashboardError(f"the prompt has {len(ids)} tokens; the limit is {lim.max_prompt_tokens}")
            stream = Stream(request, lm, ids, self.pool)  # SinkCache checks S + W against the model's positions
            with self._lock:
                self._by_session[session] = stream
                self._starting -= 1
        except BaseException:
            with self._lock:
                self._starting -= 1
            raise
        stream.start()
        return stream

    def get(self, session: str | None, stream_id: str | None) -> Stream | None:
        """The session's stream if it is ``stream_id``; marks the page as alive. None: unknown here."""
        with self._lock:
            s = self._by_session.get(session) if session else None
        if s is None or s.id != stream_id:
            return None
        s.last_seen = time.monotonic()
        return s

    def set_sinks(self, session: str, stream_id: str | None, on: bool) -> Stream | None:
        s = self.get(session, stream_id)
        if s is not None:
            s.streamer.set_sinks(on)
        return s

    def stop(self, session: str, reason: str = "stopped") -> None:
        with self._lock:
            s = self._by_session.get(session)
        if s is not None:
            s.stop(reason)

    def running(self) -> list[Stream]:
        with self._lock:
            return [s for s in self._by_session.values() if s.running]

    def shutdown(self) -> None:
        """Stop and forget every stream, and the reaper (server exit; to a page, the same as a restart)."""
        self._closed.set()
        with self._lock:
            streams = list(self._by_session.values())
            self._by_session.clear()
        for s in streams:
            s.stop("the server is shutting down")
        for s in streams:
            s.join(timeout=10)
        if self._reaper is not threading.current_thread():
            self._reaper.join(timeout=10)  # wakes at once: a thread left ending at interpreter exit can abort it

    def _reap_loop(self, every: float) -> None:
        while not self._closed.wait(every):
            self.reap()

    def reap(self) -> None:
        """Stop streams whose page stopped polling, and forget finished ones of pages that are gone."""
        now = time.monotonic()
        with self._lock:
            items = list(self._by_session.items())
        for session, s in items:
            idle = now - s.last_seen
            if s.running and idle > self.limits.idle_seconds:
                s.stop(f"its page stopped polling for {idle:.0f} s")
            elif not s.running and idle > 10 * self.limits.idle_seconds:
                with self._lock:
                    if self._by_session.get(session) is s:
                        del self._by_session[session]


def describe(stream: Stream) -> dict[str, Any]:
    """The status the page shows: state, sinks, cache length and memory, speed, drift."""
    last = stream.tokens[-1] if stream.tokens else None
    return {
        "state": stream.state,
        "error": stream.error,
        "stop_reason": stream.stop_reason,
        "tokens": len(stream.tokens),
        "sinks_enabled": last.sinks_enabled if last else stream.streamer.sinks_enabled,
        "cache_length": last.cache_length if last else 0,
        "cache_bytes": last.cache_bytes if last else 0,
        "tokens_per_second": stream.tokens_per_second(),
        "drift": list(last.drift) if last else [],
    }
