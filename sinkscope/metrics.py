"""Pure functions on attention probabilities: the numbers every sinkscope view shows.

All functions take one layer's causal attention ``probs`` of shape ``[heads, T, T]`` (query x key, rows
summing to 1) and ``k_max`` (K). Queries before K are left out because they can only see the first tokens
(see ``docs/metrics.md``). Each function returns float64 numpy arrays so aggregation stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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


def first_token_mass(probs: torch.Tensor, k_max: int) -> np.ndarray:
    """``[heads]``: mean over queries q >= K of the attention on key 0."""
    _check(probs, k_max)
    return probs[:, k_max:, 0].double().mean(dim=1).cpu().numpy()


def entropy(probs: torch.Tensor, k_max: int) -> np.ndarray:
    """``[heads]``: mean over queries q >= K of the attention entropy, in nats."""
    t = _check(probs, k_max)
    total = torch.zeros(probs.shape[0], dtype=torch.float64, device=probs.device)
    for start in range(k_max, t, _ENTROPY_CHUNK):
        stop = min(start + _ENTROPY_CHUNK, t)
        rows = probs[:, start:stop, :stop]  # causal: keys after the chunk's last query are all zero
        total += torch.special.entr(rows).sum(-1).sum(-1).double()
    return (total / (t - k_max)).cpu().numpy()


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
    js = np.arange(t)
    queries = np.maximum(0, t - np.maximum(k_max, js + local))
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
