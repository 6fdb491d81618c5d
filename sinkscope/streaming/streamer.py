"""A token streamer over :class:`SinkCache`: one token at a time, with its statistics, and a live sink switch.

Every token comes out as a :class:`TokenStats`: its surprisal (NLL) given what came before, the entropy of
the distribution it was drawn from, the cache length and bytes after it, its latency and the drift flags.
Prompt tokens are known in advance, so their NLL is the model's real loss; for generated tokens it is the
model's surprise at its own choice.

The switch: :meth:`Streamer.set_sinks` may be called from any thread at any time; it takes effect before the
next token is fed (never inside a forward), and not before the stream has its first ``S`` tokens. What it
does to the cache is documented on :meth:`SinkCache.set_sinks`: off drops the sinks at once (a plain
window), on re-prefills the stream's first ``S`` tokens, which the streamer keeps for that purpose.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..models import LoadedModel
from .cache import SinkCache


@dataclass
class TokenStats:
    """One streamed token and what the stream looked like right after it."""

    step: int  # position in the stream: tokens fed before this one
    token_id: int
    text: str
    source: str  # "prompt" (known in advance) or "generated"
    nll: float | None  # -log p(token | everything before it); None for the very first token
    entropy: float | None  # entropy (nats) of the distribution the token came from
    cache_length: int  # tokens stored in the cache after this token
    cache_bytes: int
    latency_ms: float
    sinks_enabled: bool
    drift: tuple[str, ...] = ()  # why the stream looks like it is drifting, if it does

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["drift"] = list(self.drift)
        return d


@dataclass
class DriftConfig:
    """Thresholds of :class:`DriftDetector` (see ``docs/streaming.md``)."""

    span: int = 64  # tokens in each rolling mean
    skip: int = 16  # first tokens left out of the baseline (they have little context)
    nll_rise: float = 1.0  # nats above the baseline rolling NLL
    entropy_rise: float = 1.0  # nats above the baseline rolling entropy
    loop_span: int = 32  # the last this many tokens ...
    max_period: int = 16  # ... repeating with a period of at most this many tokens is a loop


@dataclass
class DriftDetector:
    """Flags a stream whose loss or entropy rises well above its own start, or that loops.

    The baseline of each signal is its mean over the ``span`` tokens after the first ``skip``; from then on a
    rolling mean over the last ``span`` tokens more than ``*_rise`` nats above it raises the flag. A loop is
    the last ``loop_span`` tokens repeating with a period of at most ``max_period`` tokens.
    """

    config: DriftConfig = field(default_factory=DriftConfig)
    _seen: int = 0
    _tokens: deque[int] = field(default_factory=deque)
    _signals: dict[str, deque[float]] = field(default_factory=dict)
    _base: dict[str, list[float]] = field(default_factory=dict)

    def update(self, token_id: int, nll: float | None, entropy: float | None) -> tuple[str, ...]:
        """Add one token; return the reasons for a drift flag (empty: no drift)."""
        c = self.config
        self._seen += 1
        self._tokens.append(token_id)
        if len(self._tokens) > c.loop_span:
            self._tokens.popleft()
        reasons = []
        for name, value, rise in (("nll", nll, c.nll_rise), ("entropy", entropy, c.entropy_rise)):
            if value is None or not math.isfinite(value):
                continue
            recent = self._signals.setdefault(name, deque(maxlen=c.span))
            recent.append(value)
            base = self._base.setdefault(name, [])
            if self._seen > c.skip and len(base) < c.span:
                base.append(value)
            if len(base) == c.span and len(recent) == c.span:
                baseline, now = sum(base) / len(base), sum(recent) / len(recent)
                if now > baseline + rise:
                    reasons.append(f"{name} {now:.2f} > {baseline:.2f} + {rise:g}")
        period = self._loop_period()
        if period:
            reasons.append(f"loop: the last {c.loop_span} tokens repeat every {period}")
        return tuple(reasons)

    def _loop_period(self) -> int | None:
        toks = list(self._tokens)
        if len(toks) < self.config.loop_span:
            return None
        for p in range(1, self.config.max_period + 1):
            if all(toks[i] == toks[i - p] for i in range(p, len(toks))):
                return p
        return None


class Streamer:
    """Stream a model through a :class:`SinkCache`, one token at a time.

    Example::

        s = Streamer(sinkscope.load_model("smollm2-135m"), sinks=4, window=256)
        for tok in s.stream("Once upon a time", max_new_tokens=200):
            print(tok.text, end="", flush=True)
            if tok.step == 100:
                s.set_sinks(False)     # watch the loss climb, then set_sinks(True)
    """

    def __init__(self, lm: LoadedModel, *, sinks: int = 4, window: int = 256,
                 drift: DriftConfig | None = None, prefill_chunk: int | None = None) -> None:
        self.lm = lm
        self.cache = SinkCache(lm.model, sinks, window)
        self.drift = DriftDetector(drift or DriftConfig())
        # Long prompts go in chunks: a chunk's tokens see each other in full, and positions stay in range.
        self.prefill_chunk = prefill_chunk or window
        if self.prefill_chunk < 1:
            raise ConfigError("prefill_chunk must be at least 1")
        self._want_sinks = True
        self._first_ids: list[int] = []  # the stream's first S token ids, to re-prefill the sinks
        self._last_logits: torch.Tensor | None = None  # predicts the next token
        self._device = next(lm.model.parameters()).device

    # -- the switch ---------------------------------------------------------------------------------------
    @property
    def sinks_enabled(self) -> bool:
        """The requested sink setting (applied before the next token)."""
        return self._want_sinks

    def release(self) -> None:
        """Free the cache's keys and values and the last logits (the stream is over; its settings stay)."""
        self.cache.reset()
        self._last_logits = None

    def set_sinks(self, on: bool) -> None:
        """Pin (True) or release (False) the sink tokens from the next token on; safe from any thread."""
        self._want_sinks = bool(on)

    @property
    def steps(self) -> int:
        """Tokens streamed so far."""
        return self.cache.seen_tokens

    # -- streaming -----------------------------------------------------------------------------------------
    def feed(self, ids: Sequence[int], *, chunk: int | None = None) -> Iterator[TokenStats]:
        """Feed known tokens (a prompt, or a text to score); yield each with its NLL.

        ``chunk`` tokens go through one forward (default ``prefill_chunk``; 1 is exact token-by-token
        streaming). The sink switch is read between chunks.
        """
        step = max(1, chunk or self.prefill_chunk)
        ids = list(ids)
        for start in range(0, len(ids), step):
            part = ids[start:start + step]
            limit = self.cache.max_forward_tokens
            if limit is not None and len(part) > limit:
                raise ConfigError(f"a chunk of {len(part)} tokens would go past the model's positions; "
                                  f"use a chunk of at most {limit}")
            yield from self._forward(part, "prompt")

    def generate(self, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 seed: int | None = None, stop_at_eos: bool = True) -> Iterator[TokenStats]:
        """Generate up to ``max_new_tokens`` tokens after what was fed (greedy when ``temperature`` is 0)."""
        if self._last_logits is None:
            raise ConfigError("feed a prompt before generating")
        if max_new_tokens < 0:
            raise ConfigError("max_new_tokens must be >= 0")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = self.lm.tokenizer.eos_token_id
        for _ in range(max_new_tokens):
            token = _choose(self._last_logits, temperature, top_k, gen)
            stats = next(iter(self._forward([token], "generated")))
            yield stats
            if stop_at_eos and eos is not None and token == eos:
                return

    def stream(self, prompt: str, max_new_tokens: int, **generate_kwargs: Any) -> Iterator[TokenStats]:
        """Feed ``prompt`` (tokenized as the model does by default) and generate after it."""
        ids = self.lm.tokenizer(prompt).input_ids
        if not ids:
            raise ConfigError("the prompt is empty after tokenization")
        yield from self.feed(ids)
        yield from self.generate(max_new_tokens, **generate_kwargs)

    def _forward(self, ids: list[int], source: str) -> Iterator[TokenStats]:
        if self.cache.sinks_enabled != self._want_sinks and self.cache.seen_tokens >= self.cache.sinks:
            self.cache.set_sinks(self._want_sinks, sink_ids=self._first_ids)
        if len(self._first_ids) < self.cache.sinks:
            self._first_ids += ids[: self.cache.sinks - len(self._first_ids)]
        first_step = self.cache.seen_tokens
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.lm.model(input_ids=torch.tensor([ids], device=self._device), past_key_values=self.cache,
                                use_cache=True)
        logits = out.logits[0].float()  # [n, vocab]
        latency = (time.perf_counter() - t0) * 1000 / len(ids)
        # The distribution that predicted token i is the previous forward's last row for i = 0, else row i - 1.
        prev = [self._last_logits] if self._last_logits is not None else [None]
        predictors = prev + [logits[i] for i in range(len(ids) - 1)]
        self._last_logits = logits[-1]
        length, nbytes, sinks = self.cache.cache_length, self.cache.nbytes(), self.cache.sinks_enabled
        for i, (tok, pred) in enumerate(zip(ids, predictors, strict=True)):
            nll = entropy = None
            if pred is not None:
                logp = torch.log_softmax(pred, dim=-1)
                nll = float(-logp[tok])
                entropy = float(-(logp.exp() * logp).sum())
            yield TokenStats(step=first_step + i, token_id=tok, text=self.lm.tokenizer.decode([tok]), source=source,
                             nll=nll, entropy=entropy, cache_length=length, cache_bytes=nbytes,
                             latency_ms=latency, sinks_enabled=sinks, drift=self.drift.update(tok, nll, entropy))


def _choose(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    scaled = logits / temperature
    if top_k > 0:
        kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=gen))
