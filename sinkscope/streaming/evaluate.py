"""Perplexity under eviction (Xiao et al. 2023, Table 1): a long text scored under several KV-cache policies.

Every mode scores the *same target tokens*: positions from ``max(sinks) + window`` to the end of the text, so
that each mode has evicted (or, for dense, could have evicted) before its first target. The NLL of target
``t`` is ``-log p(token t | tokens < t)`` under that mode's context; perplexity is ``exp(mean NLL)``.

Modes
-----
``streaming`` (one result per sink count ``S`` and window ``W``)
    StreamingLLM through :class:`~sinkscope.streaming.cache.SinkCache` ``(S, W)``: every token is scored with the
    context that token-by-token streaming gives it. By default in one pass (:mod:`sinkscope.streaming.onepass`:
    chunked forwards with the cache's band and sink attention in place of the model's; the same numbers as
    feeding the tokens one by one, to float32 rounding). ``exact_stream=True`` feeds them one by one through
    :class:`~sinkscope.streaming.streamer.Streamer` (the first ``S + W`` in one forward: nothing is evicted
    before); that is the reference the tests hold one pass to, and the fallback for models one pass doesn't
    serve (their attention bypasses transformers' attention interface: GPT-J, Falcon, MPT, BLOOM), recorded in
    ``settings["onepass_fallback"]``. Each result says its ``method``.
``dense``
    The full cache: the model as trained. Computed in a few chunked forwards over a growing full KV cache,
    which is the same computation as one forward with full causal attention (and as token-by-token feeding
    with a full cache). Past ``max_position_embeddings`` the model is outside its trained range; it is still
    computed and flagged ``"beyond_context": true``.
``recompute``
    Sliding window with re-computation (at the largest window of a grid): for each target ``t`` the last
    ``W`` tokens ``t-W .. t-1`` are encoded from scratch (positions ``0 .. W-1``, no cache, no sinks) and
    predict token ``t``. That costs one ``W``-token forward per target, so ``recompute_stride=k`` scores every
    ``k``-th target only; every mode then also reports ``ppl_on_recompute_targets``, its perplexity on exactly
    that subset.

A grid (``window=[64, 128, ...]``) scores every sink count at every window on the same targets (from
``max(sinks) + max(windows)``); :meth:`StreamEval.cheapest` is the smallest cache within a tolerance of
dense.

The result is a :class:`StreamEval`; :meth:`StreamEval.to_dict` is the ``stream_eval.json`` document (schema
``sinkscope.stream_eval/2``, see ``docs/cli.md``), per-target NLLs included (rounded) for the rolling plot.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, PromptError
from ..models import LoadedModel, ModelSpec
from ..prompts import LONG_TEXT_NAME, Prompt, long_text

SCHEMA = "sinkscope.stream_eval/2"
MODES = ("streaming", "dense", "recompute")
DEFAULT_SINKS = (0, 1, 2, 4, 8)
DEFAULT_WINDOW = 256
DEFAULT_TOKENS = 4000  # of the default text, when no ``tokens`` is given
AUTO_RECOMPUTE_TARGETS = 200  # recompute_stride="auto": at most this many recomputed targets
MIN_TARGETS = 32  # scored tokens a text must leave after max(sinks) + window
NLL_DIGITS = 4  # per-target NLLs in the JSON (perplexities are computed before rounding)
DEFAULT_TEXT_NAME = LONG_TEXT_NAME
_LOGITS_BYTES = 256 * 2**20  # dense: at most this many bytes of float32 logits per forward
_RECOMPUTE_TOKENS = 1024  # recompute: about this many tokens per batched forward

Progress = Callable[[int], None]


# ------------------------------------------------------------------------------------------------- text


def default_text() -> Prompt:
    """Python's own documentation topics (``pydoc_data.topics``, standard library, offline), in key order."""
    return long_text()


@contextmanager
def _quiet_transformers():
    """Silence transformers' "sequence longer than the model's maximum" warning while tokenizing a long text."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _text_ids(lm: LoadedModel, text: str | Prompt | Sequence[int] | torch.Tensor | None,
              name: str | None) -> tuple[list[int], str]:
    if text is None:
        text = default_text()
    if isinstance(text, torch.Tensor):
        return [int(x) for x in text.reshape(-1).tolist()], name or "token ids"
    if isinstance(text, str):
        text = Prompt(name or "text", text)
    if isinstance(text, Prompt):
        if not text.text.strip():
            raise PromptError(f"the text {text.name!r} is empty")
        with _quiet_transformers():
            ids = list(lm.tokenizer(text.text).input_ids)
        return ids, name or text.name
    try:
        return [int(x) for x in text], name or "token ids"
    except (TypeError, ValueError):
        raise ConfigError(f"expected a text, a Prompt or token ids, not {type(text).__name__}") from None


# --------------------------------------------------------------------------------------------- one mode


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """``-log softmax(logits)[target]`` per row, in float32 like the model's own loss, as float64 numpy."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").double().cpu().numpy()


def _device(lm: LoadedModel) -> torch.device:
    return next(lm.model.parameters()).device


def dense_chunk_size(lm: LoadedModel) -> int:
    """Tokens per dense forward: keeps one forward's float32 logits under 256 MiB (16..1024 tokens)."""
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    return int(min(1024, max(16, _LOGITS_BYTES // (4 * vocab))))


def dense_nll(lm: LoadedModel, ids: Sequence[int], *, chunk: int | None = None,
              on_forward: Progress | None = None) -> np.ndarray:
    """NLL of every token under the full causal context: ``[T]``, ``nan`` at position 0 (nothing predicts it).

    Forwards of ``chunk`` tokens over a growing full (dynamic) KV cache: the same attention as one forward
    over the whole text, without a ``T x vocab`` logits matrix.
    """
    from transformers import DynamicCache

    ids = list(ids)
    n = len(ids)
    chunk = chunk or dense_chunk_size(lm)
    out = np.full(n, np.nan)
    dev = _device(lm)
    x = torch.tensor(ids, device=dev)
    cache = DynamicCache(config=lm.model.config)
    last: torch.Tensor | None = None  # the previous chunk's last row predicts this chunk's first token
    with torch.no_grad():
        for start in range(0, n, chunk):
            part = x[start:start + chunk]
            logits = lm.model(input_ids=part[None], past_key_values=cache, use_cache=True).logits[0]
            rows = logits[:-1] if last is None else torch.cat([last[None], logits[:-1]])
            first = start + (1 if last is None else 0)
            out[first:start + len(part)] = _nll(rows, x[first:start + len(part)])
            last = logits[-1]
            if on_forward:
                on_forward(1)
    return out


def streaming_nll(lm: LoadedModel, ids: Sequence[int], sinks: int, window: int, *,
                  on_forward: Progress | None = None) -> np.ndarray:
    """NLL of every token streamed token by token through ``SinkCache(sinks, window)``: ``[T]``, ``nan`` at 0.

    The first ``sinks + window`` tokens go in one forward (identical to feeding them one by one: nothing is
    evicted before then), the rest one token per forward: StreamingLLM exactly, and slow (one memory-bound
    forward per token). :func:`onepass_stream_nll` gives the same numbers in one pass.
    """
    chunk = 1
    from .streamer import Streamer

    ids = list(ids)
    n = len(ids)
    out = np.full(n, np.nan)
    streamer = Streamer(lm, sinks=sinks, window=window)
    warm = min(n, sinks + window)
    for part, step in ((ids[:warm], warm), (ids[warm:], chunk)):
        for i, tok in enumerate(streamer.feed(part, chunk=step)):
            if tok.nll is not None:
                out[tok.step] = tok.nll
            if on_forward and ((i + 1) % step == 0 or i == len(part) - 1):
                on_forward(1)
    return out


def onepass_stream_nll(lm: LoadedModel, ids: Sequence[int], sinks: int, window: int, *, chunk: int | None = None,
                       on_forward: Progress | None = None) -> np.ndarray:
    """The NLLs of :func:`streaming_nll` in one pass (:func:`sinkscope.streaming.onepass.onepass_nll`), in
    forwards of ``chunk`` tokens (default: :func:`dense_chunk_size`)."""
    from .onepass import onepass_nll

    return onepass_nll(lm.model, ids, sinks, window, chunk=chunk or dense_chunk_size(lm), on_forward=on_forward)


def recompute_batch_size(window: int) -> int:
    """Windows per recompute forward: about 1024 tokens per forward."""
    return max(1, _RECOMPUTE_TOKENS // window)


def recompute_nll(lm: LoadedModel, ids: Sequence[int], positions: Sequence[int], window: int, *,
                  batch: int | None = None, on_forward: Progress | None = None) -> np.ndarray:
    """NLL of token ``t`` given only the ``window`` tokens before it, encoded from scratch, for each position.

    Windows of the same length share a forward (``batch`` at a time); a position ``t < window`` sees its
    whole prefix (``t`` tokens), which is the dense prediction.
    """
    ids_t = torch.tensor(list(ids), device=_device(lm))
    pos = [int(p) for p in positions]
    if any(p < 1 or p >= len(ids_t) for p in pos):
        raise ConfigError(f"recompute positions must lie in 1..{len(ids_t) - 1}")
    batch = batch or recompute_batch_size(window)
    out = np.full(len(pos), np.nan)
    keep_one = _takes_logits_to_keep(lm.model)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(pos):
        groups.setdefault(min(p, window), []).append(i)
    with torch.no_grad():
        for length, members in groups.items():
            for b in range(0, len(members), batch):
                idx = members[b:b + batch]
                x = torch.stack([ids_t[pos[i] - length:pos[i]] for i in idx])
                kwargs = {"logits_to_keep": 1} if keep_one else {}
                logits = lm.model(input_ids=x, use_cache=False, **kwargs).logits[:, -1]
                out[idx] = _nll(logits, ids_t[[pos[i] for i in idx]])
                if on_forward:
                    on_forward(1)
    return out


def _takes_logits_to_keep(model: Any) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


# ------------------------------------------------------------------------------------------------ result


def _ppl(nll: np.ndarray) -> float:
    nll = np.asarray(nll, dtype=float)
    if nll.size == 0 or not np.isfinite(nll).all():
        return float("nan")
    return float(math.exp(float(nll.mean())))


def _json_float(x: float, digits: int | None = None) -> float | None:
    if not math.isfinite(x):
        return None  # JSON has no NaN
    return round(x, digits) if digits is not None else x


@dataclass
class ModeResult:
    """One mode's NLLs on its targets (``positions``), and how they were computed (``info``)."""

    mode: str
    sinks: int | None
    positions: np.ndarray  # target positions scored, ascending
    nll: np.ndarray  # [len(positions)] float64
    info: dict[str, Any] = field(default_factory=dict)
    window: int | None = None  # streaming and recompute: W

    @property
    def cache_budget(self) -> int | None:
        """Streaming: the keys a query sees, ``S + W``."""
        return self.sinks + self.window if self.mode == "streaming" and self.window is not None else None

    @property
    def ppl(self) -> float:
        """``exp(mean NLL)`` over this result's targets."""
        return _ppl(self.nll)

    @property
    def label(self) -> str:
        """``streaming S=4``, ``dense``, ``recompute``."""
        return f"{self.mode} S={self.sinks}" if self.mode == "streaming" else self.mode

    def ppl_on(self, positions: np.ndarray) -> float:
        """Perplexity on a subset of this result's positions."""
        idx = np.searchsorted(self.positions, positions)
        if np.any(idx >= len(self.positions)) or np.any(self.positions[np.minimum(idx, len(self.positions) - 1)]
                                                          != positions):
            raise ConfigError("positions are not a subset of this result's targets")
        return _ppl(self.nll[idx])

    def to_dict(self, *, include_nll: bool = True, subset: np.ndarray | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode}
        if self.sinks is not None:
            d["sinks"] = self.sinks
        if self.window is not None:
            d["window"] = self.window
        d["ppl"] = _json_float(self.ppl)
        d["mean_nll"] = _json_float(float(self.nll.mean()) if self.nll.size else float("nan"))
        d["n_targets"] = len(self.positions)
        if subset is not None:
            d["ppl_on_recompute_targets"] = _json_float(self.ppl_on(subset))
        d.update(self.info)
        if include_nll:
            stride = int(self.positions[1] - self.positions[0]) if len(self.positions) > 1 else 1
            d["positions"] = {"first": int(self.positions[0]) if len(self.positions) else None, "stride": stride,
                              "count": len(self.positions)}
            d["nll"] = [_json_float(float(v), NLL_DIGITS) for v in self.nll]
        return d


@dataclass
class StreamEval:
    """Perplexity of one text under each eviction mode, on identical targets (see the module docstring)."""

    model: ModelSpec
    text_name: str
    n_tokens: int  # tokens evaluated (the text's first n_tokens)
    available_tokens: int  # tokens in the whole text
    window: int  # the largest window: recompute's, and the one ppl_by_sinks reads
    sinks: tuple[int, ...]
    targets: np.ndarray  # positions max(sinks) + max(windows) .. n_tokens - 1
    recompute_targets: np.ndarray | None  # targets[::stride] when recompute ran
    results: list[ModeResult]
    settings: dict[str, Any]
    windows: tuple[int, ...] = ()  # every window streamed (a grid when more than one), ascending

    def __post_init__(self) -> None:
        if not self.windows:
            self.windows = (self.window,)

    def result(self, mode: str, sinks: int | None = None, window: int | None = None) -> ModeResult:
        """The result of ``mode`` (and ``sinks`` and ``window`` for streaming; default window: :attr:`window`)."""
        if mode == "streaming" and window is None:
            window = self.window
        for r in self.results:
            if r.mode == mode and (sinks is None or r.sinks == sinks) and (
                    window is None or r.window is None or r.window == window):
                return r
        what = "".join([f" with {sinks} sinks" if sinks is not None else "",
                        f" at window {window}" if window is not None and mode == "streaming" else ""])
        raise ConfigError(f"no {mode} result{what} in this evaluation; it has "
                          f"{', '.join(sorted({r.label for r in self.results}))}")

    @property
    def ppl_by_sinks(self) -> dict[int, float]:
        """Streaming perplexity per sink count, at :attr:`window`."""
        return {int(r.sinks): r.ppl for r in self.results
                if r.mode == "streaming" and r.sinks is not None and r.window == self.window}

    @property
    def ppl_grid(self) -> dict[tuple[int, int], float]:
        """Streaming perplexity per ``(sinks, window)``."""
        return {(int(r.sinks), int(r.window)): r.ppl for r in self.results
                if r.mode == "streaming" and r.sinks is not None and r.window is not None}

    def cheapest(self, tolerance: float = 0.05) -> ModeResult | None:
        """The streaming result with the smallest cache (``S + W``; ties: fewer sinks) whose perplexity is at most
        ``(1 + tolerance) x`` dense; None when none is, or without a dense result."""
        try:
            limit = (1 + tolerance) * self.result("dense").ppl
        except ConfigError:
            return None
        ok = [r for r in self.results if r.mode == "streaming" and math.isfinite(r.ppl) and r.ppl <= limit]
        return min(ok, key=lambda r: (r.cache_budget, r.sinks)) if ok else None

    def to_dict(self, *, include_nll: bool = True) -> dict[str, Any]:
        """The ``stream_eval.json`` document (schema ``sinkscope.stream_eval/2``)."""
        subset = self.recompute_targets
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "model": self.model.to_dict(),
            "text": {"name": self.text_name, "n_tokens": self.n_tokens, "available_tokens": self.available_tokens},
            "window": self.window,
            "windows": list(self.windows),
            "tokens": self.n_tokens,
            "sinks": list(self.sinks),
            "targets": {"first": int(self.targets[0]), "last": int(self.targets[-1]), "count": len(self.targets),
                        "rule": "positions from max(sinks) + max(windows) to the end of the text, the same in every "
                                "mode"},
        }
        if subset is not None:
            stride = self.settings.get("recompute_stride", 1)
            d["recompute_targets"] = {"stride": stride, "count": len(subset), "first": int(subset[0]),
                                      "rule": f"one target in every {stride}, from the first (recompute's targets; "
                                              f"every mode reports ppl_on_recompute_targets on them)"
                                      if stride > 1 else "every target"}
        d["settings"] = dict(self.settings)
        d["results"] = [r.to_dict(include_nll=include_nll, subset=subset) for r in self.results]
        return d

    def to_json(self, indent: int | None = 1) -> str:
        """``to_dict()`` as JSON."""
        return json.dumps(self.to_dict(), indent=indent)

    def plot_ppl(self) -> Any:
        """Perplexity against sink count, dense and recompute as reference lines (plotly)."""
        from .. import plots

        return plots.stream_ppl_by_sinks(self)

    def plot_grid(self) -> Any:
        """Heatmap of streaming perplexity, sink counts x windows (plotly)."""
        from .. import plots

        return plots.stream_ppl_grid(self)

    def plot_rolling(self, span: int = 64) -> Any:
        """Rolling mean NLL over position, one line per mode (plotly)."""
        from .. import plots

        return plots.stream_rolling_nll(self, span=span)

    def __repr__(self) -> str:
        ppl = ", ".join(f"{r.label}{f' W={r.window}' if len(self.windows) > 1 and r.mode == 'streaming' else ''}: "
                        f"{r.ppl:.2f}" for r in self.results)
        win = f"windows={list(self.windows)}" if len(self.windows) > 1 else f"window={self.window}"
        return f"StreamEval(model={self.model.name!r}, text={self.text_name!r}, tokens={self.n_tokens}, {win}, {ppl})"


# -------------------------------------------------------------------------------------------------- plan


@dataclass
class StreamEvalPlan:
    """Checked inputs of an evaluation: everything wrong with them is refused before the first forward."""

    lm: LoadedModel
    ids: list[int]
    text_name: str
    available_tokens: int
    sinks: tuple[int, ...]
    windows: tuple[int, ...]  # ascending
    modes: tuple[str, ...]
    exact_stream: bool  # streaming token by token (asked for, or the model isn't served by one pass)
    onepass_fallback: str | None  # why one pass doesn't serve this model (then exact_stream)
    recompute_stride: int
    recompute_batch: int
    dense_chunk: int

    @property
    def window(self) -> int:
        """The largest window: recompute's, and the one the single-window summaries read."""
        return self.windows[-1]

    @property
    def targets(self) -> np.ndarray:
        return np.arange(max(self.sinks, default=0) + self.window, len(self.ids))

    @property
    def recompute_targets(self) -> np.ndarray:
        return self.targets[:: self.recompute_stride]

    @property
    def beyond_context(self) -> bool:
        mp = self.lm.spec.max_positions
        return bool(mp and len(self.ids) > mp)

    @property
    def streaming_method(self) -> str:
        """How streaming results are computed: ``one pass`` or ``token by token``."""
        return "token by token" if self.exact_stream else "one pass"

    def forwards(self) -> dict[str, int]:
        """Forwards each mode will run (the progress bar's total)."""
        n = len(self.ids)
        out = {}
        if "dense" in self.modes:
            out["dense"] = math.ceil(n / self.dense_chunk)
        if "streaming" in self.modes:
            if self.exact_stream:
                out["streaming"] = sum(1 + max(0, n - s - w) for s in self.sinks for w in self.windows)
            else:
                out["streaming"] = len(self.sinks) * len(self.windows) * math.ceil(n / self.dense_chunk)
        if "recompute" in self.modes:
            out["recompute"] = math.ceil(len(self.recompute_targets) / self.recompute_batch)
        return out

    def _streaming(self, s: int, w: int, targets: np.ndarray, on_forward: Progress) -> ModeResult:
        lm, ids = self.lm, self.ids
        t0 = time.perf_counter()
        if self.exact_stream:
            nll = streaming_nll(lm, ids, s, w, on_forward=on_forward)
            method = (f"SinkCache, one token per forward (the first {s + w} tokens in one forward: nothing is "
                      "evicted before)")
        else:
            nll = onepass_stream_nll(lm, ids, s, w, chunk=self.dense_chunk, on_forward=on_forward)
            method = (f"one pass: SinkCache's attention (sinks at in-cache positions, a band of {w} keys) for every "
                      f"query, forwards of {self.dense_chunk} tokens; equal to token-by-token streaming")
        secs = time.perf_counter() - t0
        return ModeResult("streaming", s, targets, nll[targets], {
            "cache_budget": s + w, "exact": True, "method": method,
            "streamed": "token by token" if self.exact_stream else "one pass", "seconds": round(secs, 2),
            "tokens_per_s": round(len(ids) / secs, 1) if secs > 0 else None}, window=w)

    def run(self, *, progress: bool = True) -> StreamEval:
        """Run every mode and collect the results (streaming by window and sink count, dense, then recompute)."""
        from .._progress import progress as progress_bar

        lm, ids, w = self.lm, self.ids, self.window
        targets = self.targets
        results: list[ModeResult] = []
        dense: ModeResult | None = None
        with progress_bar(sum(self.forwards().values()), f"eval-stream {lm.spec.name}", "forward",
                          enabled=progress) as bar:
            if "dense" in self.modes:
                bar.set_postfix_str("dense")
                t0 = time.perf_counter()
                nll = dense_nll(lm, ids, chunk=self.dense_chunk, on_forward=bar.update)
                secs = time.perf_counter() - t0
                single = self.dense_chunk >= len(ids)
                dense = ModeResult("dense", None, targets, nll[targets], {
                    "method": "single forward, full causal attention" if single else
                    f"forwards of {self.dense_chunk} tokens over a full KV cache: the same as one forward with "
                    "full causal attention",
                    "beyond_context": self.beyond_context, "exact": True, "seconds": round(secs, 2),
                    "tokens_per_s": round(len(ids) / secs, 1) if secs > 0 else None})
            if "streaming" in self.modes:
                for win in self.windows:
                    for s in self.sinks:
                        bar.set_postfix_str(f"streaming S={s}" + (f" W={win}" if len(self.windows) > 1 else ""))
                        results.append(self._streaming(s, win, targets, bar.update))
            if dense is not None:
                results.append(dense)
            if "recompute" in self.modes:
                bar.set_postfix_str("recompute")
                sub = self.recompute_targets
                t0 = time.perf_counter()
                nll = recompute_nll(lm, ids, sub, w, batch=self.recompute_batch, on_forward=bar.update)
                secs = time.perf_counter() - t0
                results.append(ModeResult("recompute", 0, sub, nll, {
                    "stride": self.recompute_stride, "exact": True,
                    "method": f"each target predicted from the {w} tokens before it, encoded from scratch "
                              f"(positions 0..{w - 1}, no cache, no sinks)"
                              + (f"; one target in every {self.recompute_stride}" if self.recompute_stride > 1 else ""),
                    "seconds": round(secs, 2),
                    "targets_per_s": round(len(sub) / secs, 3) if secs > 0 else None}, window=w))
        spec = lm.spec
        settings: dict[str, Any] = {"modes": list(self.modes), "exact": True, "streaming": self.streaming_method}
        if self.onepass_fallback:
            settings["onepass_fallback"] = self.onepass_fallback
        if "recompute" in self.modes:
            settings.update(recompute_stride=self.recompute_stride, recompute_batch=self.recompute_batch)
        if "dense" in self.modes or not self.exact_stream:
            settings["forward_tokens"] = self.dense_chunk
        settings.update(min_targets=MIN_TARGETS, nll_digits=NLL_DIGITS, dtype=spec.dtype, device=spec.device,
                        threads=torch.get_num_threads())
        return StreamEval(model=spec, text_name=self.text_name, n_tokens=len(ids),
                          available_tokens=self.available_tokens, window=w, sinks=self.sinks, targets=targets,
                          recompute_targets=self.recompute_targets if "recompute" in self.modes else None,
                          results=results, settings=settings, windows=self.windows)


def _int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _window_list(window: int | Sequence[int]) -> tuple[int, ...]:
    values = [window] if _int(window) else list(window) if isinstance(window, Sequence) else [window]
    if not values or not all(_int(w) and w >= 1 for w in values):
        raise ConfigError(f"windows must be whole numbers >= 1, got {window!r}")
    return tuple(sorted({int(w) for w in values}))


def prepare_stream_eval(lm: LoadedModel | str, text: str | Prompt | Sequence[int] | torch.Tensor | None = None, *,
                        sinks: Sequence[int] = DEFAULT_SINKS, window: int | Sequence[int] = DEFAULT_WINDOW,
                        tokens: int | None = None, modes: Sequence[str] = MODES, exact_stream: bool = False,
                        recompute_stride: int | str = 1, recompute_batch: int | None = None,
                        text_name: str | None = None) -> StreamEvalPlan:
    """Check the inputs of :func:`evaluate_stream` and tokenize the text, without running the model.

    Cheap (a tokenization and a SinkCache probe), so callers can refuse bad input before slow work.
    ``recompute_stride="auto"`` picks the smallest stride that keeps recompute at or below
    :data:`AUTO_RECOMPUTE_TARGETS` targets.

    Raises:
        ConfigError: ``S < 0``, ``W < 1``, ``max(S) + max(W)`` beyond the model's positions, an unknown mode, a
            bad stride, or an architecture ``SinkCache`` can't serve (streaming mode only).
        PromptError: the text is too short for ``max(S) + max(W)`` plus :data:`MIN_TARGETS` scored tokens.
    """
    if isinstance(lm, str):
        from ..models import load

        lm = load(lm)
    spec = lm.spec
    sinks = tuple(sinks)
    if not sinks:
        raise ConfigError("give at least one sink count")
    if not all(_int(s) for s in sinks) or min(sinks) < 0:
        raise ConfigError(f"sink counts must be whole numbers >= 0, got {', '.join(map(str, sinks))}")
    sinks = tuple(sorted({int(s) for s in sinks}))
    windows = _window_list(window)
    modes = tuple(dict.fromkeys(modes))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"unknown mode(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(MODES)}")
    budget = max(sinks) + windows[-1]
    mp = spec.max_positions
    if mp and budget > mp:
        raise ConfigError(f"max sinks + window = {max(sinks)} + {windows[-1]} = {budget} is beyond {spec.name}'s "
                          f"context of {mp} positions; use a smaller --window or fewer --sinks")
    from ..scheme import dropped_softcap

    dropped = dropped_softcap(lm.model)
    if dropped:
        raise ConfigError(dropped)
    fallback = None
    if "streaming" in modes:
        from ..scheme import attention_scheme
        from .cache import SinkCache

        SinkCache(lm.model, max(sinks), windows[-1])  # refuses what it can't serve, e.g. GPT-2's learned positions
        support = attention_scheme(lm.model).support()["onepass"]
        if not support.ok and not exact_stream:
            fallback = support.why
    if tokens is not None and (not _int(tokens) or tokens < 1):
        raise ConfigError(f"tokens must be a whole number >= 1, got {tokens}")

    ids, name = _text_ids(lm, text, text_name)
    available = len(ids)
    limit = tokens if tokens is not None else (DEFAULT_TOKENS if text is None else None)
    if limit is not None:
        ids = ids[:limit]
    need = budget + MIN_TARGETS
    if len(ids) < need:
        cut = f" (cut to --tokens {limit})" if limit is not None and available > len(ids) else ""
        raise PromptError(f"the text {name!r} has {len(ids)} tokens{cut}; evaluating sinks up to {max(sinks)} with "
                          f"a window of {windows[-1]} needs at least {need} (max sinks + window + {MIN_TARGETS} "
                          f"scored tokens): give a longer text, more --tokens or a smaller --window")
    if ("dense" in modes and mp and len(ids) > mp and spec.positional == "absolute"):
        raise ConfigError(f"{spec.name} learns {mp} absolute positions; dense attention over {len(ids)} tokens "
                          f"can't run: use --tokens {mp} or less")
    n_targets = len(ids) - budget
    if recompute_stride == "auto":
        stride = max(1, math.ceil(n_targets / AUTO_RECOMPUTE_TARGETS))
    elif _int(recompute_stride) and int(recompute_stride) >= 1:
        stride = int(recompute_stride)
    else:
        raise ConfigError(f"recompute stride must be a whole number >= 1 or 'auto', got {recompute_stride!r}")
    rb = recompute_batch or recompute_batch_size(windows[-1])
    if not _int(rb) or rb < 1:
        raise ConfigError(f"recompute batch must be a whole number >= 1, got {recompute_batch}")
    return StreamEvalPlan(lm=lm, ids=ids, text_name=name, available_tokens=available, sinks=sinks, windows=windows,
                          modes=modes, exact_stream=bool(exact_stream) or fallback is not None,
                          onepass_fallback=fallback, recompute_stride=stride, recompute_batch=int(rb),
                          dense_chunk=dense_chunk_size(lm))


def evaluate_stream(lm: LoadedModel | str, text: str | Prompt | Sequence[int] | torch.Tensor | None = None, *,
                    sinks: Sequence[int] = DEFAULT_SINKS, window: int | Sequence[int] = DEFAULT_WINDOW,
                    tokens: int | None = None, modes: Sequence[str] = MODES, exact_stream: bool = False,
                    recompute_stride: int | str = 1, recompute_batch: int | None = None,
                    text_name: str | None = None, progress: bool = True) -> StreamEval:
    """Perplexity of a long text streamed under each sink count, beside dense and sliding-window recompute.

    Args:
        lm: a loaded model (or a model source for :func:`sinkscope.load_model`).
        text: a text, a :class:`~sinkscope.prompts.Prompt`, or token ids; default: Python's documentation
            topics (:func:`default_text`), its first :data:`DEFAULT_TOKENS` tokens.
        sinks: sink counts ``S`` to stream with (one ``streaming`` result each, per window).
        window: ``W``, recent tokens each query attends to (itself included), or several: a grid, every sink
            count at every window on the same targets. Recompute runs at the largest.
        tokens: evaluate the text's first ``tokens`` tokens (default: the whole text given).
        modes: any of ``streaming``, ``dense``, ``recompute``.
        exact_stream: stream token by token through ``SinkCache`` instead of in one pass (the same numbers,
            hundreds of times slower; the reference one pass is tested against).
        recompute_stride: recompute every ``k``-th target only (``"auto"``: at most
            :data:`AUTO_RECOMPUTE_TARGETS` targets); every mode also reports ``ppl_on_recompute_targets``.
        recompute_batch: windows per recompute forward (default: about 1024 tokens per forward).
        text_name: the text's name in the result (default: the prompt's name, or ``text``).
        progress: show a progress bar (over forwards).

    Targets are positions ``max(sinks) + max(window) .. T - 1`` in every mode; see the module docstring.
    """
    plan = prepare_stream_eval(lm, text, sinks=sinks, window=window, tokens=tokens, modes=modes,
                               exact_stream=exact_stream, recompute_stride=recompute_stride,
                               recompute_batch=recompute_batch, text_name=text_name)
    return plan.run(progress=progress)


__all__ = ["AUTO_RECOMPUTE_TARGETS", "DEFAULT_SINKS", "DEFAULT_TOKENS", "DEFAULT_WINDOW", "MIN_TARGETS", "MODES",
           "SCHEMA", "ModeResult", "StreamEval", "StreamEvalPlan", "default_text", "dense_nll", "evaluate_stream",
           "onepass_stream_nll", "prepare_stream_eval", "recompute_nll", "streaming_nll"]
