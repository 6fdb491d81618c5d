"""Would pinning a prompt's secondary sinks beat keeping more leading tokens? Evidence from streaming it.

Secondary sinks (:func:`sinkscope.metrics.secondary_sinks`) are later positions that distant queries favour
in some layers. A StreamingLLM cache keeps only the first S tokens and a window, so once a secondary sink
leaves the window its attention has to go elsewhere. :func:`pin_evidence` streams the prompt itself through
three caches of which two have the same size, in one pass each (:func:`sinkscope.streaming.onepass.onepass_nll`
with ``pins``):

* ``SinkCache(S, W)``, the baseline;
* ``SinkCache(S + n, W)``: n more leading tokens;
* S leading tokens plus the n secondary sinks pinned once they leave the window (the same budget).

Perplexity is scored on the tokens after the last pinned position has left the window, where the three
differ. Pinning "helps" when it beats the n extra leading tokens by more than :data:`PIN_TOLERANCE`.
No shipped cache pins later positions (kvpress and llama.cpp keep leading tokens only), so the verdict says
whether such a cache would be worth building for prompts like this one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, PromptError

if TYPE_CHECKING:  # typing only: analysis imports nothing from here
    from .analysis import SinkProfile
    from .models import LoadedModel
    from .prompts import Prompt

PIN_TOLERANCE = 0.01  # relative perplexity difference below which pinning and leading tokens tie
MAX_PINS = 4  # secondary sinks pinned at most (the strongest first)
MIN_SCORED = 32  # tokens scored after the last pin has left the window
MIN_WINDOW = 8
PIN_TOKENS = 2048  # a profile's prompt is streamed up to this many tokens (its secondary sinks are early)


@dataclass
class PinEvidence:
    """Perplexity of one prompt streamed with n secondary sinks pinned, against n more leading tokens."""

    prompt: str
    positions: list[int]  # the pinned secondary sinks
    tokens: list[str]  # their text
    sinks: int  # S, the leading tokens every cache keeps
    window: int  # W
    n_tokens: int
    scored_from: int  # first token scored: the last pin has left the window
    baseline_ppl: float  # SinkCache(S, W)
    leading_ppl: float  # SinkCache(S + n, W)
    pinned_ppl: float  # S leading tokens + the n pins, W
    helps: bool
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ppl(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll))))


def pin_evidence(lm: LoadedModel, ids: Sequence[int], positions: Sequence[int], *, sinks: int,
                 window: int | None = None, name: str = "prompt", tokens: Sequence[str] | None = None,
                 chunk: int = 512) -> PinEvidence:
    """Stream ``ids`` three ways (module docstring) and say whether pinning ``positions`` pays.

    ``window`` defaults to a quarter of the text (at least :data:`MIN_WINDOW`, at most 512), shrunk so that at
    least :data:`MIN_SCORED` tokens follow the moment the last pin leaves it.

    Raises:
        ConfigError: the model's attention can't be streamed in one pass (the message says why), bad sizes.
        PromptError: no positions to pin, or a text too short for them to leave the window.
    """
    from .streaming.onepass import onepass_nll

    if not (isinstance(sinks, int) and sinks >= 0):
        raise ConfigError(f"sinks must be a whole number >= 0, got {sinks!r}")
    ids = [int(x) for x in ids]
    texts = list(tokens) if tokens is not None else [""] * len(positions)
    chosen = sorted({int(p): t for p, t in zip(positions, texts, strict=True) if sinks <= int(p) < len(ids)}.items())
    pins, pin_tokens = [p for p, _ in chosen], [t for _, t in chosen]
    if not pins:
        raise PromptError(f"nothing to pin in {name!r}: no secondary sink beyond the first {sinks} tokens")
    n, last = len(ids), pins[-1]
    room = n - MIN_SCORED - last - 1  # the widest window that still leaves MIN_SCORED tokens to score
    w = min(512, max(MIN_WINDOW, n // 4)) if window is None else int(window)
    if window is None:
        w = min(w, room)
    if w < MIN_WINDOW or w > room:
        raise PromptError(f"{name!r} has {n} tokens: too few for the pin at position {last} to leave a window of "
                          f"{max(w, MIN_WINDOW)} with {MIN_SCORED} tokens after it (a longer prompt, or fewer pins)")
    extra = len(pins)
    base = onepass_nll(lm.model, ids, sinks, w, chunk=chunk)
    leading = onepass_nll(lm.model, ids, sinks + extra, w, chunk=chunk)
    pinned = onepass_nll(lm.model, ids, sinks, w, chunk=chunk, pins=pins)
    start = last + w + 1
    b, lead, pin = (_ppl(x[start:]) for x in (base, leading, pinned))
    rel = (lead - pin) / lead
    what = "pinning the secondary sink" if extra == 1 else f"pinning the {extra} secondary sinks"
    more = "one more leading token" if extra == 1 else f"{extra} more leading tokens"
    if rel > PIN_TOLERANCE:
        verdict = f"{what} beats {more}: perplexity {pin:.3f} against {lead:.3f} ({rel:.1%} lower)"
    elif rel < -PIN_TOLERANCE:
        verdict = f"{more} {'beats' if extra == 1 else 'beat'} {what}: perplexity {lead:.3f} against {pin:.3f}"
    else:
        verdict = (f"{what} and {more} tie within {PIN_TOLERANCE:.0%} (perplexity {pin:.3f} and {lead:.3f}): "
                   "more leading tokens, which every cache supports, are enough")
    return PinEvidence(prompt=name, positions=pins, tokens=pin_tokens,
                       sinks=sinks, window=w, n_tokens=n, scored_from=start, baseline_ppl=b, leading_ppl=lead,
                       pinned_ppl=pin, helps=bool(rel > PIN_TOLERANCE), verdict=verdict)


def profile_pin_evidence(lm: LoadedModel, profile: SinkProfile, prompts: Sequence[Prompt], *,
                         window: int | None = None, max_pins: int = MAX_PINS) -> PinEvidence:
    """:func:`pin_evidence` for the first of ``prompts`` (those ``profile`` measured, in its order) that has
    secondary sinks within its first :data:`PIN_TOKENS` tokens: its strongest ``max_pins`` of them, S the profile's
    recommended sink count.

    Raises:
        PromptError: no prompt has a secondary sink to pin (or none leaves the window), and as
            :func:`pin_evidence`.
    """
    from .analysis import encode_prompt

    if len(prompts) != len(profile.prompts):
        raise ConfigError(f"expected the {len(profile.prompts)} prompts the profile measured, got {len(prompts)}")
    sinks = profile.recommendation.sinks
    for result, prompt in zip(profile.prompts, prompts, strict=True):
        n = min(result.n_tokens, PIN_TOKENS)
        found = [s for s in result.secondary_sinks if sinks <= s.position < n][:max_pins]
        if not found:
            continue
        ids = encode_prompt(lm, prompt, n)[0].tolist()
        return pin_evidence(lm, ids, [s.position for s in found], sinks=sinks,
                            window=window, name=result.name, tokens=[s.token for s in found])
    raise PromptError("nothing to pin: no prompt has a secondary sink beyond the recommended sinks")
