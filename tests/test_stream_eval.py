"""Perplexity under eviction (sinkscope.streaming.evaluate), recommendation v2, its figures, report and CLI.

Independent references, none of which use sinkscope's evaluation code:

* dense: one forward over the whole text, ``cross_entropy`` of its logits;
* recompute: one fresh forward per target over the ``W`` tokens before it;
* streaming: on a one-layer Llama a token's keys and values depend only on the token and its position, so
  the prediction of token ``t`` under a sink cache is a fresh forward over the ids that query attends to
  (sinks ``0..S-1`` plus the last ``W`` tokens) at positions ``0..S+W-1`` (as in test_streaming_cache.py).
"""

from __future__ import annotations

import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    REPO_ROOT,
    build_gpt2,
    build_llama,
    char_vocab,
    loaded,
    saved_model_dir,
)
from test_cli import assert_one_line_error

from sinkscope import plots, report
from sinkscope.analysis import (
    Recommendation,
    analyze,
    attention_estimate,
    recommend_from_stream_eval,
)
from sinkscope.cli import main
from sinkscope.errors import ConfigError, PromptError
from sinkscope.streaming import evaluate as se
from sinkscope.streaming.evaluate import (
    StreamEval,
    dense_nll,
    evaluate_stream,
    recompute_nll,
    streaming_nll,
)
from sinkscope.streaming.streamer import Streamer

TEXT = "Attention sinks: a streaming model keeps its first tokens and a window of recent ones. " * 2  # 172 chars
W = 16
SINKS = (0, 2)
MODEL_KEYS = {"name", "source", "architecture", "n_layers", "n_heads", "n_kv_heads", "head_dim"}


def ids_of(lm, text: str = TEXT) -> list[int]:
    return list(lm.tokenizer(text).input_ids)


@torch.no_grad()
def full_forward_nll(lm, ids: list[int]) -> np.ndarray:
    """NLL of tokens 1..T-1 from one plain forward."""
    x = torch.tensor([ids])
    logits = lm.model(input_ids=x, use_cache=False).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1].float(), x[0, 1:], reduction="none").double().numpy()


@torch.no_grad()
def fresh_nll(lm, ids: list[int], context: list[int], target: int) -> float:
    """NLL of ``ids[target]`` after a fresh forward over ``ids[context]`` at positions 0..len-1."""
    x = torch.tensor([[ids[i] for i in context]])
    logits = lm.model(input_ids=x, position_ids=torch.arange(len(context))[None], use_cache=False).logits[0, -1]
    return float(-torch.log_softmax(logits.float(), -1)[ids[target]])


@pytest.fixture(scope="module")
def tiny_falcon_alibi(tok_nobos):
    """LoadedModel: Falcon with ALiBi, loaded eager (its attention code bypasses the attention interface)."""
    from families import build

    return loaded(build("falcon_alibi", attn="eager"), tok_nobos, "tiny-falcon-alibi")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models gain nothing from threads (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def ev(tiny_llama) -> StreamEval:
    return evaluate_stream(tiny_llama, TEXT, sinks=SINKS, window=W, recompute_stride=3, progress=False)


@pytest.fixture(scope="module")
def one_layer(tok_bos):
    """One layer, larger weights and a small RoPE base: peaked attention, positions matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=len(char_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 100.0}, initializer_range=0.1,
                      pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return loaded(LlamaForCausalLM(cfg).eval(), tok_bos, "one-layer")


# ------------------------------------------------------------------------------------------------ targets


def test_targets_identical_across_modes(ev: StreamEval, tiny_llama) -> None:
    n = len(ids_of(tiny_llama))
    assert ev.n_tokens == n == len(TEXT) + 1
    expected = np.arange(max(SINKS) + W, n)
    np.testing.assert_array_equal(ev.targets, expected)
    assert [r.label for r in ev.results] == ["streaming S=0", "streaming S=2", "dense", "recompute"]
    for r in ev.results:
        want = expected[::3] if r.mode == "recompute" else expected
        np.testing.assert_array_equal(r.positions, want)
        assert np.isfinite(r.nll).all()
    d = ev.to_dict()
    assert d["targets"] == {"first": max(SINKS) + W, "last": n - 1, "count": n - max(SINKS) - W,
                            "rule": d["targets"]["rule"]}
    assert {r["n_targets"] for r in d["results"] if r["mode"] != "recompute"} == {n - max(SINKS) - W}


def test_dense_equals_full_forward(ev: StreamEval, tiny_llama) -> None:
    ids = ids_of(tiny_llama)
    ref = full_forward_nll(tiny_llama, ids)  # ref[i] is the NLL of token i + 1
    for chunk in (7, 64, 1024):  # several chunked forwards over a full cache = one forward
        got = dense_nll(tiny_llama, ids, chunk=chunk)
        assert math.isnan(got[0])
        np.testing.assert_allclose(got[1:], ref, atol=1e-4)
    np.testing.assert_allclose(ev.result("dense").nll, ref[ev.targets - 1], atol=1e-4)
    d = ev.result("dense").info
    assert d["method"] == "single forward, full causal attention" and d["beyond_context"] is False


def test_dense_chunked_on_sliding_window_layers(tiny_gemma3) -> None:
    """Gemma-3's local layers (window 4) through a chunked dynamic cache equal one forward."""
    ids = ids_of(tiny_gemma3)[:60]
    np.testing.assert_allclose(dense_nll(tiny_gemma3, ids, chunk=5)[1:], full_forward_nll(tiny_gemma3, ids),
                               atol=1e-4)


def test_dense_beyond_the_trained_context_is_flagged(tiny_llama) -> None:
    text = "0123456789" * 30  # 301 tokens > 256 positions
    ev = evaluate_stream(tiny_llama, text, sinks=(0,), window=8, modes=("dense",), progress=False)
    dense = ev.result("dense")
    assert dense.info["beyond_context"] is True and ev.to_dict()["results"][0]["beyond_context"] is True
    np.testing.assert_allclose(dense.nll, full_forward_nll(tiny_llama, ids_of(tiny_llama, text))[ev.targets - 1],
                               atol=1e-4)


# ---------------------------------------------------------------------------------------------- streaming


def test_streaming_without_eviction_equals_dense(tiny_llama) -> None:
    ids = ids_of(tiny_llama)
    dense = dense_nll(tiny_llama, ids)
    for sinks, window in ((0, len(ids)), (4, len(ids) - 4), (2, 250)):  # S + W >= T: nothing is evicted
        np.testing.assert_allclose(streaming_nll(tiny_llama, ids, sinks, window)[1:], dense[1:], atol=1e-4)
    # and token by token, without the first-forward shortcut
    tokenwise = [t.nll for t in Streamer(tiny_llama, sinks=2, window=len(ids)).feed(ids, chunk=1)]
    np.testing.assert_allclose(tokenwise[1:], dense[1:], atol=1e-4)


def test_streaming_equals_token_by_token_streamer(ev: StreamEval, tiny_llama) -> None:
    """The first S + W tokens in one forward leave the same state as feeding them one by one."""
    ids = ids_of(tiny_llama)
    for s in SINKS:
        tokenwise = [t.nll for t in Streamer(tiny_llama, sinks=s, window=W).feed(ids, chunk=1)]
        ref = np.array([np.nan, *tokenwise[1:]])
        np.testing.assert_allclose(streaming_nll(tiny_llama, ids, s, W)[1:], ref[1:], atol=1e-4)
        np.testing.assert_allclose(ev.result("streaming", s).nll, ref[ev.targets], atol=1e-4)
    # eviction did happen: the streams differ from dense on the targets
    assert np.abs(ev.result("streaming", 0).nll - ev.result("dense").nll).max() > 1e-3


@pytest.mark.parametrize("sinks", [0, 3])
def test_streaming_equals_independent_reference(one_layer, sinks: int) -> None:
    ids = ids_of(one_layer)
    window = 12
    got = streaming_nll(one_layer, ids, sinks, window)
    for t in range(sinks + window, len(ids), 7):
        q = t - 1  # the query that predicts token t
        context = list(range(sinks)) + list(range(q - window + 1, q + 1))
        assert got[t] == pytest.approx(fresh_nll(one_layer, ids, context, t), abs=1e-4)


def test_one_pass_is_the_default_and_equals_exact_stream(tiny_llama) -> None:
    fast = evaluate_stream(tiny_llama, TEXT, sinks=SINKS, window=W, modes=("streaming",), progress=False)
    slow = evaluate_stream(tiny_llama, TEXT, sinks=SINKS, window=W, modes=("streaming",), exact_stream=True,
                           progress=False)
    assert fast.settings["streaming"] == "one pass" and slow.settings["streaming"] == "token by token"
    for s in SINKS:
        a, b = fast.result("streaming", s), slow.result("streaming", s)
        assert a.info["streamed"] == "one pass" and "one pass" in a.info["method"]
        assert b.info["streamed"] == "token by token" and "one token per forward" in b.info["method"]
        assert a.info["exact"] is True and b.info["exact"] is True
        np.testing.assert_allclose(a.nll, b.nll, atol=1e-4)
    assert "onepass_fallback" not in fast.settings


def test_models_one_pass_cant_serve_stream_token_by_token(tiny_falcon_alibi) -> None:
    """ALiBi Falcon's attention bypasses the attention interface: streamed token by token, and it says so."""
    ev = evaluate_stream(tiny_falcon_alibi, list(range(4, 64)), sinks=(0, 2), window=8, modes=("streaming",),
                         progress=False)
    assert ev.settings["streaming"] == "token by token"
    assert "attention interface" in ev.settings["onepass_fallback"]
    ref = streaming_nll(tiny_falcon_alibi, list(range(4, 64)), 2, 8)
    np.testing.assert_allclose(ev.result("streaming", 2).nll, ref[ev.targets], atol=1e-6)


def test_window_grid(tiny_llama) -> None:
    ev = evaluate_stream(tiny_llama, TEXT, sinks=(0, 2), window=[16, 8, 16], modes=("streaming", "dense"),
                         progress=False)
    assert ev.windows == (8, 16) and ev.window == 16
    assert ev.targets[0] == 2 + 16  # the same targets for every cell: from max(sinks) + max(windows)
    assert set(ev.ppl_grid) == {(0, 8), (2, 8), (0, 16), (2, 16)}
    assert ev.ppl_by_sinks == {0: ev.ppl_grid[(0, 16)], 2: ev.ppl_grid[(2, 16)]}
    ids = ids_of(tiny_llama)
    for (s, w), ppl in ev.ppl_grid.items():  # each cell is that cache streamed on its own, on the common targets
        ref = streaming_nll(tiny_llama, ids, s, w)[ev.targets]
        assert ppl == pytest.approx(math.exp(ref.mean()), rel=1e-4)
        assert ev.result("streaming", s, window=w).cache_budget == s + w
    dense = ev.result("dense").ppl
    cheap = ev.cheapest(tolerance=10.0)
    assert cheap is not None and (cheap.sinks, cheap.window) == (0, 8)  # everything qualifies: the smallest cache
    strict = ev.cheapest(tolerance=0.0)
    assert strict is None or strict.ppl <= dense
    d = ev.to_dict()
    assert d["windows"] == [8, 16] and {r.get("window") for r in d["results"] if r["mode"] == "streaming"} == {8, 16}
    rec = recommend_from_stream_eval(ev, tolerance=10.0)
    assert [g["window"] for g in rec.evidence["grid"]] == [8, 16]
    assert rec.evidence["cheapest_cache"]["cache_budget"] == 8
    fig = plots.stream_ppl_grid(ev)
    assert isinstance(fig, go.Figure) and np.array(fig.data[0].z, dtype=float).shape == (2, 2)
    assert "cheapest" in fig.layout.title.text


# ---------------------------------------------------------------------------------------------- recompute


def test_recompute_equals_dense_when_the_window_covers_the_prefix(tiny_llama) -> None:
    ids = ids_of(tiny_llama)
    dense = dense_nll(tiny_llama, ids)
    positions = list(range(1, 41))
    np.testing.assert_allclose(recompute_nll(tiny_llama, ids, positions, 40, batch=3), dense[1:41], atol=1e-4)


def test_recompute_equals_independent_fresh_forwards(ev: StreamEval, tiny_llama) -> None:
    ids = ids_of(tiny_llama)
    rec = ev.result("recompute")
    for t, nll in zip(rec.positions, rec.nll, strict=True):
        assert nll == pytest.approx(fresh_nll(tiny_llama, ids, list(range(t - W, t)), t), abs=1e-4)
    # batch sizes don't change anything
    positions = rec.positions[:7]
    np.testing.assert_allclose(recompute_nll(tiny_llama, ids, positions, W, batch=1),
                               recompute_nll(tiny_llama, ids, positions, W, batch=4), atol=1e-5)


def test_recompute_is_streaming_without_sinks_on_one_layer(one_layer) -> None:
    """One layer: re-encoding the last W tokens is what a 0-sink cache holds (same keys, same positions)."""
    ids = ids_of(one_layer)
    positions = list(range(20, len(ids)))
    np.testing.assert_allclose(recompute_nll(one_layer, ids, positions, 12), streaming_nll(one_layer, ids, 0, 12)[20:],
                               atol=1e-4)


def test_recompute_stride_subset(ev: StreamEval) -> None:
    d = ev.to_dict()
    sub = ev.targets[::3]
    assert d["recompute_targets"]["stride"] == 3 and d["recompute_targets"]["count"] == len(sub)
    first = d["targets"]["first"]
    for r in d["results"]:
        pos = r["positions"]
        x = pos["first"] + pos["stride"] * np.arange(pos["count"])
        nll = np.asarray(r["nll"], dtype=float)
        on_sub = np.isin(x, sub)
        assert on_sub.sum() == len(sub)
        # ppl_on_recompute_targets is exp(mean NLL) on exactly those positions (JSON NLLs are rounded)
        assert r["ppl_on_recompute_targets"] == pytest.approx(math.exp(nll[on_sub].mean()), rel=1e-3)
        assert r["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-3)
        assert pos["first"] == first
    rec = next(r for r in d["results"] if r["mode"] == "recompute")
    assert rec["stride"] == 3 and rec["ppl"] == rec["ppl_on_recompute_targets"]
    assert rec["n_targets"] == len(sub) and rec["sinks"] == 0 and rec["window"] == W


def test_recompute_stride_auto(tiny_llama, monkeypatch) -> None:
    monkeypatch.setattr(se, "AUTO_RECOMPUTE_TARGETS", 10)
    plan = se.prepare_stream_eval(tiny_llama, TEXT, sinks=SINKS, window=W, recompute_stride="auto")
    n = len(plan.targets)
    assert plan.recompute_stride == math.ceil(n / 10) and len(plan.recompute_targets) <= 10
    assert se.prepare_stream_eval(tiny_llama, TEXT, sinks=SINKS, window=W).recompute_stride == 1


# ------------------------------------------------------------------------------------------------- schema


def test_to_dict_schema_and_json_round_trip(ev: StreamEval) -> None:
    d = ev.to_dict()
    assert d["schema"] == "sinkscope.stream_eval/2" == se.SCHEMA
    assert set(d["model"]) >= MODEL_KEYS and d["model"]["name"] == "tiny-llama"
    assert d["text"]["name"] == "text" and d["text"]["n_tokens"] == ev.n_tokens
    assert d["window"] == W and d["tokens"] == ev.n_tokens and d["sinks"] == list(SINKS)
    streaming = [r for r in d["results"] if r["mode"] == "streaming"]
    assert [r["sinks"] for r in streaming] == list(SINKS)
    assert [r["mode"] for r in d["results"]] == ["streaming", "streaming", "dense", "recompute"]
    for r in d["results"]:
        assert {"mode", "ppl", "method", "exact", "n_targets"} <= set(r)
        assert isinstance(r["ppl"], float) and r["ppl"] == pytest.approx(ev.result(r["mode"], r.get("sinks")).ppl)
        assert len(r["nll"]) == r["n_targets"] == r["positions"]["count"]
    assert next(r for r in d["results"] if r["mode"] == "recompute")["sinks"] == 0
    assert next(r for r in d["results"] if r["mode"] == "dense")["method"] == "single forward, full causal attention"
    text = json.dumps(d, allow_nan=False)  # no NaN anywhere
    assert json.loads(text) == d
    assert json.loads(ev.to_json()) == d
    lean = ev.to_dict(include_nll=False)
    assert all("nll" not in r and "positions" not in r for r in lean["results"])
    assert ev.ppl_by_sinks == {s: ev.result("streaming", s).ppl for s in SINKS}
    assert "streaming S=2" in repr(ev)


def test_default_text_is_offline_python_docs() -> None:
    from pydoc_data.topics import topics

    p = se.default_text()
    assert p.name == "pydoc_data.topics"
    assert p.text.startswith(topics[sorted(topics)[0]][:40]) and len(p.text) > 100_000


def test_default_text_is_cut_to_default_tokens(tiny_llama, monkeypatch) -> None:
    monkeypatch.setattr(se, "DEFAULT_TOKENS", 200)
    plan = se.prepare_stream_eval(tiny_llama, sinks=(0,), window=8)
    assert len(plan.ids) == 200 and plan.text_name == "pydoc_data.topics" and plan.available_tokens > 100_000


def test_token_ids_are_accepted(tiny_llama) -> None:
    ids = ids_of(tiny_llama)
    plan = se.prepare_stream_eval(tiny_llama, torch.tensor([ids]), sinks=(0,), window=8)
    assert plan.ids == ids and plan.text_name == "token ids"
    assert se.prepare_stream_eval(tiny_llama, ids, sinks=(0,), window=8, tokens=50).ids == ids[:50]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("kwargs", "error", "needle"), [
    ({"sinks": (0, -1)}, ConfigError, ">= 0"),
    ({"sinks": ()}, ConfigError, "at least one"),
    ({"window": 0}, ConfigError, "window"),
    ({"sinks": (0, 8), "window": 250}, ConfigError, "context of 256"),
    ({"window": 150}, PromptError, "needs at least"),
    ({"tokens": 40}, PromptError, "--tokens 40"),
    ({"modes": ("streaming", "sparse")}, ConfigError, "sparse"),
    ({"window": [8, 0]}, ConfigError, "windows"),
    ({"window": [8, 150]}, PromptError, "needs at least"),
    ({"recompute_stride": 0}, ConfigError, "stride"),
])
def test_bad_input(tiny_llama, kwargs, error, needle) -> None:
    with pytest.raises(error, match=needle) as exc:
        se.prepare_stream_eval(tiny_llama, TEXT, **{"sinks": SINKS, "window": W, **kwargs})
    assert "\n" not in str(exc.value)


def test_unsupported_architecture(tiny_gpt2) -> None:
    with pytest.raises(ConfigError, match="rotary"):
        evaluate_stream(tiny_gpt2, TEXT[:60], sinks=(0,), window=8, progress=False)
    # without streaming, dense and recompute work within GPT-2's 64 learned positions ...
    ev = evaluate_stream(tiny_gpt2, TEXT[:60], sinks=(0,), window=8, modes=("dense", "recompute"), progress=False)
    assert [r.mode for r in ev.results] == ["dense", "recompute"]
    # ... and dense past them is refused up front
    with pytest.raises(ConfigError, match="absolute positions"):
        se.prepare_stream_eval(tiny_gpt2, TEXT, sinks=(0,), window=8, modes=("dense",))


# --------------------------------------------------------------------------------------- recommendation v2


def hand_made(ppl: dict[int, float | None], dense: float = 10.0) -> dict:
    results = [{"mode": "streaming", "sinks": s, "ppl": p} for s, p in ppl.items()]
    results.append({"mode": "dense", "ppl": dense})
    return {"schema": se.SCHEMA, "window": 256, "tokens": 2000, "text": {"name": "t", "n_tokens": 2000},
            "targets": {"count": 1736}, "settings": {"exact": True}, "results": results}


PPL = {0: 30.0, 1: 14.0, 2: 13.8, 4: 13.5, 8: 13.6}


@pytest.mark.parametrize(("tolerance", "expected"), [(0.05, 1), (0.04, 1), (0.03, 2), (0.02, 4), (0.0, 4),
                                                     (2.0, 0), (1.0, 1)])
def test_recommendation_v2_tolerance(tolerance: float, expected: int) -> None:
    rec = recommend_from_stream_eval(hand_made(PPL), tolerance)
    assert rec.sinks == expected
    ev = rec.evidence
    assert ev["best_sinks"] == 4 and ev["best_ppl"] == 13.5 and ev["tolerance"] == tolerance
    assert ev["limit_ppl"] == pytest.approx(13.5 * (1 + tolerance))
    assert [r["sinks"] for r in ev["ppl_by_sinks"]] == [0, 1, 2, 4, 8]
    assert all(r["within_tolerance"] == (r["ppl"] <= ev["limit_ppl"]) for r in ev["ppl_by_sinks"])
    assert ev["dense_ppl"] == 10.0 and ev["window"] == 256 and ev["n_targets"] == 1736
    assert f"within {tolerance:.0%} of the best" in rec.method


def test_recommendation_v2_ties_and_boundary() -> None:
    assert recommend_from_stream_eval(hand_made({8: 13.5, 1: 13.5, 4: 13.5}), 0.0).sinks == 1
    rec = recommend_from_stream_eval(hand_made({0: 13.5, 2: 13.5}), 0.0)
    assert rec.sinks == 0 and rec.evidence["best_sinks"] == 0
    # exactly on the limit counts as within
    assert recommend_from_stream_eval(hand_made({0: 11.0, 4: 10.0}), 0.1).sinks == 0


def test_recommendation_v2_skips_undefined_and_refuses_nonsense() -> None:
    assert recommend_from_stream_eval(hand_made({0: None, 1: 14.0, 2: float("nan")})).sinks == 1
    with pytest.raises(ConfigError, match="finite"):
        recommend_from_stream_eval(hand_made({0: None}))
    with pytest.raises(ConfigError, match="tolerance"):
        recommend_from_stream_eval(hand_made(PPL), -0.1)
    with pytest.raises(ConfigError, match="results"):
        recommend_from_stream_eval({"schema": se.SCHEMA})


def test_recommendation_v2_keeps_the_attention_estimate() -> None:
    first = Recommendation(2, "attention: ...", {"curve": [0.5, 0.6], "share": 0.95})
    rec = recommend_from_stream_eval(hand_made(PPL), attention=first)
    assert rec.evidence["attention_estimate"] == first.to_dict()
    assert rec.evidence["attention_estimate_ppl"] == 13.8
    assert rec.evidence["agrees_with_attention_estimate"] is False
    assert attention_estimate(rec).to_dict() == first.to_dict()
    assert attention_estimate(first) is first
    # validating a validated recommendation again keeps the original estimate, not the first validation
    again = recommend_from_stream_eval(hand_made(PPL), 0.01, attention=rec)
    assert again.evidence["attention_estimate"] == first.to_dict() and again.sinks == 4


def test_recommendation_v2_from_a_stream_eval(ev: StreamEval) -> None:
    assert recommend_from_stream_eval(ev).to_dict() == recommend_from_stream_eval(ev.to_dict()).to_dict()


# ---------------------------------------------------------------------------------------------------- plots


def test_ppl_by_sinks_figure(ev: StreamEval) -> None:
    d = ev.to_dict()
    fig = plots.stream_ppl_by_sinks(ev)
    assert isinstance(fig, go.Figure)
    line = fig.data[0]
    assert list(line.x) == list(SINKS)
    np.testing.assert_allclose(line.y, [ev.result("streaming", s).ppl for s in SINKS])
    sub = next(t for t in fig.data if "recompute's targets" in (t.name or ""))
    np.testing.assert_allclose(sub.y, [r["ppl_on_recompute_targets"] for r in d["results"][:2]])
    hlines = [s for s in fig.layout.shapes if s.y0 == s.y1]
    assert sorted(s.y0 for s in hlines) == sorted([ev.result("dense").ppl, ev.result("recompute").ppl])
    # the same from the dict, and through the StreamEval method
    assert plots.stream_ppl_by_sinks(d).to_dict()["data"] == fig.to_dict()["data"]
    assert ev.plot_ppl().to_dict()["data"] == fig.to_dict()["data"]
    # with a validated recommendation: the tolerance band and the chosen count
    rec = recommend_from_stream_eval(ev, 0.05)
    fig = plots.stream_ppl_by_sinks(ev, rec)
    bands = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(bands) == 1 and bands[0].y0 == pytest.approx(rec.evidence["best_ppl"])
    assert any(s.x0 == s.x1 == rec.sinks for s in fig.layout.shapes)


def test_rolling_nll_figure(ev: StreamEval) -> None:
    span = 8
    fig = plots.stream_rolling_nll(ev, span=span)
    assert [t.name for t in fig.data] == ["streaming S=0", "streaming S=2", "dense (full cache)", "recompute (1 in 3)"]
    dense = ev.result("dense")
    d_line = fig.data[2]
    want = np.convolve(np.round(dense.nll, 4), np.ones(span) / span, mode="valid")
    np.testing.assert_allclose(d_line.y, want, atol=1e-9)
    assert list(d_line.x) == list(dense.positions[span - 1:])
    r_line = fig.data[3]  # every 3rd target: a span of 8 tokens is 2 of its points
    assert r_line.x[0] == ev.result("recompute").positions[1]
    with pytest.raises(ConfigError):
        plots.stream_rolling_nll(ev, span=0)
    empty = plots.stream_rolling_nll(ev.to_dict(include_nll=False))
    assert not empty.data and "no per-token NLLs" in empty.layout.annotations[0].text


def test_figures_refuse_what_is_not_a_stream_eval() -> None:
    with pytest.raises(ConfigError):
        plots.stream_ppl_by_sinks({"schema": "x"})


# --------------------------------------------------------------------------------------------------- report


def test_write_stream_eval(ev: StreamEval, tmp_path) -> None:
    from plotly.offline import get_plotlyjs

    rec = recommend_from_stream_eval(ev)
    paths = report.write_stream_eval(ev, tmp_path / "out", recommendation=rec)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["stream_eval.html", "stream_eval.json"]
    doc = json.loads(paths["json"].read_text())
    assert doc == {**json.loads(json.dumps(ev.to_dict())), "recommendation": json.loads(json.dumps(rec.to_dict()))}
    page = paths["html"].read_text()
    assert page.count(get_plotlyjs()) == 1
    assert 'id="fig-stream-stream-ppl"' in page and 'id="fig-stream-stream-nll"' in page
    assert "Recommended sink tokens" in page and "<script src=" not in page


def test_stream_eval_html_escapes_names(tiny_llama) -> None:
    evil = "<b>evil</b>"
    ev = evaluate_stream(tiny_llama, TEXT, sinks=(0,), window=W, modes=("streaming",), text_name=evil, progress=False)
    page = report.render_stream_eval_html(ev, recommendation=recommend_from_stream_eval(ev))
    assert evil not in page and "&lt;b&gt;evil&lt;/b&gt;" in page


@pytest.fixture(scope="module")
def validated(tiny_llama):
    profile = analyze(tiny_llama, TEXT, k_max=4, progress=False)
    first = profile.recommendation.to_dict()
    profile.validate(tiny_llama, TEXT, window=W, tolerance=0.05, progress=False)
    return profile, first


def test_validate_attaches_stream_eval_and_keeps_the_estimate(validated) -> None:
    profile, first = validated
    d = profile.to_dict()
    assert d["stream_eval"]["schema"] == se.SCHEMA
    assert d["stream_eval"]["sinks"] == sorted({0, 1, 2, 4, 8, first["sinks"]})
    assert [r["mode"] for r in d["stream_eval"]["results"]][-1] == "dense"  # no recompute by default
    assert d["recommendation"]["method"].startswith("stream eval")
    assert d["recommendation"]["evidence"]["attention_estimate"] == first
    assert json.loads(json.dumps(d)) == d


def test_report_shows_stream_eval(validated, tmp_path) -> None:
    profile, _ = validated
    page = report.render_html(profile)
    assert 'id="fig-report-stream-ppl"' in page and 'id="fig-report-stream-nll"' in page
    assert "Attention-statistics estimate" in page and "Streaming evaluation" in page
    md = report.render_markdown(profile)
    assert "## Streaming evaluation" in md and "Attention-statistics estimate" in md
    # the sink-mass figure marks the attention estimate and the validated count
    fig = plots.sink_mass_curves(profile)
    texts = [a.text for a in fig.layout.annotations]
    assert any(t.startswith("attention estimate") for t in texts)
    assert any(t.startswith("validated by streaming") for t in texts)
    paths = report.write_report(profile, tmp_path)
    assert json.loads(paths["json"].read_text())["stream_eval"]["window"] == W


@pytest.mark.browser
def test_stream_eval_html_renders_in_chromium(ev: StreamEval, tmp_path) -> None:
    import importlib.util
    import os
    import re

    spec = importlib.util.spec_from_file_location("screenshot", REPO_ROOT / "docs" / "screenshot.py")
    screenshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot)
    if screenshot.find_chromium() is None:
        msg = "chromium is not installed (make browser installs Debian's chromium and chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    page = report.write_stream_eval(ev, tmp_path, recommendation=recommend_from_stream_eval(ev))["html"]
    dom, log = screenshot.dump_dom(page)
    assert len(re.findall(r'class="[^"]*js-plotly-plot', dom)) == 2, log[-2000:]
    assert "Uncaught" not in log and "ReferenceError" not in log, log[-2000:]


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return saved_model_dir(tmp_path_factory, "tiny-gpt2", build_gpt2(), add_bos=False)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "text.txt"
    f.write_text(TEXT)
    return f


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_eval_stream_writes_json_and_html(capsys, llama_dir, text_file, tmp_path) -> None:
    out = tmp_path / "es"
    rc, stdout, err = cli(capsys, "eval-stream", str(llama_dir), "--text-file", str(text_file), "--sinks", "0,2",
                          "--window", str(W), "--recompute-stride", "4", "--out", str(out))
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["stream_eval.html", "stream_eval.json"]
    doc = json.loads((out / "stream_eval.json").read_text())
    assert doc["schema"] == se.SCHEMA and doc["text"] == {"name": "text", "n_tokens": len(TEXT) + 1,
                                                          "available_tokens": len(TEXT) + 1}
    assert [(r["mode"], r.get("sinks")) for r in doc["results"]] == [("streaming", 0), ("streaming", 2),
                                                                      ("dense", None), ("recompute", 0)]
    assert doc["recompute_targets"]["stride"] == 4 and doc["recommendation"]["sinks"] in (0, 2)
    assert f"recommended sinks: {doc['recommendation']['sinks']}" in stdout
    assert "fewer than --tokens" in err  # the text is shorter than the default 2000 tokens: a note, not an error


@pytest.mark.parametrize(("args", "needle"), [
    (["--sinks", "0,-1"], "--sinks must be >= 0"),
    (["--window", "0"], "--window must be at least 1"),
    (["--window", "250", "--sinks", "0,8"], "beyond"),
    (["--window", "150"], "needs at least"),
    (["--modes", "streaming,nope"], "nope"),
])
def test_cli_eval_stream_bad_input(capsys, llama_dir, text_file, tmp_path, args, needle) -> None:
    rc, _, err = cli(capsys, "eval-stream", str(llama_dir), "--text-file", str(text_file), *args,
                     "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o" / "stream_eval.json").exists()


def test_cli_eval_stream_unsupported_architecture(capsys, gpt2_dir, text_file, tmp_path) -> None:
    rc, _, err = cli(capsys, "eval-stream", str(gpt2_dir), "--text-file", str(text_file), "--window", "8",
                     "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "GPT2LMHeadModel", "rotary")


def test_cli_report_validate(capsys, llama_dir, text_file, tmp_path) -> None:
    out = tmp_path / "rep"
    rc, stdout, err = cli(capsys, "report", str(llama_dir), "--prompt-file", str(text_file), "--k-max", "4",
                          "--validate", "--validate-text", str(text_file), "--window", str(W), "--sinks", "0,1,3",
                          "--tolerance", "0.1", "--out", str(out))
    assert rc == 0, err
    doc = json.loads((out / "report.json").read_text())
    assert doc["stream_eval"]["schema"] == se.SCHEMA and doc["stream_eval"]["sinks"] == [0, 1, 3]
    rec = doc["recommendation"]
    assert rec["method"].startswith("stream eval") and rec["evidence"]["tolerance"] == 0.1
    assert rec["evidence"]["attention_estimate"]["method"].startswith("attention")
    assert "attention estimate:" in stdout and f"recommended sinks: {rec['sinks']}" in stdout
    page = (out / "report.html").read_text()
    assert "fig-report-stream-ppl" in page


def test_cli_report_validates_by_default(capsys, tmp_path_factory, text_file, tmp_path) -> None:
    """No flag: the report validates (one pass, default text and sizes) and recommends from it."""
    d = saved_model_dir(tmp_path_factory, "llama-1k", build_llama(max_position_embeddings=1024), add_bos=True)
    rc, stdout, err = cli(capsys, "report", str(d), "--prompt-file", str(text_file), "--k-max", "4",
                          "--out", str(tmp_path / "r"))
    assert rc == 0, err
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    ev = doc["stream_eval"]
    assert ev["window"] == 256 and ev["tokens"] == 2000 and ev["settings"]["streaming"] == "one pass"
    assert doc["recommendation"]["method"].startswith("stream eval")
    assert "recommended sinks" in stdout and "note:" not in err


def test_cli_report_notes_a_validation_that_cant_run(capsys, llama_dir, text_file, tmp_path) -> None:
    """By default, a validation that can't run (here: 256 + 8 positions on a 256-position model) is a note and
    the attention estimate stands; asked for with --validate, the same is an error."""
    rc, _, err = cli(capsys, "report", str(llama_dir), "--prompt-file", str(text_file), "--k-max", "4",
                     "--out", str(tmp_path / "r"))
    assert rc == 0, err
    assert "note: no validation by streaming" in err and "context of 256" in err
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert doc["stream_eval"] is None and doc["recommendation"]["method"].startswith("attention")
    rc, _, err = cli(capsys, "report", str(llama_dir), "--prompt-file", str(text_file), "--k-max", "4",
                     "--validate", "--out", str(tmp_path / "r2"))
    assert_one_line_error(rc, err, "context of 256")


def test_cli_eval_stream_grid(capsys, llama_dir, text_file, tmp_path) -> None:
    out = tmp_path / "grid"
    rc, stdout, err = cli(capsys, "eval-stream", str(llama_dir), "--text-file", str(text_file), "--sinks", "0,2",
                          "--windows", "8,16", "--modes", "streaming,dense", "--tolerance", "10", "--out", str(out))
    assert rc == 0, err
    doc = json.loads((out / "stream_eval.json").read_text())
    assert doc["windows"] == [8, 16]
    assert sorted((r["sinks"], r["window"]) for r in doc["results"] if r["mode"] == "streaming") == [
        (0, 8), (0, 16), (2, 8), (2, 16)]
    assert "cheapest cache within 1000% of dense" in stdout and "0 sinks + window 8 = 8 tokens" in stdout
    assert "fig-stream-stream-grid" in (out / "stream_eval.html").read_text() or \
        "stream-grid" in (out / "stream_eval.html").read_text()


@pytest.mark.parametrize(("args", "needle"), [
    (["--no-validate", "--window", "16"], "--no-validate skips"),
    (["--window", "16", "--windows", "8,16"], "not both"),
    (["--validate", "--window", "0"], "--window must be at least 1"),
    (["--validate", "--validate-tokens", "40", "--window", "32"], "needs at least"),
])
def test_cli_report_validate_bad_input(capsys, llama_dir, text_file, tmp_path, args, needle) -> None:
    text = ["--validate-text", str(text_file)] if "--no-validate" not in args else []
    rc, _, err = cli(capsys, "report", str(llama_dir), "--prompt-file", str(text_file), "--k-max", "4", *args, *text,
                     "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, needle)


# ----------------------------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_smollm2_collapses_without_sinks(smollm2) -> None:
    """SmolLM2 streamed past a 64-token window: without sinks perplexity blows up, 4 sinks keep it near dense."""
    lm = smollm2
    ev = evaluate_stream(lm, sinks=(0, 4), window=64, tokens=300, modes=("streaming", "dense"), progress=False)
    ppl = ev.ppl_by_sinks
    dense = ev.result("dense").ppl
    assert math.isfinite(dense) and math.isfinite(ppl[0]) and math.isfinite(ppl[4])
    assert ppl[4] < 0.75 * ppl[0], ppl
    assert dense < ppl[0]
    rec = recommend_from_stream_eval(ev)
    assert rec.sinks == 4


@pytest.mark.real
def test_real_smollm2_switch_collapses_and_recovers(smollm2) -> None:
    """Sinks off mid-stream: the loss rises above an uninterrupted stream's; back on (re-prefilled), it returns
    to it. Window 32, off for tokens 60-109."""
    ids = ids_of(smollm2, se.default_text().text)[:200]

    def run(flip: bool) -> np.ndarray:
        s = Streamer(smollm2, sinks=4, window=32)
        out = []
        for t in s.feed(ids, chunk=1):
            out.append(t.nll or 0.0)
            if flip and t.step in (59, 109):
                s.set_sinks(t.step == 109)
        return np.array(out)

    steady, flipped = run(False), run(True)
    assert flipped[60:110].mean() > steady[60:110].mean() + 0.3, (flipped[60:110].mean(), steady[60:110].mean())
    assert abs(flipped[150:].mean() - steady[150:].mean()) < 0.05, (flipped[150:].mean(), steady[150:].mean())


@pytest.mark.real
@pytest.mark.parametrize(("name", "tokens", "window"), [
    ("smollm2", 400, 64),
    ("gemma3", 580, 32),  # past Gemma-3's 512-token local window: its local layers evict too
])
def test_real_one_pass_equals_token_by_token(name, tokens, window, request) -> None:
    """The default one pass against token-by-token SinkCache streaming on the embedded models, per token."""
    lm = request.getfixturevalue(name)
    kwargs = dict(sinks=(4,), window=window, tokens=tokens, modes=("streaming",), progress=False)
    fast = evaluate_stream(lm, **kwargs)
    slow = evaluate_stream(lm, exact_stream=True, **kwargs)
    assert fast.settings["streaming"] == "one pass" and slow.settings["streaming"] == "token by token"
    a, b = fast.result("streaming", 4).nll, slow.result("streaming", 4).nll
    assert len(a) == tokens - 4 - window
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
