"""sinkscope.metrics on hand-made attention tensors with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sinkscope import metrics


def uniform_causal(t: int, heads: int = 2) -> torch.Tensor:
    a = torch.tril(torch.ones(t, t, dtype=torch.float64))
    return (a / a.sum(-1, keepdim=True)).expand(heads, t, t).clone().float()


def all_on_first(t: int, heads: int = 3) -> torch.Tensor:
    a = torch.zeros(heads, t, t)
    a[:, :, 0] = 1.0
    return a


def random_causal(t: int, heads: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(heads, t, t, generator=g) * 2
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    return torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)


# ------------------------------------------------------------------------------ first token / sink mass


def test_all_mass_on_first_token():
    a = all_on_first(20)
    np.testing.assert_array_equal(metrics.first_token_mass(a, 8), np.ones(3))
    np.testing.assert_array_equal(metrics.sink_mass(a, 8), np.ones((3, 8)))
    np.testing.assert_array_equal(metrics.entropy(a, 8), np.zeros(3))


def test_uniform_causal_first_token_and_sink_mass():
    t, k = 30, 8
    a = uniform_causal(t)
    qs = np.arange(k, t)
    np.testing.assert_allclose(metrics.first_token_mass(a, k), [np.mean(1 / (qs + 1))] * 2, rtol=1e-6)
    expected = [np.mean(kk / (qs + 1)) for kk in range(1, k + 1)]  # k keys of q + 1 visible ones
    np.testing.assert_allclose(metrics.sink_mass(a, k), [expected] * 2, rtol=1e-6)


def test_uniform_causal_entropy_is_mean_log_of_visible_keys():
    t, k = 40, 5
    expected = np.mean([math.log(q + 1) for q in range(k, t)])
    np.testing.assert_allclose(metrics.entropy(uniform_causal(t), k), [expected] * 2, rtol=1e-6)


def test_queries_before_k_are_left_out():
    t, k = 12, 4
    a = uniform_causal(t, heads=1)
    a[0, :k] = 0.0  # garbage in the excluded rows must not matter
    a[0, 1:k, 0] = 1.0
    b = uniform_causal(t, heads=1)
    np.testing.assert_array_equal(metrics.first_token_mass(a, k), metrics.first_token_mass(b, k))
    np.testing.assert_array_equal(metrics.sink_mass(a, k), metrics.sink_mass(b, k))
    np.testing.assert_allclose(metrics.entropy(a, k), metrics.entropy(b, k), rtol=1e-12)


def test_sink_mass_two_token_sink_per_head():
    t, k = 16, 4
    a = torch.zeros(2, t, t)
    a[0, :, 0] = 1.0  # head 0: a one-token sink
    a[1, :, 0] = 0.5  # head 1: split over tokens 0 and 1 (query 0 can see only token 0)
    a[1, 1:, 1] = 0.5
    a[1, 0, 0] = 1.0
    np.testing.assert_allclose(metrics.sink_mass(a, k), [[1, 1, 1, 1], [0.5, 1, 1, 1]])
    np.testing.assert_allclose(metrics.first_token_mass(a, k), [1.0, 0.5])
    np.testing.assert_allclose(metrics.entropy(a, k), [0.0, math.log(2)], rtol=1e-6)


def test_random_attention_against_numpy():
    t, k = 50, 8
    a = random_causal(t)
    n = a.double().numpy()
    np.testing.assert_allclose(metrics.first_token_mass(a, k), n[:, k:, 0].mean(1), atol=1e-7)
    sm = np.stack([n[:, k:, :kk].sum(-1).mean(1) for kk in range(1, k + 1)], -1)
    np.testing.assert_allclose(metrics.sink_mass(a, k), sm, atol=1e-7)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = np.where(n > 0, -n * np.log(n), 0.0)[:, k:].sum(-1).mean(-1)
    np.testing.assert_allclose(metrics.entropy(a, k), ent, atol=1e-6)


def test_entropy_chunks_cover_all_queries(monkeypatch):
    a = random_causal(40, heads=2, seed=3)
    whole = metrics.entropy(a, 3)
    monkeypatch.setattr(metrics, "_ENTROPY_CHUNK", 7)  # 37 queries in chunks of 7: a ragged last chunk
    # Each chunk is summed in the input's float32 before float64 accumulation: equal up to float32 rounding.
    np.testing.assert_allclose(metrics.entropy(a, 3), whole, rtol=1e-6)


# ------------------------------------------------------------------------------------------ learned sinks


def with_learned_sink(t: int) -> tuple[torch.Tensor, np.ndarray]:
    """``[3, T, T]`` causal rows that miss a learned sink's share s[h, q] (rows sum to 1 - s): head 0 uniform over
    its keys with s = 0.25, head 1 all on the first token with s growing with q, head 2 no sink at all."""
    share = np.zeros((3, t))
    share[0] = 0.25
    share[1] = np.arange(t) / (2.0 * t)
    a = uniform_causal(t, heads=3).double()
    a[1] = 0.0
    a[1, :, 0] = 1.0
    a *= torch.from_numpy(1.0 - share)[:, :, None]
    return a, share


def test_learned_sink_mass_and_entropy_on_known_rows():
    t, k = 24, 4
    a, share = with_learned_sink(t)
    qs = np.arange(k, t)
    np.testing.assert_allclose(metrics.learned_sink_mass(a, k), share[:, k:].mean(1), atol=1e-12)
    s1 = share[1, k:]
    expected = [
        np.mean(-0.75 * np.log(0.75 / (qs + 1)) - 0.25 * math.log(0.25)),  # keys and the sink outcome
        np.mean(-(1 - s1) * np.log(1 - s1) - s1 * np.log(s1)),  # one key and the sink: a two-way split
        np.mean(np.log(qs + 1)),  # no sink: the plain entropy
    ]
    np.testing.assert_allclose(metrics.entropy(a, k, learned_sink=True), expected, atol=1e-12)
    plain = [np.mean(-0.75 * np.log(0.75 / (qs + 1))), np.mean(-(1 - s1) * np.log(1 - s1)), np.mean(np.log(qs + 1))]
    np.testing.assert_allclose(metrics.entropy(a, k), plain, atol=1e-12)  # without the flag: the keys' terms only
    # float32 input: the row sums are taken in float64, so the share is not lost to float32 sums.
    np.testing.assert_allclose(metrics.learned_sink_mass(a.float(), k), share[:, k:].mean(1), atol=1e-6)


def test_learned_sink_mass_is_clamped_and_chunked(monkeypatch):
    a = uniform_causal(30, heads=2).double()
    a[0] *= 1 + 1e-6  # rounding past 1: no negative sink mass, no NaN from -s log s
    lsm = metrics.learned_sink_mass(a, 5)
    assert lsm[0] == 0.0 and abs(lsm[1]) < 1e-8  # head 1: float32 rows, sums within rounding of 1
    np.testing.assert_allclose(metrics.entropy(a, 5, learned_sink=True), metrics.entropy(a, 5), atol=1e-12)
    b, _ = with_learned_sink(40)
    whole = metrics.learned_sink_mass(b, 3), metrics.entropy(b, 3, learned_sink=True)
    monkeypatch.setattr(metrics, "_ENTROPY_CHUNK", 7)
    np.testing.assert_allclose(metrics.learned_sink_mass(b, 3), whole[0], atol=1e-12)
    np.testing.assert_allclose(metrics.entropy(b, 3, learned_sink=True), whole[1], atol=1e-12)
    with pytest.raises(ValueError, match="k_max"):
        metrics.learned_sink_mass(b, 40)


def test_results_are_float64_numpy():
    a = random_causal(20)
    for out in (metrics.first_token_mass(a, 4), metrics.sink_mass(a, 4), metrics.entropy(a, 4)):
        assert isinstance(out, np.ndarray)
        assert out.dtype == np.float64
    assert metrics.sink_mass(a, 4).shape == (4, 4)
    assert metrics.first_token_mass(a, 4).shape == (4,)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("shape", [(10, 10), (1, 2, 10, 10), (2, 10, 9), (2, 9, 10)])
def test_bad_shapes(shape):
    a = torch.zeros(shape)
    for fn in (metrics.first_token_mass, metrics.sink_mass, metrics.entropy, metrics.received_mass):
        with pytest.raises(ValueError, match=r"expected \[heads, T, T\]"):
            fn(a, 2)


@pytest.mark.parametrize("k_max", [0, -1, 10, 11])
def test_bad_k_max(k_max):
    a = uniform_causal(10)
    for fn in (metrics.first_token_mass, metrics.sink_mass, metrics.entropy, metrics.received_mass):
        with pytest.raises(ValueError, match=r"k_max must be in \[1, T\) = \[1, 10\)"):
            fn(a, k_max)


def test_k_max_at_the_edge():
    a = uniform_causal(10)
    np.testing.assert_allclose(metrics.first_token_mass(a, 9), [0.1, 0.1], rtol=1e-6)  # one query, q = 9
    np.testing.assert_allclose(metrics.sink_mass(a, 1), metrics.first_token_mass(a, 1)[:, None])


# ------------------------------------------------------------------------------------------ sink rate


def test_sink_rate():
    assert metrics.sink_rate(np.array([[0.1, 0.31], [0.5, 0.3]])) == 0.5  # 0.3 itself is not above 0.3
    assert metrics.sink_rate(np.array([[0.9, 0.9]])) == 1.0
    assert metrics.sink_rate(np.zeros((3, 4))) == 0.0
    assert metrics.sink_rate(np.array([0.1, 0.2, 0.6]), threshold=0.15) == pytest.approx(2 / 3)
    assert metrics.sink_rate(np.array([])) == 0.0
    assert isinstance(metrics.sink_rate(np.array([0.5])), float)
    assert metrics.SINK_THRESHOLD == 0.3


# -------------------------------------------------------------------------------------- received mass


def _received_numpy(n: np.ndarray, k: int, local: int = 8) -> tuple[np.ndarray, np.ndarray]:
    t = n.shape[-1]
    total, count = np.zeros(t), np.zeros(t, dtype=int)
    for j in range(t):
        qs = np.arange(max(k, j + local), t)
        total[j], count[j] = n[:, qs, j].sum(), len(qs)
    return total, count


@pytest.mark.parametrize(("t", "k", "local"), [(40, 8, 8), (30, 3, 8), (12, 8, 8), (20, 5, 2), (9, 8, 8)])
def test_received_mass_against_numpy(t, k, local):
    a = random_causal(t, heads=3, seed=t)
    rm = metrics.received_mass(a, k, local=local)
    total, count = _received_numpy(a.double().numpy(), k, local)
    assert rm.heads == 3
    np.testing.assert_array_equal(rm.queries, count)
    np.testing.assert_allclose(rm.total, total, atol=1e-6)


def test_received_mass_all_on_first_token():
    t, k = 30, 8
    rm = metrics.received_mass(all_on_first(t, heads=2), k)
    assert rm.total[0] == pytest.approx(2 * (t - k))  # 2 heads x every counted query
    np.testing.assert_allclose(rm.total[1:], 0.0, atol=1e-6)
    assert rm.queries[0] == t - k
    assert rm.queries[t - 8] == 0 and rm.total[t - 8] == 0.0


def test_uniform_attention_receives_its_uniform_share():
    t, k = 64, 8
    a = uniform_causal(t, heads=3)
    rm = metrics.received_mass(a, k)
    share = metrics.uniform_share(t, k)
    counted = rm.queries > 0
    ratio = rm.total[counted] / (rm.heads * rm.queries[counted]) / share[counted]
    np.testing.assert_allclose(ratio, 1.0, rtol=1e-5)
    assert np.all(share[~counted] == 0)


def test_uniform_share_values():
    t, k = 20, 4
    share = metrics.uniform_share(t, k, local=3)
    for j in range(t):
        qs = np.arange(max(k, j + 3), t)
        assert share[j] == pytest.approx(np.mean(1 / (qs + 1)) if len(qs) else 0.0)


# ----------------------------------------------------------------------------------------- token kind


@pytest.mark.parametrize(("text", "is_bos", "kind"), [
    ("<s>", True, "bos"),
    ("Hello", True, "bos"),
    ("\n", False, "newline"),
    ("\n\n", False, "newline"),
    ("\u010a", False, "newline"),
    (" ", False, "space"),
    ("\u0120", False, "space"),
    ("\u2581", False, "space"),
    ("", False, "space"),
    (".", False, "punct"),
    (" ,", False, "punct"),
    ("\u0120!", False, "punct"),
    ("<|endoftext|>", False, "word"),
    ("the", False, "word"),
    ("\u0120the", False, "word"),
    ("\u2581The", False, "word"),
    ("42", False, "word"),
])
def test_token_kind(text, is_bos, kind):
    assert metrics.token_kind(text, is_bos=is_bos) == kind


@pytest.mark.parametrize(("t", "k"), [(9, 8), (40, 3), (512, 8)])
def test_chance_mass(t, k):
    assert metrics.chance_mass(t, k) == pytest.approx(sum(1 / (q + 1) for q in range(k, t)) / (t - k), rel=1e-12)


def test_chance_mass_rejects_bad_k():
    with pytest.raises(ValueError):
        metrics.chance_mass(8, 8)
