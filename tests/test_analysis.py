"""sinkscope.analyze / SinkProfile / recommend_from_attention, checked against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TEXT_24, TEXT_60

from sinkscope import Prompt, analyze
from sinkscope.analysis import SCHEMA, recommend_from_attention
from sinkscope.errors import ConfigError, ModelNotFoundError, PromptError

K = 8
TEXTS = [TEXT_60, TEXT_24 + TEXT_24]  # two prompts of different lengths


def _expected(ref, lm, text, k=K, layers=None, max_tokens=None):
    """design.md numbers for one prompt, in numpy, from transformers' own eager maps."""
    ids = ref.encode(lm, text, max_tokens)
    maps = ref.eager_attentions(lm.model, ids)
    layers = list(range(len(maps))) if layers is None else layers
    sel = [maps[i] for i in layers]
    received = sum(ref.received(a, k)[0] for a in sel)
    _, queries = ref.received(sel[0], k)
    return {
        "ids": ids[0].tolist(),
        "maps": sel,
        "ftm": np.stack([ref.first_token_mass(a, k) for a in sel]),
        "sm": np.stack([ref.sink_mass(a, k) for a in sel]),
        "ent": np.stack([ref.entropy(a, k) for a in sel]),
        "received": received,
        "queries": queries,
    }


@pytest.fixture(scope="module")
def profiles(request):
    """analyze() on each tiny model with the two prompts (computed once per module)."""
    out = {}
    for name in ("tiny_llama", "tiny_gemma3", "tiny_gpt2"):
        lm = request.getfixturevalue(name)
        out[lm.spec.name] = analyze(lm, TEXTS, k_max=K, map_size=12, progress=False)
    return out


@pytest.fixture(scope="module")
def sink_profile(sink_llama):
    return analyze(sink_llama, [Prompt("a", TEXT_60), Prompt("b", TEXT_24 * 2)], progress=False)


# ---------------------------------------------------------------------------------- numbers vs reference


def test_per_prompt_metrics_match_reference(tiny, profiles, ref):
    prof = profiles[tiny.spec.name]
    for text, res in zip(TEXTS, prof.prompts, strict=True):
        exp = _expected(ref, tiny, text)
        np.testing.assert_allclose(res.first_token_mass, exp["ftm"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(res.sink_mass, exp["sm"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(res.entropy, exp["ent"], atol=1e-5, rtol=0)
        assert res.n_tokens == len(exp["ids"])


def test_aggregates_are_means_of_prompts(tiny, profiles, ref):
    prof = profiles[tiny.spec.name]
    exps = [_expected(ref, tiny, text) for text in TEXTS]
    for attr, key in (("first_token_mass", "ftm"), ("sink_mass", "sm"), ("entropy", "ent")):
        np.testing.assert_allclose(getattr(prof, attr), np.mean([e[key] for e in exps], axis=0), atol=1e-5)
        np.testing.assert_allclose(getattr(prof, attr),
                                   (getattr(prof.prompts[0], attr) + getattr(prof.prompts[1], attr)) / 2,
                                   rtol=1e-12)
    per_prompt = [np.mean(e["ftm"] > prof.threshold) for e in exps]
    assert prof.sink_rate == pytest.approx(np.mean(per_prompt))


def test_shapes(tiny, profiles):
    prof = profiles[tiny.spec.name]
    n_l, n_h = tiny.spec.n_layers, tiny.spec.n_heads
    assert prof.layers == list(range(n_l))
    assert prof.k_max == K
    assert prof.first_token_mass.shape == (n_l, n_h)
    assert prof.sink_mass.shape == (n_l, n_h, K)
    assert prof.entropy.shape == (n_l, n_h)
    assert [p.name for p in prof.prompts] == ["prompt-1", "prompt-2"]
    # sink mass grows with k, and k = 1 is the first-token mass
    assert np.all(np.diff(prof.sink_mass, axis=-1) >= -1e-12)
    np.testing.assert_allclose(prof.sink_mass[..., 0], prof.first_token_mass, rtol=1e-12)


def test_gemma3_sliding_layers_see_no_first_token(tiny_gemma3, profiles):
    """With a window of 4 and K = 8, no counted query of a sliding layer can reach keys 0..4."""
    prof = profiles["tiny-gemma3"]
    for layer, kind in enumerate(tiny_gemma3.spec.layer_types):
        row = prof.sink_mass[layer]
        if kind == "sliding_attention":
            np.testing.assert_array_equal(row[:, :5], 0.0)
            assert np.all(row[:, 5:] > 0)  # query 8 sees keys 5..8
        else:
            assert np.all(row[:, 0] > 0)


def test_tokens_are_the_tokenizers_decode(tiny, profiles):
    prof = profiles[tiny.spec.name]
    for text, res in zip(TEXTS, prof.prompts, strict=True):
        ids = tiny.tokenizer(text).input_ids
        assert res.tokens == [tiny.tokenizer.decode([i]) for i in ids]
        assert res.tokens == (["<bos>"] if tiny.spec.adds_bos else []) + list(text)


def test_sink_positions_match_reference(tiny, profiles, ref):
    prof = profiles[tiny.spec.name]
    res = prof.prompts[0]  # 60 (or 61) tokens: positions 0..~36 have >= 16 distant queries
    exp = _expected(ref, tiny, TEXTS[0])
    t = res.n_tokens
    n_pairs = tiny.spec.n_layers * tiny.spec.n_heads
    ok = exp["queries"] >= 16
    mean = np.where(ok, exp["received"] / np.maximum(exp["queries"] * n_pairs, 1), -np.inf)
    order = [int(j) for j in np.argsort(-mean, kind="stable") if ok[j]][:8]
    uniform = ref.uniform(t, K)
    assert [s.position for s in res.sink_positions] == order
    for s in res.sink_positions:
        assert s.received == pytest.approx(mean[s.position], abs=1e-7)
        assert s.vs_uniform == pytest.approx(mean[s.position] / uniform[s.position], rel=1e-5)
        assert s.token == res.tokens[s.position]
        bos = s.position == 0 and tiny.spec.adds_bos
        assert (s.kind == "bos") == bos
    assert [s.received for s in res.sink_positions] == sorted((s.received for s in res.sink_positions),
                                                              reverse=True)


def test_short_prompt_ranks_only_well_covered_positions(tiny_llama):
    # 24 + 1 tokens and K = 8: position j has 17 - j distant queries; only j = 0, 1 reach the 16 needed
    prof = analyze(tiny_llama, TEXT_24, map_size=None, progress=False)
    assert sorted(s.position for s in prof.prompts[0].sink_positions) == [0, 1]


def test_pooled_attention_maps_match_reference(tiny, profiles, ref):
    prof = profiles[tiny.spec.name]
    for text, res in zip(TEXTS, prof.prompts, strict=True):
        exp = _expected(ref, tiny, text)
        att = res.attention
        assert att is not None
        assert att.maps.shape == (tiny.spec.n_layers, tiny.spec.n_heads, 12, 12)
        assert att.maps.dtype == np.float32
        assert att.bins[0] == (0, 1) and att.bins[-1][1] == res.n_tokens
        assert len(att.labels) == 12
        assert att.labels[0] == f"0: {res.tokens[0]!r}"
        a, b = att.bins[1]
        assert att.labels[1] == (f"{a}: {res.tokens[a]!r}" if b - a == 1 else f"{a}-{b - 1}")
        for i, m in enumerate(exp["maps"]):
            np.testing.assert_allclose(att.maps[i], ref.pool(m, att.bins), atol=1e-5, rtol=0)
        np.testing.assert_allclose(att.maps.sum(-1), 1.0, atol=1e-5)


def test_map_size_none_keeps_no_maps(tiny_gpt2):
    prof = analyze(tiny_gpt2, TEXT_24, map_size=None, progress=False)
    assert prof.prompts[0].attention is None
    assert prof.settings["map_size"] is None


def test_layers_subset(tiny_gemma3, profiles, ref):
    prof = analyze(tiny_gemma3, TEXTS, layers=[-1, 1], map_size=8, progress=False)
    assert prof.layers == [1, 2]
    full = profiles["tiny-gemma3"]
    np.testing.assert_allclose(prof.first_token_mass, full.first_token_mass[[1, 2]], rtol=1e-12)
    np.testing.assert_allclose(prof.sink_mass, full.sink_mass[[1, 2]], rtol=1e-12)
    assert prof.prompts[0].attention.maps.shape[0] == 2
    assert prof.layer_row(2) == 1
    with pytest.raises(ConfigError, match="layer 0 was not analysed"):
        prof.layer_row(0)
    # received mass (and so sink positions) is summed over the analysed layers only
    exp = _expected(ref, tiny_gemma3, TEXTS[0], layers=[1, 2])
    s = prof.prompts[0].sink_positions[0]
    assert s.received == pytest.approx(exp["received"][s.position] / (exp["queries"][s.position] * 2 * 4))


def test_other_k_max(tiny_llama, ref):
    prof = analyze(tiny_llama, TEXT_60, k_max=3, map_size=None, progress=False)
    exp = _expected(ref, tiny_llama, TEXT_60, k=3)
    assert prof.sink_mass.shape == (3, 4, 3)
    np.testing.assert_allclose(prof.first_token_mass, exp["ftm"], atol=1e-6)
    np.testing.assert_allclose(prof.sink_mass, exp["sm"], atol=1e-6)
    np.testing.assert_allclose(prof.entropy, exp["ent"], atol=1e-5)
    assert prof.recommendation.evidence["k_max"] == 3


def test_max_tokens_truncates(tiny_llama, ref):
    prof = analyze(tiny_llama, TEXT_60, max_tokens=20, map_size=None, progress=False)
    assert prof.prompts[0].n_tokens == 20
    assert prof.settings["max_tokens"] == 20
    exp = _expected(ref, tiny_llama, TEXT_60, max_tokens=20)
    np.testing.assert_allclose(prof.first_token_mass, exp["ftm"], atol=1e-6)


def test_prompts_beyond_context_are_cut_to_it(tiny_gpt2):
    prof = analyze(tiny_gpt2, TEXT_60 * 2, map_size=None, progress=False)  # 120 characters, 64 positions
    assert prof.prompts[0].n_tokens == 64


def test_analyze_restores_sdpa(tiny):
    analyze(tiny, TEXT_24, map_size=None, progress=False)
    assert tiny.model.config._attn_implementation == "sdpa"


def test_bare_model_with_tokenizer(tiny_llama, profiles):
    prof = analyze(tiny_llama.model, TEXTS, tokenizer=tiny_llama.tokenizer, map_size=12, progress=False)
    ref_prof = profiles["tiny-llama"]
    np.testing.assert_allclose(prof.first_token_mass, ref_prof.first_token_mass, atol=1e-7, rtol=0)
    assert prof.model.n_heads == 4 and prof.model.adds_bos
    with pytest.raises(ConfigError, match="tokenizer"):
        analyze(tiny_llama.model, TEXTS, progress=False)


def test_prompt_objects_keep_names(tiny_llama):
    prof = analyze(tiny_llama, [Prompt("x", TEXT_24), Prompt("x", TEXT_60), "a plain string here"],
                   map_size=None, progress=False)
    assert [p.name for p in prof.prompts] == ["x", "x-2", "prompt-3"]
    assert prof.prompt("x-2").n_tokens == len(TEXT_60) + 1
    assert prof.prompt(2).name == "prompt-3"
    with pytest.raises(ConfigError, match="no prompt named 'nope'"):
        prof.prompt("nope")


# ------------------------------------------------------------------------------------ a real sink model


def test_sink_model_numbers(sink_llama, sink_profile, ref):
    exps = [_expected(ref, sink_llama, p) for p in (TEXT_60, TEXT_24 * 2)]
    np.testing.assert_allclose(sink_profile.first_token_mass, np.mean([e["ftm"] for e in exps], axis=0), atol=1e-6)
    np.testing.assert_allclose(sink_profile.sink_mass, np.mean([e["sm"] for e in exps], axis=0), atol=1e-6)
    assert np.all(sink_profile.first_token_mass > 0.95)
    assert sink_profile.sink_rate == 1.0


def test_sink_model_recommendation_and_positions(sink_profile):
    rec = sink_profile.recommendation
    assert rec.sinks == 1
    assert rec.evidence["heads_used"] == rec.evidence["heads_total"] == 12
    assert len(rec.evidence["curve"]) == K
    for res in sink_profile.prompts:
        top = res.sink_positions[0]
        assert (top.position, top.token, top.kind) == (0, "<bos>", "bos")
        assert top.received > 0.95
        assert top.vs_uniform > 10
        assert all(s.received < 0.05 for s in res.sink_positions[1:])


def test_sink_heads_and_strongest(sink_profile):
    heads = sink_profile.sink_heads()
    assert len(heads) == 12
    ftm = sink_profile.first_token_mass
    assert [h["first_token_mass"] for h in heads] == sorted(ftm.ravel().tolist(), reverse=True)
    for h in heads:
        assert type(h["layer"]) is int and type(h["head"]) is int
        assert h["first_token_mass"] == ftm[h["layer"], h["head"]]
    assert sink_profile.sink_heads(threshold=0.999) == []
    strongest = sink_profile.strongest_heads(3)
    assert strongest == [(h["layer"], h["head"]) for h in heads[:3]]
    assert all(type(x) is int for pair in strongest for x in pair)


# --------------------------------------------------------------------------------------------- export

REPORT_KEYS = {"schema", "model", "prompts", "settings", "first_token_mass", "sink_mass", "sink_rate",
               "sink_heads", "recommendation", "stream_eval"}
MODEL_KEYS = {"name", "source", "architecture", "n_layers", "n_heads", "n_kv_heads", "head_dim"}


@pytest.mark.parametrize("which", ["tiny-gemma3", "sink"])
def test_to_dict_schema(which, profiles, sink_profile):
    prof = sink_profile if which == "sink" else profiles[which]
    d = prof.to_dict()
    assert set(d) >= REPORT_KEYS
    assert d["schema"] == SCHEMA
    assert SCHEMA == "sinkscope.report/1"
    assert set(d["model"]) >= MODEL_KEYS
    assert d["model"]["n_layers"] == prof.model.n_layers and d["model"]["n_heads"] == prof.model.n_heads
    assert d["prompts"] == [{"name": p.name, "n_tokens": p.n_tokens, "capture": "maps", "beyond_context": False}
                            for p in prof.prompts]
    assert {"k_max", "dtype", "device"} <= set(d["settings"])
    assert d["settings"]["k_max"] == K and d["settings"]["dtype"] == "float32" and d["settings"]["device"] == "cpu"
    n_l, n_h = len(prof.layers), prof.model.n_heads
    assert len(d["first_token_mass"]) == n_l and all(len(r) == n_h for r in d["first_token_mass"])
    assert len(d["sink_mass"]) == n_l
    assert all(len(r) == n_h and all(len(c) == K for c in r) for r in d["sink_mass"])
    np.testing.assert_allclose(d["first_token_mass"], prof.first_token_mass, atol=1e-6)
    np.testing.assert_allclose(d["sink_mass"], prof.sink_mass, atol=1e-6)
    assert isinstance(d["sink_rate"], float) and d["sink_rate"] == prof.sink_rate
    assert d["sink_heads"] == prof.sink_heads()
    assert all({"layer", "head", "first_token_mass"} <= set(h) for h in d["sink_heads"])
    assert isinstance(d["recommendation"]["sinks"], int)
    assert isinstance(d["recommendation"]["method"], str) and isinstance(d["recommendation"]["evidence"], dict)
    assert d["stream_eval"] is None
    # JSON-serialisable, and to_json round-trips to the same document
    assert json.loads(json.dumps(d)) == d
    assert json.loads(prof.to_json()) == json.loads(json.dumps(d))


def test_sink_model_report_has_sink_heads(sink_profile):
    d = json.loads(sink_profile.to_json())
    assert len(d["sink_heads"]) == 12
    assert d["sink_rate"] == 1.0
    assert d["recommendation"]["sinks"] == 1
    assert d["sink_positions"][0]["positions"][0]["kind"] == "bos"


def test_to_dataframe(profiles):
    prof = profiles["tiny-llama"]
    df = prof.to_dataframe()
    assert len(df) == 3 * 4
    assert {"layer", "head", "first_token_mass", "entropy", "sink_head"} <= set(df.columns)
    assert [f"sink_mass_k{k}" for k in range(1, K + 1)] == [c for c in df.columns if c.startswith("sink_mass_k")]
    row = df[(df["layer"] == 2) & (df["head"] == 3)].iloc[0]
    assert row.first_token_mass == prof.first_token_mass[2, 3]
    assert row.sink_mass_k8 == prof.sink_mass[2, 3, 7]


def test_repr_html_mentions_recommendation(sink_profile, profiles):
    html = sink_profile._repr_html_()
    assert "recommended sinks: 1" in html
    assert "sink-llama" in html
    assert "<table>" in html and html.count("<tr>") == 1 + 5  # header + the five strongest sink heads
    assert "recommended sinks: " in profiles["tiny-gpt2"]._repr_html_()
    assert "recommended_sinks=1" in repr(sink_profile)


# ------------------------------------------------------------------------------------------ bad input


def test_prompt_shorter_than_k_plus_one(tiny_llama, tiny_gpt2):
    with pytest.raises(PromptError, match=r"has 8 tokens; it needs at least K \+ 1 = 9"):
        analyze(tiny_llama, "1234567", progress=False)  # <bos> + 7
    with pytest.raises(PromptError, match="has 8 tokens"):
        analyze(tiny_gpt2, "12345678", progress=False)  # no BOS
    assert analyze(tiny_gpt2, "123456789", map_size=None, progress=False).prompts[0].n_tokens == 9
    with pytest.raises(PromptError, match="has 4 tokens"):
        analyze(tiny_llama, [TEXT_60, "abc"], progress=False)


@pytest.mark.parametrize("max_tokens", [1, K])
def test_max_tokens_below_k_plus_one(tiny_llama, max_tokens):
    with pytest.raises((PromptError, ConfigError), match=str(K + 1)):  # every prompt is cut below K + 1 tokens
        analyze(tiny_llama, TEXT_60, max_tokens=max_tokens, progress=False)
    assert analyze(tiny_llama, TEXT_60, max_tokens=K + 1, map_size=None, progress=False).prompts[0].n_tokens == K + 1


def test_unknown_model_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        analyze("no-such-model", TEXT_60, progress=False)


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_max_tokens_not_positive(tiny_llama, max_tokens):
    with pytest.raises(ConfigError, match="max_tokens"):
        analyze(tiny_llama, TEXT_60, max_tokens=max_tokens, progress=False)


def test_max_tokens_beyond_context(tiny_gpt2, tiny_llama):
    with pytest.raises(ConfigError, match=r"beyond tiny-gpt2's context of 64 \(absolute positions"):
        analyze(tiny_gpt2, TEXT_60, max_tokens=65, progress=False)
    # Rotary positions go on: allowed, and each prompt says whether it went past the context.
    long_text = TEXT_60 * 5  # 301 tokens with <bos>, past the tiny Llama's 256
    profile = analyze(tiny_llama, [long_text, TEXT_60], max_tokens=10_000, map_size=None, progress=False)
    assert [(p.n_tokens, p.beyond_context) for p in profile.prompts] == [(301, True), (61, False)]
    assert [p["beyond_context"] for p in profile.to_dict()["prompts"]] == [True, False]
    # Without max_tokens a prompt is cut to the context, as before.
    assert analyze(tiny_llama, long_text, map_size=None, progress=False).prompts[0].n_tokens == 256


@pytest.mark.parametrize("layers", [[3], [-4], [0, 7], []])
def test_layers_out_of_range(tiny_llama, layers):
    with pytest.raises(ConfigError, match=r"out of range|must not be empty"):
        analyze(tiny_llama, TEXT_60, layers=layers, progress=False)
    assert tiny_llama.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("k_max", [0, -1, 2.5])
def test_bad_k_max(tiny_llama, k_max):
    with pytest.raises(ConfigError, match="k_max"):
        analyze(tiny_llama, TEXT_60, k_max=k_max, progress=False)


@pytest.mark.parametrize("share", [0, -0.1, 1.01])
def test_bad_share(tiny_llama, share):
    with pytest.raises(ConfigError, match="share"):
        analyze(tiny_llama, TEXT_60, share=share, progress=False)


@pytest.mark.parametrize("prompts", [[], "", "   \n", ["ok text that is long enough", " "]])
def test_empty_prompts(tiny_llama, prompts):
    with pytest.raises(PromptError):
        analyze(tiny_llama, prompts, progress=False)


# ------------------------------------------------------------------------------ recommend (hand-made)


def _arrays(curves: list[list[float]], ftm: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    sm = np.array(curves, dtype=float).reshape(len(curves), 1, -1)  # [L, H=1, K]
    f = sm[..., 0] if ftm is None else np.array(ftm, dtype=float).reshape(-1, 1)
    return sm, f


def test_recommend_one_sink_token():
    sm, ftm = _arrays([[0.9] * 8, [0.8] * 8, [0.01 * k for k in range(1, 9)]])
    rec = recommend_from_attention(sm, ftm)
    assert rec.sinks == 1
    assert rec.evidence["heads_used"] == 2 and rec.evidence["heads_total"] == 3
    assert rec.evidence["curve"] == pytest.approx([0.85] * 8)
    assert rec.evidence["mass_at_recommended"] == pytest.approx(0.85)
    assert rec.evidence["heads_basis"] == "first_token_mass > threshold"


def test_recommend_mass_spread_over_four_tokens():
    curve = [0.2 * min(k, 4) for k in range(1, 9)]  # 0.2 on each of tokens 0..3, nothing after
    sm, ftm = _arrays([curve, curve])
    rec = recommend_from_attention(sm, ftm)
    assert rec.sinks == 4
    assert "no head above threshold on the first token alone" in rec.evidence["heads_basis"]
    assert rec.evidence["target"] == pytest.approx(0.95 * 0.8)
    assert rec.evidence["mass_at_recommended"] == pytest.approx(0.8)


def test_recommend_no_sinks():
    sm, ftm = _arrays([[0.02 * k for k in range(1, 9)]] * 3)
    rec = recommend_from_attention(sm, ftm)
    assert rec.sinks == 0
    assert rec.evidence["heads_used"] == 0
    assert "note" in rec.evidence
    assert len(rec.evidence["curve"]) == 8


def test_recommend_share_parameter():
    curve = [0.2 * min(k, 4) for k in range(1, 9)]
    sm, ftm = _arrays([curve], ftm=[0.2])
    assert recommend_from_attention(sm, ftm, share=0.5).sinks == 2  # 0.4 of 0.8
    assert recommend_from_attention(sm, ftm, share=0.74).sinks == 3  # 0.592 -> needs 0.6
    assert recommend_from_attention(sm, ftm, share=0.75).sinks == 3  # exactly 0.6 counts
    assert recommend_from_attention(sm, ftm, share=1.0).sinks == 4
    assert recommend_from_attention(sm, ftm, share=0.2).sinks == 1
    assert "50%" in recommend_from_attention(sm, ftm, share=0.5).method


def test_recommend_threshold_parameter():
    curve = [0.25, 0.5, 0.5, 0.5]
    sm, ftm = _arrays([curve])
    assert recommend_from_attention(sm, ftm, threshold=0.3).evidence["heads_basis"].startswith("sink_mass")
    assert recommend_from_attention(sm, ftm, threshold=0.2).evidence["heads_basis"] == "first_token_mass > threshold"
    assert recommend_from_attention(sm, ftm, threshold=0.2).sinks == 2
    assert recommend_from_attention(sm, ftm, threshold=0.6).sinks == 0


def test_recommend_ignores_non_sink_heads():
    sink = [0.6, 0.6, 0.6, 0.6]
    diffuse = [0.1, 0.2, 0.3, 0.4]  # below threshold on the first token: must not pull the curve
    sm = np.array([[sink, diffuse]])
    rec = recommend_from_attention(sm, sm[..., 0])
    assert rec.sinks == 1 and rec.evidence["heads_used"] == 1


def test_recommend_is_json_ready():
    sm, ftm = _arrays([[0.9] * 8])
    rec = recommend_from_attention(sm, ftm)
    assert json.loads(json.dumps(rec.to_dict())) == rec.to_dict()
    assert set(rec.to_dict()) == {"sinks", "method", "evidence"}


def test_analyze_uses_no_grad_and_leaves_model_in_eval(tiny_llama):
    analyze(tiny_llama, TEXT_24, map_size=None, progress=False)
    assert not tiny_llama.model.training
    assert all(p.grad is None for p in tiny_llama.model.parameters())
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------------------------- smaller helpers


def test_prompt_lookup_by_index(profiles):
    prof = profiles["tiny-llama"]
    assert prof.prompt(-1).name == "prompt-2"
    for bad in (2, -3):
        with pytest.raises(ConfigError, match="out of range"):
            prof.prompt(bad)


def test_extra_keys_never_replace_contract_keys(profiles):
    prof = profiles["tiny-llama"]
    prof.extra = {"schema": "other", "sink_rate": -1, "custom": {"a": 1}}
    try:
        d = prof.to_dict()
    finally:
        prof.extra = {}
    assert d["schema"] == SCHEMA
    assert d["sink_rate"] == prof.sink_rate
    assert d["custom"] == {"a": 1}


def test_round_writes_nan_as_null():
    from sinkscope.analysis import _round

    assert _round(np.array([0.1234567891, np.nan, np.inf])) == [0.123457, None, None]
    assert json.dumps(_round(np.array([[np.nan]]))) == "[[null]]"


def test_token_texts_shows_raw_piece_for_partial_characters():
    from sinkscope.analysis import token_texts

    class Tok:
        def decode(self, ids):
            return {0: "a", 1: "\ufffd", 2: " b"}[ids[0]]

        def convert_ids_to_tokens(self, i):
            return {1: "\u00e2\u0122"}[i]

    assert token_texts(Tok(), [0, 1, 2]) == ["a", "\u00e2\u0122", " b"]


def test_memory_guard(tiny_llama, monkeypatch):
    from sinkscope import analysis

    t = len(TEXT_60) + 1
    need = analysis.capture_bytes(tiny_llama.spec, t)
    assert need == 4 * tiny_llama.spec.n_heads * t * t * 4
    free = need  # 0.9 x free is not enough
    monkeypatch.setattr(analysis, "_available_bytes", lambda device: free)
    with pytest.raises(ConfigError, match=r"pass --max-tokens (\d+) or less") as info:
        analyze(tiny_llama, TEXT_60, progress=False)
    fits = int(str(info.value).rsplit("--max-tokens ", 1)[1].split()[0])
    assert fits < t
    assert analysis.capture_bytes(tiny_llama.spec, fits) <= 0.9 * free
    assert analysis.capture_bytes(tiny_llama.spec, fits + 1) > 0.9 * free
    monkeypatch.setattr(analysis, "_available_bytes", lambda device: None)  # unknown: no guessing
    assert analyze(tiny_llama, TEXT_60, map_size=None, progress=False).prompts[0].n_tokens == t


def test_recommend_ignores_background_mass():
    """One clear sink plus the background every token gets: only the sink is worth pinning."""
    per_token = np.array([0.73] + [0.008] * 7)
    sm = np.broadcast_to(np.cumsum(per_token), (2, 3, 8)).copy()
    ftm = sm[..., 0]
    assert recommend_from_attention(sm, ftm).sinks == 4  # raw mass: 0.746 at k = 3 < 95% of 0.786
    rec = recommend_from_attention(sm, ftm, chance=0.008)
    assert rec.sinks == 1
    assert rec.evidence["chance"] == 0.008
    np.testing.assert_allclose(rec.evidence["excess_curve"], [0.722] * 8, atol=1e-9)
    np.testing.assert_allclose(rec.evidence["target"], 0.95 * 0.722)
    # A second real sink on token 2 stays visible above the background.
    per_token[2] = 0.2
    sm = np.broadcast_to(np.cumsum(per_token), (2, 3, 8)).copy()
    assert recommend_from_attention(sm, sm[..., 0], chance=0.008).sinks == 3


def test_analyze_passes_chance_of_its_prompts(tiny_llama):
    prof = analyze(tiny_llama, [TEXT_60, TEXT_24 * 2], k_max=4, map_size=None, progress=False)
    expected = np.mean([np.mean([1 / (q + 1) for q in range(4, p.n_tokens)]) for p in prof.prompts])
    assert prof.recommendation.evidence["chance"] == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------- learned sinks (gpt-oss)


def test_recommend_without_learned_sinks_adds_no_learned_evidence():
    sm, ftm = _arrays([[0.9] * 8, [0.01 * k for k in range(1, 9)]])
    for rec in (recommend_from_attention(sm, ftm), recommend_from_attention(sm, ftm, learned_sink_mass=None)):
        assert rec.sinks == 1
        assert not [k for k in rec.evidence if k.startswith("learned")]
        assert "learned" not in rec.method


def test_recommend_learned_sink_carries_the_excess():
    """No head parks on the first tokens, one parks 0.8 on its learned sink: 0 pinned tokens, and why."""
    sm, ftm = _arrays([[0.02 * k for k in range(1, 9)]] * 3)
    learned = np.array([[0.8], [0.1], [0.05]])
    rec = recommend_from_attention(sm, ftm, learned_sink_mass=learned)
    assert rec.sinks == 0
    ev = rec.evidence
    assert ev["heads_used"] == 0
    assert ev["learned_sink_carries_excess"] is True
    assert ev["learned_sink_heads"] == 1
    assert ev["learned_sink_mass_mean"] == pytest.approx((0.8 + 0.1 + 0.05) / 3)
    assert ev["learned_sink_mass_by_layer"] == pytest.approx([0.8, 0.1, 0.05])
    assert "learned sink takes the excess" in ev["note"] and "no pinned token" in ev["note"]
    assert "eval-stream" in ev["note"]
    assert "1 of 3 heads park more than 0.3" in ev["learned_sink_note"]
    assert "learned sinks need no cache slot" in rec.method
    assert json.loads(json.dumps(rec.to_dict())) == rec.to_dict()


def test_recommend_learned_sink_replaces_the_spread_out_fallback():
    """Heads with 0.2 on each of tokens 0..3 (no first-token sink): without learned sinks the fallback keeps 4;
    when a head parks 0.7 on its learned sink, that carries the excess and nothing is pinned."""
    curve = [0.2 * min(k, 4) for k in range(1, 9)]
    sm, ftm = _arrays([curve, curve, [0.01 * k for k in range(1, 9)]])
    assert recommend_from_attention(sm, ftm, chance=0.05).sinks == 4  # unchanged without learned sinks
    rec = recommend_from_attention(sm, ftm, chance=0.05, learned_sink_mass=np.array([[0.1], [0.0], [0.7]]))
    assert rec.sinks == 0
    ev = rec.evidence
    assert ev["learned_sink_carries_excess"] is True and ev["heads_used"] == 0
    assert "no spread-out fallback" in ev["heads_basis"]
    assert ev["spread_out_heads_skipped"] == 2
    assert ev["spread_out_excess"] == pytest.approx(4 * (0.2 - 0.05))  # the two heads' above-chance first-8 mass
    assert "2 heads put more than 0.3 on the first 8 tokens together (0.600 of it above chance)" in ev["note"]
    # a learned sink below the threshold carries nothing: the fallback runs as before
    low = recommend_from_attention(sm, ftm, chance=0.05, learned_sink_mass=np.array([[0.1], [0.0], [0.2]]))
    assert low.sinks == 4 and low.evidence["learned_sink_carries_excess"] is False
    assert "spread_out_heads_skipped" not in low.evidence


def test_recommend_learned_sinks_below_threshold_change_nothing_but_evidence():
    sm, ftm = _arrays([[0.02 * k for k in range(1, 9)]] * 2)
    rec = recommend_from_attention(sm, ftm, learned_sink_mass=np.array([[0.2], [0.3]]))  # 0.3 is not above 0.3
    assert rec.sinks == 0
    assert rec.evidence["learned_sink_heads"] == 0
    assert rec.evidence["learned_sink_carries_excess"] is False
    assert rec.evidence["note"] == "no head parks attention on the first tokens"


def test_recommend_with_learned_sinks_counts_the_first_token_mass_that_remains():
    """Token sink heads are chosen and counted exactly as without learned sinks; the learned sink adds evidence."""
    per_token = np.array([0.5, 0.2] + [0.01] * 6)  # a sink on tokens 0 and 1 besides the learned sink
    sm = np.broadcast_to(np.cumsum(per_token), (2, 2, 8)).copy()
    sm[1, 1] = np.cumsum([0.05] * 8)  # one head parks nothing on its first tokens...
    learned = np.array([[0.2, 0.25], [0.25, 0.6]])  # ...but 0.6 on the learned sink
    ftm = sm[..., 0]
    plain = recommend_from_attention(sm, ftm, chance=0.01)
    rec = recommend_from_attention(sm, ftm, chance=0.01, learned_sink_mass=learned)
    assert rec.sinks == plain.sinks == 2
    assert rec.evidence["heads_used"] == 3
    for key in ("curve", "excess_curve", "target", "mass_at_recommended", "heads_basis"):
        assert rec.evidence[key] == plain.evidence[key]
    np.testing.assert_allclose(rec.evidence["curve"], np.cumsum(per_token), atol=1e-6)
    assert rec.evidence["learned_sink_heads"] == 1
    assert rec.evidence["learned_sink_carries_excess"] is False
    assert rec.evidence["learned_sink_mass_mean"] == pytest.approx(1.3 / 4)
    assert rec.evidence["learned_sink_mass_by_layer"] == pytest.approx([0.225, 0.425])
    assert "note" not in rec.evidence
    assert "first-token mass that remains" in rec.evidence["learned_sink_note"]
    assert rec.method.startswith(plain.method) and "learned sinks" in rec.method


def test_recommend_refuses_learned_sink_mass_of_another_shape():
    sm, ftm = _arrays([[0.9] * 8, [0.8] * 8])
    with pytest.raises(ConfigError, match="learned_sink_mass has shape"):
        recommend_from_attention(sm, ftm, learned_sink_mass=np.zeros((2, 3)))


LEARNED = [np.array([[0.1, 0.6, 0.0, 0.2], [0.5, 0.05, 0.9, 0.3], [0.0, 0.0, 0.3, 0.1]]),
           np.array([[0.3, 0.4, 0.0, 0.2], [0.3, 0.15, 0.7, 0.1], [0.2, 0.0, 0.1, 0.1]])]
LEARNED_MEAN = np.array([[0.2, 0.5, 0.0, 0.2], [0.4, 0.1, 0.8, 0.2], [0.1, 0.0, 0.2, 0.1]])  # by hand


def _with_learned(prof):
    """The tiny Llama's profile as the capture of a model with learned sinks would give it (hand-made values)."""
    from dataclasses import replace

    prompts = [replace(p, learned_sink_mass=a) for p, a in zip(prof.prompts, LEARNED, strict=True)]
    return replace(prof, prompts=prompts)


def test_profile_without_learned_sinks(profiles):
    prof = profiles["tiny-llama"]
    assert prof.learned_sink_mass is None and not prof.has_learned_sinks
    assert prof.learned_sink_heads() == []
    assert prof.to_dict()["learned_sink_mass"] is None
    assert "learned_sink_mass" not in prof.to_dataframe().columns
    assert "learned" not in prof._repr_html_()
    assert not [k for k in prof.recommendation.evidence if k.startswith("learned")]


def test_profile_learned_sink_mass_is_the_mean_over_prompts(profiles):
    prof = _with_learned(profiles["tiny-llama"])
    assert prof.has_learned_sinks
    np.testing.assert_allclose(prof.learned_sink_mass, LEARNED_MEAN, atol=1e-12)
    # heads above 0.3 on the learned sink, strongest first
    assert [(h["layer"], h["head"]) for h in prof.learned_sink_heads()] == [(1, 2), (0, 1), (1, 0)]
    assert prof.learned_sink_heads()[0]["learned_sink_mass"] == pytest.approx(0.8)
    d = json.loads(prof.to_json())
    np.testing.assert_allclose(d["learned_sink_mass"], LEARNED_MEAN, atol=1e-6)
    assert [len(r) for r in d["learned_sink_mass"]] == [4, 4, 4]
    assert set(d["model"]) == set(profiles["tiny-llama"].to_dict()["model"])  # the model block is unchanged
    df = prof.to_dataframe()
    row = df[(df["layer"] == 1) & (df["head"] == 2)].iloc[0]
    assert row.learned_sink_mass == pytest.approx(0.8)
    assert row.first_token_mass == prof.first_token_mass[1, 2]
    html = prof._repr_html_()
    assert "learned sinks: mean learned-sink mass 0.233, 3 of 12 heads" in html  # 2.8 / 12
    assert "<th>learned-sink mass</th>" in html
    # only prompts that measured it count (one model: all or none; a mix is averaged over those that have it)
    from dataclasses import replace

    half = replace(prof, prompts=[prof.prompts[0], replace(prof.prompts[1], learned_sink_mass=None)])
    np.testing.assert_allclose(half.learned_sink_mass, LEARNED[0])


def test_analyze_passes_the_learned_sink_mass_to_the_recommendation(tiny_llama, monkeypatch):
    """As capture will fill it for gpt-oss: analyze() gives the recommendation the mean over prompts."""
    from sinkscope import analysis

    real, given = analysis._analyze_one, iter(LEARNED)

    def with_learned(*args, **kwargs):
        res = real(*args, **kwargs)
        res.learned_sink_mass = next(given)
        return res

    monkeypatch.setattr(analysis, "_analyze_one", with_learned)
    prof = analyze(tiny_llama, [TEXT_60, TEXT_24 * 2], map_size=None, progress=False)
    ev = prof.recommendation.evidence
    assert ev["learned_sink_mass_mean"] == pytest.approx(LEARNED_MEAN.mean())
    assert ev["learned_sink_mass_by_layer"] == pytest.approx(LEARNED_MEAN.mean(axis=1))
    assert ev["learned_sink_heads"] == 3
    np.testing.assert_allclose(prof.to_dict()["learned_sink_mass"], LEARNED_MEAN, atol=1e-6)
