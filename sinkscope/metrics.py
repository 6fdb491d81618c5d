"""Pure functions on attention probabilities: the numbers every sinkscope view shows.

All functions take one layer's causal attention ``probs`` of shape ``[heads, T, T]`` (query x key, rows
summing to 1) and ``k_max`` (K). Queries before K are left out because they can only see the first tokens
(see ``docs/metrics.md``). Each function returns float64 numpy arrays so aggregation stays exact.

Models with learned sinks (gpt-oss) add a per-head logit to every row's softmax that belongs to no key; their
rows sum to 1 - s, where s is the probability of that sink outcome: :func:`learned_sink_mass` measures it
and ``entropy(..., learned_sink=True)`` counts it as one more outcome.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import _native

SINK_THRESHOLD = 0.3  # first-token mass above which a head counts as a sink head (Gu et al., 2024)
LOCAL_WINDOW = 8  # queries this close to a key are left out of "received mass": that is locality, not a sink
_ENTROPY_CHUNK = 512  # queries per chunk, so entropy never allocates a second T x T tensor


def _check(probs: torch.Tensor, k_max: int) -> int:
    if probs.dim() != 3 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"expected [heads, T, T] attention, got shape {tuple(probs.shape)}")
    t = probs.shape[-1]
    if not 1 <= k_max < t:
        raise ValueError(f"k_max must be in [1, T) = [1, {t}), got {k_max}")
    return t


def sink_mass(probs: torch.Tensor, k_max: int) -> np.ndarray:
    """``[heads, k_max]``: mean over queries q >= K of the mass on keys ``0..k-1``, for k = 1..K."""
    _check(probs, k_max)
    first = probs[:, k_max:, :k_max].double()
    return first.cumsum(-1).mean(dim=1).cpu().numpy()


def local_mass(probs: torch.Tensor, k_max: int, local: int = LOCAL_WINDOW) -> np.ndarray:
    """``[heads]``: mean over queries q >= K of the mass on the last ``local`` keys from position K on (keys j
    with max(K, q - local + 1) <= j <= q): with :func:`sink_mass`, the attention that a cache of S <= K sinks and
    a window of ``local`` keeps at the least (keys S..K-1 inside the window left out: they are few)."""
    t = _check(probs, k_max)
    total = torch.zeros(probs.shape[0], dtype=torch.float64, device=probs.device)
    for d in range(min(local, t)):  # the d-th diagonal below the main one: entry i is A[i + d, i]
        total += torch.diagonal(probs, offset=-d, dim1=1, dim2=2)[:, k_max:].double().sum(-1)
    return (total / (t - k_max)).cpu().numpy()


# A head is a streaming head (DuoAttention's term) when the first S tokens and its last LOCAL_WINDOW keys hold at
# least this share of its attention: it loses nothing that matters to a sink + window cache.
STREAMING_SHARE = 0.9


def first_token_mass(probs: torch.Tensor, k_max: int) -> np.ndarray:
    """``[heads]``: mean over queries q >= K of the attention on key 0."""
    _check(probs, k_max)
    return probs[:, k_max:, 0].double().mean(dim=1).cpu().numpy()


def entropy(probs: torch.Tensor, k_max: int, *, learned_sink: bool = False) -> np.ndarray:
    """``[heads]``: mean over queries q >= K of the attention entropy, in nats.

    ``learned_sink``: the rows miss a learned sink's probability s = 1 - (row sum), which counts as one more
    outcome of the distribution (``-s log s`` added to each row).
    """
    t = _check(probs, k_max)
    total = torch.zeros(probs.shape[0], dtype=torch.float64, device=probs.device)
    for start in range(k_max, t, _ENTROPY_CHUNK):
        stop = min(start + _ENTROPY_CHUNK, t)
        rows = probs[:, start:stop, :stop]  # causal: keys after the chunk's last query are all zero
        total += torch.special.entr(rows).sum(-1).sum(-1).double()
        if learned_sink:
            total += torch.special.entr(_sink_share(rows)).sum(-1)
    return (total / (t - k_max)).cpu().numpy()


def learned_sink_mass(probs: torch.Tensor, k_max: int) -> np.ndarray:
    """``[heads]``: mean over queries q >= K of the learned sink's probability, 1 - (row sum).

    For models whose softmax has a per-head sink logit that belongs to no key (gpt-oss), whose attention
    rows therefore sum to less than 1; about 0 for every other model.
    """
    t = _check(probs, k_max)
    total = torch.zeros(probs.shape[0], dtype=torch.float64, device=probs.device)
    for start in range(k_max, t, _ENTROPY_CHUNK):
        stop = min(start + _ENTROPY_CHUNK, t)
        total += _sink_share(probs[:, start:stop, :stop]).sum(-1)
    return (total / (t - k_max)).cpu().numpy()


def _sink_share(rows: torch.Tensor) -> torch.Tensor:
    """``[heads, rows]`` float64: 1 - (row sum), clamped at 0 (rounding can take a full row past 1)."""
    return (1.0 - rows.sum(-1, dtype=torch.float64)).clamp_min_(0.0)


def sink_rate(first_token: np.ndarray, threshold: float = SINK_THRESHOLD) -> float:
    """Fraction of (layer, head) pairs whose first-token mass exceeds ``threshold``."""
    arr = np.asarray(first_token)
    return float((arr > threshold).mean()) if arr.size else 0.0


@dataclass
class ReceivedMass:
    """Attention received by each key position from distant queries, summed over heads.

    ``total[j]`` is the sum over heads and over queries q >= max(K, j + local) of A[q, j]; ``queries[j]`` is
    how many such queries there are per head. ``total / (heads * queries)`` is the mean received mass.
    """

    total: np.ndarray
    queries: np.ndarray
    heads: int


def distant_queries(t: int, k_max: int, local: int = LOCAL_WINDOW) -> np.ndarray:
    """``[T]``: how many queries q >= max(K, j + local) each key j has: the queries that received mass counts."""
    return np.maximum(0, t - np.maximum(k_max, np.arange(t) + local))


def received_mass(probs: torch.Tensor, k_max: int, local: int = LOCAL_WINDOW) -> ReceivedMass:
    """How much attention each key position draws from queries at least ``local`` tokens later.

    Locality makes every token attract its next few queries, so those are left out: what remains is the
    pull that marks a sink (BOS, the first token, newlines, punctuation).
    """
    t = _check(probs, k_max)
    h = probs.shape[0]
    # Sum in the input dtype (a float64 sum would first copy the whole T x T map), accumulate in float64.
    col = probs[:, k_max:, :].sum(dim=1).double().sum(dim=0)
    # Take back the near-diagonal band q in [j, j + local) that is also in q >= K: O(T * local), no T x T copy.
    for d in range(min(local, t)):
        diag = torch.diagonal(probs, offset=-d, dim1=-2, dim2=-1).double().sum(0)  # A[j + d, j]
        js = torch.arange(t - d, device=probs.device)
        col[: t - d] -= torch.where(js + d >= k_max, diag, torch.zeros_like(diag))
    queries = distant_queries(t, k_max, local)
    total = col.clamp_min(0).cpu().numpy()
    total[queries == 0] = 0.0
    return ReceivedMass(total=total, queries=queries, heads=h)


def uniform_share(t: int, k_max: int, local: int = LOCAL_WINDOW) -> np.ndarray:
    """``[T]``: what key j would receive from the same queries if every query attended uniformly.

    A query at q spreads 1 / (q + 1) on each visible key; this is the mean of that over the queries that
    :func:`received_mass` counts, so ``received / uniform`` reads as "times more than chance".
    """
    inv = 1.0 / np.arange(1, t + 1)
    tail = np.concatenate([np.cumsum(inv[::-1])[::-1], [0.0]])  # tail[q] = sum_{q' >= q} 1/(q'+1)
    js = np.arange(t)
    start = np.maximum(k_max, js + local)
    count = np.maximum(0, t - start)
    sums = np.where(count > 0, tail[np.minimum(start, t)], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, sums / np.maximum(count, 1), 0.0)


def chance_mass(t: int, k_max: int) -> float:
    """Mass one leading token gets from the queries q >= K when every query attends uniformly.

    A query at q gives 1 / (q + 1) to each visible key, so this is the mean of 1 / (q + 1) over q in [K, T).
    """
    if not 1 <= k_max < t:
        raise ValueError(f"k_max must be in [1, T) = [1, {t}), got {k_max}")
    return float(np.mean(1.0 / np.arange(k_max + 1, t + 1)))


# A position beyond the first is a secondary sink in a layer when distant queries give it, per head, at least
# this share of their attention on average and this many times what uniform attention would.
SECONDARY_MASS = 0.02
SECONDARY_RATIO = 10.0
SECONDARY_MIN_QUERIES = 16  # fewer distant queries than this: a mean over them is noise, not a sink


def secondary_sinks(received: np.ndarray, t: int, k_max: int, n_heads: int, local: int = LOCAL_WINDOW
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, which positions j >= 1 are sinks: ``(mask [L, T], mean [L, T])`` from each layer's received
    mass ``[L, T]`` (summed over its heads, :func:`received_mass`): ``mean`` is the attention per head and
    distant query, and a position qualifies where ``mean >= SECONDARY_MASS`` and ``mean >= SECONDARY_RATIO x``
    :func:`uniform_share`, with at least ``SECONDARY_MIN_QUERIES`` distant queries."""
    received = np.asarray(received, dtype=float)
    queries = distant_queries(t, k_max, local)
    mean = received / np.maximum(queries * n_heads, 1)[None, :]
    uniform = uniform_share(t, k_max, local)
    ok = (queries >= SECONDARY_MIN_QUERIES)[None, :] & (mean >= SECONDARY_MASS) & (mean >= SECONDARY_RATIO * uniform)
    ok[:, 0] = False  # the first token is the primary sink
    return ok, mean


def token_kind(text: str, *, is_bos: bool = False) -> str:
    """A coarse label for a token, used to say what sinks are: bos, newline, space, punct, word."""
    if is_bos:
        return "bos"
    if "\n" in text or "\u010a" in text:  # "\u010a" is GPT-2 byte-level BPE's newline
        return "newline"
    stripped = text.replace("\u0120", " ").replace("\u2581", " ")
    if not stripped.strip():
        return "space"
    if all(not c.isalnum() for c in stripped.strip()):
        return "punct"
    return "word"


# ------------------------------------------------------------------------------------- massive activations

MASSIVE_RATIO = 1000.0  # Sun et al. (2024): an activation at least 1000x the median magnitude ...
MASSIVE_MIN = 100.0  # ... and at least 100 in absolute value is "massive"
TOP_ACTIVATIONS = 4  # the largest activations kept per layer
MEDIAN_SAMPLE = 1 << 24  # entries the median magnitude is taken over (evenly strided beyond that)
ACTIVATION_BLOCK = 1 << 22  # entries per block of tokens summarised at once (16 MiB in float32)


def is_massive(largest: np.ndarray | float, median: np.ndarray | float) -> np.ndarray | bool:
    """Whether an activation of magnitude ``largest`` is massive beside the ``median`` magnitude (Sun et al.
    2024: at least :data:`MASSIVE_RATIO` x the median and at least :data:`MASSIVE_MIN`); elementwise on arrays."""
    largest, median = np.abs(np.asarray(largest, dtype=float)), np.asarray(median, dtype=float)
    return (largest >= MASSIVE_MIN) & (largest >= MASSIVE_RATIO * median)


@dataclass
class LayerActivations:
    """One decoder layer's output (the residual stream after the layer), summarised.

    ``norms`` ``[T]``: each token's L2 norm; ``median``: the median magnitude |h| over every token and dimension
    (the lower middle value, as ``torch.median``; over an evenly strided sample of :data:`MEDIAN_SAMPLE` entries
    past that many); ``top_values``,
    ``top_tokens``, ``top_dims`` ``[N]``: the N largest activations by magnitude (signed), where they are."""

    norms: np.ndarray
    median: float
    top_values: np.ndarray
    top_tokens: np.ndarray
    top_dims: np.ndarray

    @property
    def ratio(self) -> float:
        """The largest magnitude over the median magnitude."""
        return float(abs(self.top_values[0]) / self.median) if self.median > 0 else float("inf")

    @property
    def massive(self) -> bool:
        """Whether the layer has a massive activation (Sun et al. 2024: >= 1000x the median and >= 100)."""
        return bool(is_massive(self.top_values[0], self.median))


def layer_activations(hidden: torch.Tensor, top: int = TOP_ACTIVATIONS) -> LayerActivations:
    """Summarise one layer's hidden states ``[T, D]`` (any float dtype; computed in float32, in blocks of
    tokens so that no float32 copy of the whole layer is made)."""
    return activations_on_host(layer_activation_parts(hidden, top))


def activations_on_host(parts: tuple[torch.Tensor, ...]) -> LayerActivations:
    """:class:`LayerActivations` from :func:`layer_activation_parts` (the copy to the host, so a sync on a GPU)."""
    norms, median, top_values, top_tokens, top_dims = (x.cpu() for x in parts)
    return LayerActivations(norms=norms.numpy(), median=float(median), top_values=top_values.numpy(),
                            top_tokens=top_tokens.numpy(), top_dims=top_dims.numpy())


def layer_activation_parts(hidden: torch.Tensor, top: int = TOP_ACTIVATIONS) -> tuple[torch.Tensor, ...]:
    """What :func:`layer_activations` summarises, still on the hidden states' device (norms, median, top
    values, their tokens and dimensions): a forward hook can keep it without waiting for the GPU."""
    if hidden.dim() != 2 or hidden.shape[0] < 1:
        raise ValueError(f"expected hidden states [T, D], got shape {tuple(hidden.shape)}")
    h = hidden.detach()
    t, d = h.shape
    rows = max(1, ACTIVATION_BLOCK // d)
    norms = torch.empty(t, dtype=torch.float32, device=h.device)
    values, where = [], []
    for r0 in range(0, t, rows):
        block = h[r0: r0 + rows].float()
        norms[r0: r0 + block.shape[0]] = torch.linalg.vector_norm(block, dim=-1)
        flat = block.reshape(-1)
        _, i = flat.abs().topk(min(top, flat.numel()))
        values.append(flat[i])
        where.append(i + r0 * d)
    cand, at = torch.cat(values), torch.cat(where)
    best = cand.abs().topk(min(top, cand.numel())).indices
    flat_all = h.reshape(-1)
    step = max(1, math.ceil(flat_all.numel() / MEDIAN_SAMPLE))
    median = flat_all[::step].float().abs().median()
    return norms, median, cand[best], at[best] // d, at[best] % d


@dataclass
class HeadOutputs:
    """What each head of one layer writes into the residual stream: its attention output projected through its
    slice of the output projection (``o_h W_O[:, h]``).

    ``output_norm`` ``[H]``: the mean over queries q >= K of that vector's L2 norm (how much the head does);
    ``first_row_norm`` ``[H]``: its norm at position 0, which attends only to itself, so that it is the norm of
    the first token's projected value ``v_0 W_O[:, h]`` (for plain softmax attention: no output gate, no learned
    sink); mass parked on the first token adds at most ``first_token_mass x first_row_norm`` to the output."""

    output_norm: np.ndarray
    first_row_norm: np.ndarray


@dataclass
class KeyGeometry:
    """How each head's queries meet the first token's key (Gu et al. 2024: the sink key acts as a bias that
    queries align with by direction more than by norm). Rotated queries and keys, as the scores see them.

    ``sink_key_cos`` ``[H]``: the mean over queries q >= K of cos(q_q, k_0); ``other_key_cos`` ``[H]``: the mean
    over the same queries of their mean cosine with the keys 1..q; ``sink_key_norm`` ``[H]``: the norm of k_0;
    ``key_norm_median`` ``[H]``: the median norm of the keys 1..T-1; ``sink_margin`` ``[H]``: the median, over up to
    :data:`MARGIN_ROWS` evenly spaced queries q >= K that see k_0, of the sink's score minus the best score of
    the other keys the query sees (in logits, scaled and soft-capped as the softmax sees them; positive: the
    first token wins outright); ``sink_value_norm`` ``[H]``: the norm of v_0; ``value_norm_median`` ``[H]``: the
    median norm of the values 1..T-1."""

    sink_key_cos: np.ndarray
    other_key_cos: np.ndarray
    sink_key_norm: np.ndarray
    key_norm_median: np.ndarray
    sink_margin: np.ndarray
    sink_value_norm: np.ndarray
    value_norm_median: np.ndarray


# Queries sampled for the sink margin (evenly spaced): the best other score needs every key, so the margin costs
# O(rows x T x D) per head, linear in T, where the exact margin of every row would be a T x T pass.
MARGIN_ROWS = 128


def key_geometry(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_max: int, *,
                 scale: float | None = None, softcap: float | None = None, window: int | None = None
                 ) -> KeyGeometry:
    """:class:`KeyGeometry` of one layer from its rotated queries ``[H, T, D]``, keys ``[H_kv, T, D]`` and values
    ``[H_kv, T, D_v]`` (query head h reads key head h // (H / H_kv)): O(T x H x D), blocks of queries, float64
    sums. ``scale`` (default D ** -0.5), ``softcap`` and ``window`` (key j visible from q when q - j < window) are
    the layer's, for the sink margin."""
    h, t, d = query.shape
    h_kv = key.shape[0]
    if h % h_kv or t <= k_max or value.shape[:2] != key.shape[:2]:
        raise ValueError(f"expected [H, T, D] queries over [H_kv, T, D] keys and values with T > K, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    group = h // h_kv
    dev = key.device
    sink = key[:, 0].detach().double()
    sink_norm = torch.linalg.vector_norm(sink, dim=-1)  # [H_kv]
    sink_unit = (sink / sink_norm.clamp_min(1e-30)[:, None]).repeat_interleave(group, 0)  # [H, D]
    norms = torch.empty(h_kv, t, dtype=torch.float64, device=dev)
    carry = torch.zeros(h_kv, key.shape[-1], dtype=torch.float64, device=dev)  # sum of unit keys 1..q0-1
    sink_cos = torch.zeros(h, dtype=torch.float64, device=dev)
    other_cos = torch.zeros(h, dtype=torch.float64, device=dev)
    rows = max(1, ACTIVATION_BLOCK // max(1, h * query.shape[-1]))
    for q0 in range(0, t, rows):
        q1 = min(t, q0 + rows)
        kb = key[:, q0:q1].detach().double()
        norms[:, q0:q1] = nb = torch.linalg.vector_norm(kb, dim=-1)
        unit = kb / nb.clamp_min(1e-30)[..., None]
        if q0 == 0:
            unit[:, 0] = 0.0  # the sums run over keys 1..q: key 0 left out
        sums = carry[:, None] + torch.cumsum(unit, 1)  # [H_kv, rows, D]: unit keys 1..q for each q of the block
        carry = sums[:, -1]
        first = max(q0, k_max) - q0  # the block's queries q >= K
        if first >= q1 - q0:
            continue
        qb = query[:, q0 + first: q1].detach().double()
        q_unit = qb / torch.linalg.vector_norm(qb, dim=-1, keepdim=True).clamp_min(1e-30)
        counts = torch.arange(q0 + first, q1, device=dev, dtype=torch.float64)  # keys 1..q: q of them
        sink_cos += (q_unit * sink_unit[:, None]).sum((-1, -2))
        other_cos += (q_unit * (sums[:, first:] / counts[None, :, None]).repeat_interleave(group, 0)).sum((-1, -2))
    n = t - k_max
    v_norms = torch.linalg.vector_norm(value.detach().double(), dim=-1)  # [H_kv, T]

    def per_head(x: torch.Tensor) -> np.ndarray:  # [H_kv] -> [H]: query head h reads key head h // group
        return x.repeat_interleave(group, 0).cpu().numpy()

    return KeyGeometry(sink_key_cos=(sink_cos / n).cpu().numpy(), other_key_cos=(other_cos / n).cpu().numpy(),
                       sink_key_norm=per_head(sink_norm), key_norm_median=per_head(norms[:, 1:].median(-1).values),
                       sink_margin=sink_margin(query, key, k_max, scale=d ** -0.5 if scale is None else scale,
                                               softcap=softcap, window=window),
                       sink_value_norm=per_head(v_norms[:, 0]),
                       value_norm_median=per_head(v_norms[:, 1:].median(-1).values))


def sink_margin(query: torch.Tensor, key: torch.Tensor, k_max: int, *, scale: float, softcap: float | None = None,
                window: int | None = None, rows: int | None = None) -> np.ndarray:
    """``[H]`` the median over up to ``rows`` (default :data:`MARGIN_ROWS`) evenly spaced queries q >= K that see
    key 0 of ``cap(s(q, 0)) - cap(max_{1 <= j <= q, j visible} s(q, j))``, s the scaled scores (NaN where no
    such query exists). Float64 on the CPU, float32 on accelerators (scores there are the model's own precision
    at best)."""
    h, t, d = query.shape
    h_kv = key.shape[0]
    group = h // h_kv
    last = t - 1 if window is None else min(t - 1, window - 1)  # the last query whose window still holds key 0
    if last < max(k_max, 1):
        return np.full(h, np.nan)
    n = min(rows or MARGIN_ROWS, last - k_max + 1)
    idx = torch.linspace(max(k_max, 1), last, n).round().long().unique().to(key.device)
    dtype = torch.float64 if key.device.type == "cpu" else torch.float32
    qs = query[:, idx].detach().to(dtype).reshape(h_kv, group * len(idx), d)  # query head h = kv head h // group
    q_pos = idx.repeat(group)  # [group * rows]: each row's position
    keys = key.detach().to(dtype)
    best = torch.full(qs.shape[:2], float("-inf"), dtype=dtype, device=key.device)
    block = max(1, (1 << 24) // max(1, qs.shape[0] * qs.shape[1]))
    hi = int(idx.max()) + 1
    for j0 in range(1, hi, block):
        j = torch.arange(j0, min(hi, j0 + block), device=key.device)
        s = qs @ keys[:, j0: j0 + len(j)].transpose(-1, -2)  # [H_kv, group * rows, block]
        seen = j[None, :] <= q_pos[:, None]
        if window is not None:
            seen &= q_pos[:, None] - j[None, :] < window
        best = torch.maximum(best, s.masked_fill(~seen, float("-inf")).amax(-1))
    s0 = (qs * keys[:, :1]).sum(-1)

    def cap(x: torch.Tensor) -> torch.Tensor:
        x = x * scale
        return x if softcap is None else softcap * torch.tanh(x / softcap)

    margin = (cap(s0) - cap(best)).reshape(h, len(idx))  # row order: kv head, then group member, then position
    return margin.double().median(-1).values.cpu().numpy()


# A sink head is dormant when what it writes is small next to its layer's other heads: its mean projected
# output below this fraction of the layer's median head (Guo et al. 2024's active-dormant heads; output-norm
# scores find inactive heads better than attention alone). `report --ablate` tests the flag.
DORMANT_RATIO = 0.5


def output_ratio(output_norm: np.ndarray) -> np.ndarray:
    """``[L, H]`` each head's mean projected output over its layer's median head (1 = a typical head)."""
    med = np.median(output_norm, axis=-1, keepdims=True)
    return np.divide(output_norm, med, out=np.zeros_like(output_norm, dtype=float), where=med > 0)


def is_dormant(first_token_mass: np.ndarray, ratio: np.ndarray, threshold: float = SINK_THRESHOLD) -> np.ndarray:
    """Dormant heads: sink heads (first-token mass above ``threshold``) whose output ratio
    (:func:`output_ratio`) is below :data:`DORMANT_RATIO`."""
    return (np.asarray(first_token_mass) > threshold) & (np.asarray(ratio) < DORMANT_RATIO)


def head_outputs(x: torch.Tensor, weight: torch.Tensor, n_heads: int, k_max: int) -> HeadOutputs:
    """:class:`HeadOutputs` of one layer from the input of its output projection ``x`` ``[T, H * D_v]`` (heads
    side by side, as every attention module lays them out) and the projection's weight ``[hidden, H * D_v]``.

    ``||o W_h^T||^2 = o (W_h^T W_h) o^T``: one ``[D_v, D_v]`` Gram matrix per head, so the cost is T x H x D_v^2,
    a fraction D_v / hidden of the projection itself; float64 for the Gram matrices and the norms."""
    t, width = x.shape
    if width % n_heads or weight.shape[-1] != width:
        raise ValueError(f"expected [T, heads x D_v] with a [hidden, {width}] weight, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)} for {n_heads} heads")
    d_v = width // n_heads
    w = weight.detach().double().reshape(weight.shape[0], n_heads, d_v)
    gram = torch.einsum("ohd,ohe->hde", w, w)  # [H, D_v, D_v]
    norms = torch.empty(t, n_heads, dtype=torch.float64, device=x.device)
    rows = max(1, ACTIVATION_BLOCK // width)
    for r0 in range(0, t, rows):
        o = x[r0: r0 + rows].detach().double().reshape(-1, n_heads, d_v)
        sq = torch.einsum("thd,hde,the->th", o, gram, o)
        norms[r0: r0 + o.shape[0]] = sq.clamp_min(0.0).sqrt()
    counted = norms[k_max:] if t > k_max else norms
    return HeadOutputs(output_norm=counted.mean(0).cpu().numpy(), first_row_norm=norms[0].cpu().numpy())


# ------------------------------------------------------------------------------ statistics over query chunks


@dataclass
class LayerStats:
    """One layer's metrics, as the whole-map functions above would give them, gathered chunk by chunk.

    ``first_token_mass`` ``[H]``, ``sink_mass`` ``[H, K]`` and ``entropy`` ``[H]`` are means over queries
    q >= K; ``received`` is :func:`received_mass` of the layer; ``pooled`` (if bins were given) is
    :func:`sinkscope.capture.pool_map` of every head's map, ``[H, bins, bins]``. ``learned_sink_mass``
    ``[H]`` is :func:`learned_sink_mass` for a layer whose softmax had learned sink logits (gpt-oss), whose
    ``entropy`` is then ``entropy(..., learned_sink=True)``; None for a layer without them. ``row_pass``: which
    row pass computed the layer (the GPU's Triton kernel, the CPU's C pass or torch operations, and why).
    """

    first_token_mass: np.ndarray
    sink_mass: np.ndarray
    entropy: np.ndarray
    received: ReceivedMass
    pooled: np.ndarray | None
    bins: list[tuple[int, int]] | None
    learned_sink_mass: np.ndarray | None = None
    row_pass: str | None = None  # what computed it (statistics mode says; see sinkscope.capture)
    local_mass: np.ndarray | None = None  # [H]: :func:`local_mass` (None where a row pass does not keep it)


class ChunkedStats:
    """Accumulates one layer's metrics from successive blocks of query rows, never holding the T x T map.

    Feed :meth:`add` with rows ``[q0, q0 + C)`` of the causal attention ``[heads, C, keys]`` (keys may stop at
    ``q0 + C``: later keys are masked anyway) in any order, each row exactly once; :meth:`finish` returns the
    same numbers that the whole-map functions give. Each block costs a few small copies and two matrix
    products (rows -> query bins, then keys -> key bins), so the state stays O(heads x T x (K + local) +
    heads x bins^2): no per-key array of every bin, and nothing left to reduce over T in :meth:`finish`.

    Learned sinks (gpt-oss): :meth:`add_scores` with ``sink_logits`` puts each head's sink logit into every
    row's softmax; the probabilities kept and returned are the keys' (rows sum to 1 - sink probability, as
    eager attention returns them), each row's sink probability is kept like its entropy, and the entropy is
    that of the whole distribution, sink included. Give them for every block of the layer or for none.
    """

    def __init__(self, n_heads: int, t: int, k_max: int, *, local: int = LOCAL_WINDOW,
                 bins: list[tuple[int, int]] | None = None, device: torch.device | str = "cpu",
                 scratch: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
                 native: bool = True) -> None:
        if not 1 <= k_max < t:
            raise ValueError(f"k_max must be in [1, T) = [1, {t}), got {k_max}")
        self.h, self.t, self.k, self.local, self.bins = n_heads, t, k_max, local, bins
        n_bins = len(bins) if bins else 0

        def zeros(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            # ``scratch`` lends memory that the previous layer used: zeroing it is cheaper than mapping anew.
            if scratch is None:
                return torch.zeros(shape, dtype=dtype, device=device)
            return scratch(name, shape, dtype).zero_()

        self._zeros = zeros
        # Per query row, kept until finish: the first K probabilities, the entropy, the band A[q, q - d], and
        # with learned sinks the sink probability (allocated by the first block that has sink logits).
        self._first = zeros("first", (n_heads, t, k_max))
        self._ent = zeros("entropy", (n_heads, t))
        self._sink: torch.Tensor | None = None
        self._band = zeros("band", (n_heads, t, local))
        self._seen = torch.zeros(t, dtype=torch.bool)
        self._bin_of = torch.full((t,), -1, dtype=torch.long)
        for i, (a, b) in enumerate(bins or []):
            self._bin_of[a:b] = i
        self._device = torch.device(device)
        self._products: tuple[torch.Tensor, torch.Tensor] | None = None  # built by the torch path's first block
        # The native row pass adds from several threads, each into a slot of its own; finish sums the slots.
        self._native = native and _native.usable(self._device)
        self._threads = torch.get_num_threads() if self._native else 1
        self._received = zeros("received", (self._threads, t), torch.float64)  # summed over heads
        self._pooled = zeros("pooled", (self._threads, n_heads, n_bins, n_bins), torch.float64)
        self._band_back = torch.arange(local, device=device)
        self._edges = torch.tensor([a for a, _ in bins] + [t], dtype=torch.long) if bins else None
        self._causal: torch.Tensor | None = None

    def add_scores(self, scores: torch.Tensor, q0: int, probs: torch.Tensor, *, causal: bool,
                   sink_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Take query rows ``q0 .. q0 + C - 1`` as scaled scores ``[heads, C, keys]`` (float32): form their
        probabilities into ``probs`` (same shape) and keep the rows' statistics; returns ``probs``.

        ``causal``: each row sees the keys up to its own position and ``scores`` needs no mask; otherwise the
        caller has filled masked scores with a large negative finite value. ``scores`` may be overwritten.
        ``sink_logits`` ``[heads]`` (float32): learned sink logits that join every row's softmax (gpt-oss's
        ``s_aux``); ``probs`` then holds the keys' probabilities only, which sum to 1 - sink probability.
        """
        sink = self._sink_rows(sink_logits, scores.device)
        self._check_rows(scores.shape, q0)
        if self._native and scores.is_contiguous() and probs.is_contiguous() and scores.dtype == torch.float32:
            _native.rows(scores, probs, q0, causal, self.t, self.k, self.local, self._first, self._band,
                         self._ent, self._received, self._pooled if self.bins else None, self._edges,
                         self._bin_of if self.bins else None, self._threads, sink=sink,
                         sink_prob=self._sink if sink is not None else None)
            return probs
        c = scores.shape[1]
        if causal:  # keys after the row's own position: the strict upper triangle of the diagonal square
            if self._causal is None or self._causal.shape[0] < c:
                self._causal = torch.ones(c, c, dtype=torch.bool, device=scores.device).triu_(1)
            scores[:, :, q0: q0 + c].masked_fill_(self._causal[:c, :c], torch.finfo(torch.float32).min)
        if sink is not None:
            # log Z over the keys and the sink outcome; p = exp(s - log Z), the sink's exp(sink - log Z), and
            # H = log Z - sum(p * s) - p_sink * sink.
            log_z = torch.logaddexp(torch.logsumexp(scores, -1), sink[:, None])  # [heads, C]
            torch.sub(scores, log_z[..., None], out=probs).exp_()
            sink_p = (sink[:, None] - log_z).exp_()
            self._sink[:, q0: q0 + c] = sink_p
            entropy = log_z.sub_(scores.mul_(probs).sum(-1)).sub_(sink_p.mul_(sink[:, None]))
            self._add(probs, q0, entropy)
            return probs
        torch.ops.aten._softmax.out(scores, -1, False, out=probs)
        # Entropy without a logarithm per entry: H = log Z - sum(p * s), where the row maximum m has
        # p = exp(m) / Z, so log Z = m - log(max p). (float32 error ~1e-6 nats for |s| ~ 30.)
        top = scores.amax(-1)
        entropy = top.sub_(probs.amax(-1).log_()).sub_(scores.mul_(probs).sum(-1))
        self._add(probs, q0, entropy)
        return probs

    def _sink_rows(self, sink_logits: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """The block's sink logits as a contiguous float32 ``[heads]``; learned sinks are all blocks' or none's."""
        if sink_logits is None:
            if self._sink is not None:
                raise ValueError("this layer's earlier blocks had learned sink logits: give them for every block")
            return None
        sink = sink_logits.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()
        if sink.numel() != self.h:
            raise ValueError(f"sink_logits must have one logit per head ({self.h}), got {sink.numel()}")
        if self._sink is None:
            if bool(self._seen.any()):
                raise ValueError("earlier blocks of this layer had no learned sink logits: give them for every "
                                 "block or for none")
            self._sink = self._zeros("sink", (self.h, self.t))
        return sink

    def add(self, probs: torch.Tensor, q0: int, entropy: torch.Tensor | None = None) -> None:
        """Take query rows ``q0 .. q0 + C - 1``: ``probs`` ``[heads, C, keys]`` (float32), optional per-row
        entropy ``[heads, C]`` in nats (computed from ``probs`` when not given)."""
        if self._sink is not None:
            raise ValueError("this layer's earlier blocks had learned sink logits: add them with add_scores")
        self._check_rows(probs.shape, q0)
        self._add(probs, q0, entropy)

    def _check_rows(self, shape: torch.Size, q0: int) -> None:
        h, c, n_keys = shape
        q1 = q0 + c
        if h != self.h or q0 < 0 or q1 > self.t or n_keys < q1:
            raise ValueError(f"rows [{q0}, {q1}) with {n_keys} keys don't fit a [{self.h}, {self.t}, "
                             f"{self.t}] map")
        if bool(self._seen[q0:q1].any()):
            raise ValueError(f"rows [{q0}, {q1}) overlap rows added before")
        self._seen[q0:q1] = True

    def _product_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch path's two products per block. Row weights ``[bins + 1, T]``: a row per query bin
        (pooled map) and the rows q >= K (received mass); key-bin membership ``[T, bins]``, which sums each
        query bin's row over the keys of a bin."""
        if self._products is None:
            n_bins = len(self.bins) if self.bins else 0
            weights = torch.zeros(n_bins + 1, self.t, dtype=torch.float32, device=self._device)
            weights[n_bins, self.k:] = 1.0
            key_bins = torch.zeros(self.t, n_bins, dtype=torch.float32, device=self._device)
            for i, (a, b) in enumerate(self.bins or []):
                weights[i, a:b] = 1.0
                key_bins[a:b, i] = 1.0
            self._products = weights, key_bins
        return self._products

    def _add(self, probs: torch.Tensor, q0: int, entropy: torch.Tensor | None) -> None:
        h, c, n_keys = probs.shape
        weights, key_bins = self._product_weights()
        q1 = q0 + c
        self._first[:, q0:q1, : min(self.k, n_keys)] = probs[:, :, : self.k]
        self._ent[:, q0:q1] = torch.special.entr(probs).sum(-1) if entropy is None else entropy
        # Band entries (q, q - d); for q - d < 0 the index is clamped and the value dropped in finish.
        cols = (torch.arange(q0, q1, device=probs.device)[:, None] - self._band_back[None, :]).clamp_min(0)
        self._band[:, q0:q1] = probs.gather(-1, cols.expand(h, -1, -1))
        if not self.bins:
            self._received[0, :n_keys] += (weights[-1:, q0:q1] @ probs).sum((0, 1))
            return
        first, last = int(self._bin_of[q0]), int(self._bin_of[q1 - 1])
        rows = torch.cat([weights[first: last + 1, q0:q1], weights[-1:, q0:q1]])  # sums in float64
        sums = rows @ probs  # [heads, query bins touched + 1, keys]
        self._received[0, :n_keys] += sums[:, -1].sum(0)
        touched = last - first + 1
        key_binned = sums[:, :-1].reshape(h * touched, n_keys) @ key_bins[:n_keys]
        self._pooled[0, :, first: last + 1] += key_binned.view(h, touched, -1)

    def finish(self) -> LayerStats:
        """The layer's metrics; every query row must have been added exactly once."""
        if not bool(self._seen.all()):
            missing = int((~self._seen).sum())
            raise ValueError(f"{missing} of the {self.t} query rows were never added")
        k, t = self.k, self.t
        n = t - k
        first = self._first[:, k:].double()
        ftm = first[:, :, 0].sum(1) / n
        sm = first.cumsum(-1).sum(1) / n
        ent = self._ent[:, k:].double().sum(1) / n
        learned = None if self._sink is None else (self._sink[:, k:].double().sum(1) / n).cpu().numpy()
        # Received mass: column sums over rows q >= K, minus the band q in [j, j + local) with q >= K.
        col = self._received.sum(0)
        qs = torch.arange(t, device=col.device)[:, None]
        keys = qs - self._band_back[None, :]
        ok = (keys >= 0) & (qs >= k)
        band_h = self._band.double()  # [H, T, local]: A[q, q - d]
        band = band_h.sum(0)  # [T, local]
        col.index_add_(0, keys[ok], -band[ok])
        local_mass = (band_h[:, ok & (keys >= k)].sum(-1) / n).cpu().numpy()  # keys j >= K of each window
        queries = distant_queries(t, k, self.local)
        total = col.clamp_min(0).cpu().numpy()
        total[queries == 0] = 0.0
        pooled = None
        if self.bins:  # queries averaged within their bin
            width = torch.tensor([b - a for a, b in self.bins], dtype=torch.float64, device=col.device)
            pooled = (self._pooled.sum(0) / width[None, :, None]).cpu().numpy()
        return LayerStats(first_token_mass=ftm.cpu().numpy(), sink_mass=sm.cpu().numpy(),
                          entropy=ent.cpu().numpy(), received=ReceivedMass(total=total, queries=queries, heads=self.h),
                          pooled=pooled, bins=self.bins, learned_sink_mass=learned, local_mass=local_mass)
