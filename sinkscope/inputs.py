"""Input sensitivity: does the sink depend on how the prompt reaches the model?

Serving stacks differ in what they put before the user's text: some add the tokenizer's BOS token, some
don't, and chat front ends wrap the text in the model's chat template (a system header, role tags). A
StreamingLLM cache pins the first tokens, whatever they are, so a user needs to know whether their model's sink
is the BOS token (then a stack without it loses the sink), the first token whatever it is, or the template's
header. :func:`input_sensitivity` measures the same text in each variant the tokenizer allows and puts the
sink rate, the first-token mass and the recommended sink count side by side:

* ``as tokenized``: what the tokenizer gives by default (what :func:`sinkscope.analyze` measures);
* ``without BOS`` or ``with BOS``: the BOS token removed where the tokenizer adds it, added where it does not
  (skipped, with the reason, when the tokenizer defines no BOS token);
* ``chat template``: the text as a user message of the tokenizer's chat template (skipped when it has none).

Every variant keeps the same words: the text is first cut to ``max_tokens`` of its own tokens, so the
variants differ only in what comes before (and after) it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .analysis import DEFAULT_K, DEFAULT_SHARE, SinkProfile, analyze, token_texts
from .errors import ConfigError, PromptError
from .models import LoadedModel
from .prompts import Prompt, as_prompts

INPUT_TOKENS = 512  # the text's tokens measured per variant: the first tokens' role shows at any length
AS_TOKENIZED, WITHOUT_BOS, WITH_BOS, CHAT_TEMPLATE = "as tokenized", "without BOS", "with BOS", "chat template"
# A variant whose sink rate differs from the default by at least this much "matters" (the verdict's rule).
SINK_RATE_CHANGE = 0.05


@dataclass
class InputVariant:
    """One way of feeding the text, and what the model's attention does with it."""

    name: str
    change: str  # what differs from the tokenizer's default, in words
    n_tokens: int
    first_tokens: list[str]  # the first few tokens' texts, as the model sees them
    sink_rate: float  # share of heads whose first-token mass exceeds the threshold
    first_token_mass: float  # mean over layers and heads
    sink_mass: float  # mean over layers and heads of the mass on the first K tokens
    recommended_sinks: int  # the attention estimate for this variant alone
    sink_heads: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "change": self.change, "n_tokens": self.n_tokens,
                "first_tokens": self.first_tokens, "sink_rate": self.sink_rate,
                "first_token_mass": self.first_token_mass, "sink_mass": self.sink_mass,
                "recommended_sinks": self.recommended_sinks, "sink_heads": self.sink_heads}


@dataclass
class InputSensitivity:
    """The variants of one text (:func:`input_sensitivity`), the ones that could not be made and why, and a
    one-line verdict."""

    prompt: str
    k_max: int
    threshold: float
    variants: list[InputVariant]
    unavailable: dict[str, str] = field(default_factory=dict)  # variant -> why it was not measured

    def variant(self, name: str) -> InputVariant | None:
        """The variant called ``name`` (None if it was not measured)."""
        return next((v for v in self.variants if v.name == name), None)

    @property
    def verdict(self) -> str:
        """Whether the serving stack's choice of BOS and template changes the sink, in one sentence."""
        base = self.variants[0]
        others = self.variants[1:]
        if not others:
            return "only the tokenizer's default could be measured: " + "; ".join(
                f"{k}: {v}" for k, v in self.unavailable.items())
        moved = [v for v in others if abs(v.sink_rate - base.sink_rate) >= SINK_RATE_CHANGE
                 or v.recommended_sinks != base.recommended_sinks]
        if not moved:
            return (f"the input's form barely matters: the sink rate stays within {SINK_RATE_CHANGE * 100:g} points of "
                    f"{base.sink_rate:.1%} and the recommended count at {base.recommended_sinks} in every variant "
                    "(the model sinks on its first token, whatever it is)")
        parts = [f"{v.name}: sink rate {v.sink_rate:.1%}, first-token mass {v.first_token_mass:.3f}, "
                 f"{v.recommended_sinks} sinks" for v in moved]
        return (f"the input's form matters: against {base.sink_rate:.1%} / {base.first_token_mass:.3f} / "
                f"{base.recommended_sinks} sinks as tokenized, " + "; ".join(parts)
                + ": the serving stack's choice moves the sink, so measure and stream the model as it is served")

    def to_dict(self) -> dict[str, Any]:
        """The ``inputs`` part of ``report.json``."""
        return {"prompt": self.prompt, "k_max": self.k_max, "threshold": self.threshold,
                "variants": [v.to_dict() for v in self.variants], "unavailable": self.unavailable,
                "verdict": self.verdict}


def input_variants(lm: LoadedModel, text: str, max_tokens: int | None = INPUT_TOKENS
                   ) -> tuple[list[tuple[str, str, list[int]]], dict[str, str]]:
    """The variants of ``text`` that ``lm``'s tokenizer allows, as ``(name, change, token ids)``, and the
    reasons for those it does not. The text is first cut to ``max_tokens`` of its own tokens."""
    tok = lm.tokenizer
    if max_tokens is not None:
        text = _cut(tok, text, max_tokens)
    default = _ids(tok(text))
    out = [(AS_TOKENIZED, "the tokenizer's default", default)]
    unavailable: dict[str, str] = {}
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        unavailable["BOS"] = "the tokenizer defines no BOS token"
    elif default and default[0] == bos:
        out.append((WITHOUT_BOS, f"the BOS token {tok.convert_ids_to_tokens(bos)!r} removed", default[1:]))
    else:
        out.append((WITH_BOS, f"the BOS token {tok.convert_ids_to_tokens(bos)!r} added", [bos, *default]))
    if getattr(tok, "chat_template", None):
        try:
            wrapped = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        except Exception as exc:  # a template that needs other roles or fields: say so, measure the rest
            unavailable[CHAT_TEMPLATE] = f"the chat template failed on a user message ({type(exc).__name__}: {exc})"
        else:
            # The template writes its own special tokens (BOS among them) as text: add none on top.
            out.append((CHAT_TEMPLATE, "the text as a user message of the tokenizer's chat template",
                        _ids(tok(wrapped, add_special_tokens=False))))
    else:
        unavailable[CHAT_TEMPLATE] = "the tokenizer has no chat template"
    return out, unavailable


def _cut(tok: Any, text: str, max_tokens: int) -> str:
    """The text of ``text``'s first ``max_tokens`` tokens: cut at the next token's character offset (fast
    tokenizers), else decoded (which can respell a token's spaces)."""
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        plain = _ids(tok(text, add_special_tokens=False))
        return tok.decode(plain[:max_tokens]) if len(plain) > max_tokens else text
    offsets = enc["offset_mapping"]
    return text[: offsets[max_tokens][0]] if len(offsets) > max_tokens else text


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return [int(i) for i in ids]


def input_sensitivity(model: LoadedModel | str, prompt: str | Prompt, *, k_max: int = DEFAULT_K,
                      max_tokens: int | None = INPUT_TOKENS, threshold: float = metrics.SINK_THRESHOLD,
                      share: float = DEFAULT_SHARE, mode: str = "auto", progress: bool = True) -> InputSensitivity:
    """Measure ``prompt`` as tokenized, with the BOS token toggled and in the chat template (where the tokenizer
    has them), each with :func:`sinkscope.analyze` (``k_max``, ``threshold``, ``share``, ``mode`` as there).

    Raises:
        PromptError: the text is empty, or too short for K + 1 tokens in some variant.
        ConfigError: bad settings (as :func:`sinkscope.analyze`).
    """
    from .analysis import _as_loaded

    lm = _as_loaded(model, None)
    item = as_prompts(prompt)[0]
    if item.ids is not None:
        raise ConfigError("input_sensitivity makes its own token ids: give it the prompt's text")
    if max_tokens is not None and max_tokens < k_max + 1:
        raise ConfigError(f"max_tokens must be at least K + 1 = {k_max + 1}, got {max_tokens}")
    made, unavailable = input_variants(lm, item.text, max_tokens)
    variants = []
    for name, change, ids in made:
        if len(ids) < k_max + 1:
            raise PromptError(f"prompt {item.name!r} has {len(ids)} tokens {name}; it needs at least K + 1 = "
                              f"{k_max + 1}")
        profile = analyze(lm, Prompt(f"{item.name} ({name})", item.text, tuple(ids)), k_max=k_max,
                          map_size=None, share=share, threshold=threshold, mode=mode,
                          progress=progress)
        variants.append(_summary(lm, name, change, ids, profile))
    return InputSensitivity(prompt=item.name, k_max=k_max, threshold=threshold, variants=variants,
                            unavailable=unavailable)


def _summary(lm: LoadedModel, name: str, change: str, ids: list[int], profile: SinkProfile) -> InputVariant:
    return InputVariant(name=name, change=change, n_tokens=len(ids), first_tokens=token_texts(lm.tokenizer, ids[:4]),
                        sink_rate=float(profile.sink_rate), first_token_mass=float(np.mean(profile.first_token_mass)),
                        sink_mass=float(np.mean(profile.sink_mass[..., -1])),
                        recommended_sinks=int(profile.recommendation.sinks), sink_heads=len(profile.sink_heads()))
