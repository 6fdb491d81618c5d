"""Head ablation: evidence for the dormant-head flag.

A head flagged dormant (:meth:`sinkscope.SinkProfile.dormant_heads`: a sink head that writes little into the
residual stream) should matter little to the model. :func:`ablate_heads` tests that on a text: it zeroes those
heads' outputs (their slice of the output projection's input, in a context manager that always undoes itself)
and compares the text's perplexity with the intact model's, and with a control: as many other heads, drawn at
random from the heads that are not sink heads, zeroed the same way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, PromptError
from .models import LoadedModel
from .scheme import head_projections

ABLATION_TOKENS = 512  # the text's first tokens scored; enough for a stable perplexity on a small model


@contextmanager
def zero_heads(model: nn.Module, heads: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Inside the block, the given ``(layer, head)`` pairs write nothing: their part of the output projection's
    input is zeroed (a pre-hook on the projection, removed on exit, also on error).

    Raises:
        ConfigError: a layer without softmax attention, a head out of range, or attention without an output
            projection that takes the heads side by side.
    """
    projections = head_projections(model)
    if isinstance(projections, str):
        raise ConfigError(f"can't ablate heads: {projections}")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if layer not in projections:
            raise ConfigError(f"layer {layer} has no softmax attention to ablate")
        if not 0 <= head < projections[layer].n_heads:
            raise ConfigError(f"layer {layer} has {projections[layer].n_heads} heads; there is no head {head}")
        by_layer.setdefault(layer, []).append(head)
    handles = []
    try:
        for layer, hs in by_layer.items():
            proj = projections[layer]

            def hook(_module: nn.Module, args: Any, hs: list[int] = hs, d_v: int = proj.head_dim) -> Any:
                x = args[0].clone()
                for h in hs:
                    x[..., h * d_v: (h + 1) * d_v] = 0
                return (x, *args[1:])

            handles.append(proj.module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class HeadAblation:
    """Perplexity of a text with the flagged heads zeroed, against the intact model and a random control."""

    prompt: str
    n_tokens: int
    heads: list[tuple[int, int]]
    control_heads: list[tuple[int, int]]
    base_ppl: float
    ablated_ppl: float
    control_ppl: float | None

    @property
    def change(self) -> float:
        """Relative perplexity change with the flagged heads zeroed (0.01 = 1 % worse)."""
        return self.ablated_ppl / self.base_ppl - 1.0

    @property
    def control_change(self) -> float | None:
        """The same with the control heads zeroed (None without a control)."""
        return None if self.control_ppl is None else self.control_ppl / self.base_ppl - 1.0

    @property
    def verdict(self) -> str:
        """What the ablation says about the flag, in one sentence."""
        n = len(self.heads)
        said = f"zeroing the {n} flagged head{'s' * (n != 1)} changes perplexity by {self.change:+.2%}"
        if self.control_change is None:
            return said + " (no control: every other head is a sink head)"
        said += (f", zeroing {len(self.control_heads)} random non-sink head{'s' * (len(self.control_heads) != 1)} "
                 f"by {self.control_change:+.2%}")
        if abs(self.change) < abs(self.control_change):
            return said + ": the flagged heads matter less than ordinary ones (the flag holds)"
        return said + ": the flagged heads matter as much as ordinary ones or more (the flag does not hold here)"

    def to_dict(self) -> dict[str, Any]:
        """The ``ablation`` part of ``report.json``."""
        return {"prompt": self.prompt, "n_tokens": self.n_tokens,
                "heads": [{"layer": layer, "head": h} for layer, h in self.heads],
                "control_heads": [{"layer": layer, "head": h} for layer, h in self.control_heads],
                "base_ppl": self.base_ppl, "ablated_ppl": self.ablated_ppl, "control_ppl": self.control_ppl,
                "change": self.change, "control_change": self.control_change, "verdict": self.verdict}


def perplexity(lm: LoadedModel, ids: torch.Tensor) -> float:
    """Perplexity of ``ids`` ``[1, T]`` under ``lm`` (each token predicted from those before it; float64 sums)."""
    device = next(lm.model.parameters()).device
    with torch.no_grad():
        logits = lm.model(input_ids=ids.to(device), use_cache=False).logits[0, :-1].double()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:].to(device)[:, None]).mean()
    return float(math.exp(float(nll)))


def ablate_heads(lm: LoadedModel, text: str, heads: Sequence[tuple[int, int]], *,
                 control_from: Sequence[tuple[int, int]] = (), max_tokens: int = ABLATION_TOKENS, seed: int = 0,
                 name: str = "prompt") -> HeadAblation:
    """Zero ``heads`` and score ``text`` (its first ``max_tokens`` tokens); the control zeroes as many heads
    drawn from ``control_from`` (seeded; fewer if it holds fewer; none if it is empty).

    Raises:
        ConfigError: no heads given, or heads that can't be ablated (:func:`zero_heads`).
        PromptError: a text shorter than 2 tokens.
    """
    heads = [(int(layer), int(h)) for layer, h in heads]
    if not heads:
        raise ConfigError("no heads to ablate")
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise PromptError(f"prompt {name!r} has {ids.shape[1]} token; ablation scores at least 2")
    pool = [(int(layer), int(h)) for layer, h in control_from if (layer, h) not in set(heads)]
    control = sorted(random.Random(seed).sample(pool, min(len(heads), len(pool))))
    base = perplexity(lm, ids)
    with zero_heads(lm.model, heads):
        ablated = perplexity(lm, ids)
    control_ppl = None
    if control:
        with zero_heads(lm.model, control):
            control_ppl = perplexity(lm, ids)
    return HeadAblation(prompt=name, n_tokens=int(ids.shape[1]), heads=heads, control_heads=control,
                        base_ppl=base, ablated_ppl=ablated, control_ppl=control_ppl)
