"""What to deploy: the recommendation as settings for the caches people serve with.

:func:`deploy_settings` turns a :class:`~sinkscope.SinkProfile`'s recommended sink count S (and the window W
it was validated at, where it was) into ready-made settings:

* **transformers**: sinkscope's own ``SinkCache(model, sinks=S, window=W)`` passed to ``generate`` (the cache
  whose perplexity ``eval-stream`` measures), or the reason the model can't be served by it;
* **kvpress** (NVIDIA): ``StreamingLLMPress(n_sink=S)`` wrapped in ``KeyRerotationPress``, with the
  ``compression_ratio`` that keeps S + W tokens of a context (kvpress compresses the context once, at prefill);
* **llama.cpp**: ``--keep`` (tokens of the prompt kept when the context shifts; llama.cpp keeps the BOS token
  on top of them, so a BOS-adding model's count is S - 1) with ``-c S + W`` and ``--context-shift``;
* a **per-head split** (DuoAttention's streaming and retrieval heads) as a layers x KV-heads table, from each
  head's mass on the sinks and its last keys (:func:`sinkscope.metrics.local_mass`).

Each comes with what differs from the cache that was measured, so that nobody deploys a number for a cache it
was not measured on without knowing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import LOCAL_WINDOW, STREAMING_SHARE
from .streaming.evaluate import DEFAULT_WINDOW

if TYPE_CHECKING:
    from .analysis import SinkProfile


@dataclass
class DeploySettings:
    """The recommendation as cache settings (:func:`deploy_settings`)."""

    model: str
    sinks: int  # S: leading tokens pinned (the BOS token among them where the tokenizer adds one)
    window: int  # W: recent tokens each query attends to
    validated: bool  # S was checked by streaming perplexity (at this W)
    window_from: str  # where W comes from, in words
    adds_bos: bool
    cache_refused: str | None = None  # why SinkCache can't serve the model (None: it can, or was not asked)
    notes: list[str] = field(default_factory=list)
    # Per-head split (DuoAttention's streaming / retrieval heads): layers x KV heads, 1 = keep full attention
    # (retrieval), 0 = a sink + window cache loses nothing that matters (streaming); None: not measured.
    kv_split: list[list[int]] | None = None
    layers: list[int] = field(default_factory=list)  # the layers of ``kv_split``'s rows
    streaming_heads: int | None = None  # query heads that qualify
    heads: int | None = None

    @property
    def llama_cpp_keep(self) -> int:
        """``--keep`` for llama.cpp: the prompt tokens kept besides the BOS token, which it keeps by itself."""
        return max(0, self.sinks - 1) if self.adds_bos else self.sinks

    def snippets(self) -> dict[str, str]:
        """Ready-made code and command lines, by target (``transformers``, ``kvpress``, ``llama.cpp``)."""
        s, w = self.sinks, self.window
        tokens = f"{s} sink token{'s' * (s != 1)}"
        # A hub id or a directory can go into the snippet as it is; a registry name or a .gguf can't.
        hub_like = "/" in self.model and not self.model.endswith(".gguf")
        ref = f'"{self.model}"' if hub_like else '"<the model\'s hub id or directory>"'
        gguf = self.model if self.model.endswith(".gguf") else "model.gguf"
        out: dict[str, str] = {}
        if self.cache_refused is None:
            out["transformers"] = (
                "from sinkscope import SinkCache\n\n"
                f"cache = SinkCache(model, sinks={s}, window={w})  # {tokens} + the last {w} tokens\n"
                "out = model.generate(input_ids, past_key_values=cache, max_new_tokens=4096)")
        out["kvpress"] = (
            "from transformers import pipeline\n"
            "from kvpress import KeyRerotationPress, StreamingLLMPress\n\n"
            f'pipe = pipeline("kv-press-text-generation", model={ref}, device_map="auto", dtype="auto")\n'
            "n_tokens = len(pipe.tokenizer(context).input_ids)\n"
            f"keep = {s + w}  # {tokens} + a window of {w}\n"
            "ratio = max(0.0, (n_tokens - keep - 0.5) / n_tokens)  # kvpress keeps int(n_tokens * (1 - ratio))\n"
            f"press = KeyRerotationPress(press=StreamingLLMPress(compression_ratio=ratio, n_sink={s}))\n"
            'answer = pipe(context, question=question, press=press)["answer"]')
        if self.kv_split is not None:
            out["per-head split"] = "\n".join(
                ["# layer: one column per KV head, 1 = full attention (retrieval), 0 = sinks + window (streaming)"]
                + [f"{layer}\t" + "\t".join(map(str, row)) for layer, row in zip(self.layers, self.kv_split,
                                                                                 strict=True)])
        out["llama.cpp"] = (f"llama-cli -m {gguf} -c {s + w} --keep {self.llama_cpp_keep} --context-shift "
                            "-n -1 -p \"...\"")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The ``deploy`` part of ``report.json``."""
        return {"sinks": self.sinks, "window": self.window, "validated": self.validated,
                "window_from": self.window_from, "adds_bos": self.adds_bos, "cache_refused": self.cache_refused,
                "llama_cpp_keep": self.llama_cpp_keep, "snippets": self.snippets(), "notes": self.notes,
                "per_head_split": None if self.kv_split is None else {
                    "layers": self.layers, "kv_heads": self.kv_split, "streaming_heads": self.streaming_heads,
                    "heads": self.heads, "streaming_share": STREAMING_SHARE, "window": LOCAL_WINDOW}}


def deploy_settings(profile: SinkProfile) -> DeploySettings:
    """Cache settings for ``profile``'s recommendation (``SinkProfile.cache_refused``, recorded by
    :func:`sinkscope.analyze` from the model's scheme, says whether ``SinkCache`` serves the model exactly)."""
    rec = profile.recommendation
    ev = rec.evidence
    validated = rec.attention_estimate() is not rec
    window, window_from = DEFAULT_WINDOW, (f"not validated: sinkscope's default window ({DEFAULT_WINDOW}); "
                                           "choose W for your memory budget and check it with sinkscope eval-stream")
    if validated and isinstance(ev.get("window"), int):
        window, window_from = ev["window"], "the window the recommendation was validated at"
    elif validated and isinstance(ev.get("grid"), list) and ev["grid"]:
        window = max(int(g["window"]) for g in ev["grid"])
        window_from = "the largest window of the validated grid (the count qualifies at every window)"
    spec = profile.model
    if not validated and spec.max_positions and rec.sinks + window > spec.max_positions:
        window = max(1, spec.max_positions - rec.sinks)  # the cache must fit the model's positions
        window_from = f"not validated: the model's {spec.max_positions} positions less the sinks"
    notes = []
    if spec.adds_bos and rec.sinks >= 1:
        notes.append("the tokenizer adds a BOS token: it is the first of the sink tokens (feed the model the same "
                     "way when serving; sinkscope inputs shows what dropping it does)")
    if rec.sinks == 0:
        notes.append("no pinned token: " + str(ev.get("note") or "the first tokens hold no sink worth a cache slot"))
    cheapest = ev.get("cheapest_cache")
    if isinstance(cheapest, dict):
        notes.append(f"the smallest cache within tolerance of dense attention in the evaluated grid: "
                     f"S = {cheapest.get('sinks')}, W = {cheapest.get('window')}")
    if spec.max_positions and rec.sinks + window > spec.max_positions:
        notes.append(f"S + W = {rec.sinks + window} is past the model's {spec.max_positions} positions: take a "
                     "smaller window")
    notes.append("kvpress compresses the context once, at prefill (the question and the answer attend to the kept "
                 "tokens); llama.cpp's context shift drops half of the unkept tokens when the context is full, so "
                 "its window moves between W / 2 and W. Neither is the token-by-token cache that was measured.")
    split = _kv_split(profile, rec.sinks)
    if split is not None:
        n_stream = int(split[1].sum())
        notes.append(f"per-head split: {n_stream} of {split[1].size} query heads keep at least {STREAMING_SHARE:.0%} "
                     f"of their attention on the first {rec.sinks} tokens and their last {LOCAL_WINDOW} keys "
                     "(streaming heads; any larger window keeps at least as much); a KV head is streaming when all "
                     "its query heads are")
    return DeploySettings(model=spec.source, sinks=rec.sinks, window=window, validated=validated,
                          window_from=window_from, adds_bos=spec.adds_bos, cache_refused=profile.cache_refused,
                          notes=notes, kv_split=None if split is None else split[0].tolist(),
                          layers=list(profile.layers), streaming_heads=None if split is None else int(split[1].sum()),
                          heads=None if split is None else int(split[1].size))


def _kv_split(profile: SinkProfile, sinks: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(layers x KV heads, 1 = retrieval; layers x query heads, True = streaming), or None without local mass."""
    local = profile.local_mass
    if local is None:
        return None
    kept = local + (profile.sink_mass[..., sinks - 1] if sinks >= 1 else 0.0)
    streaming = kept >= STREAMING_SHARE
    n_kv = profile.model.n_kv_heads or streaming.shape[1]
    if streaming.shape[1] % n_kv:
        n_kv = streaming.shape[1]
    groups = streaming.reshape(streaming.shape[0], n_kv, -1)
    return (~groups.all(-1)).astype(int), streaming
