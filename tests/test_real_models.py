"""Integration on the embedded models (SmolLM2-135M, Gemma-3-270M): every number vs an independent computation.

The converted weights are cached in ``$SINKSCOPE_CACHE`` if set, else in the repo's ``.cache/sinkscope-test``
(git-ignored), so only the first run pays for the conversion (~25 s SmolLM2, ~65 s Gemma-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Reference

import sinkscope
from sinkscope.prompts import sample_prompts

pytestmark = pytest.mark.real

K = 8
ATOL = 1e-4


def _prompts(*names: str):
    by = {p.name: p for p in sample_prompts()}
    return [by[n] for n in names]


def _reference(lm, text: str, max_tokens: int) -> dict[str, np.ndarray]:
    """Eager attention with output_attentions=True on the same weights, metrics in numpy."""
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    model = lm.model
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    maps = [a[0].double().numpy() for a in out.attentions]
    return {
        "ids": ids[0].tolist(),
        "maps": maps,
        "ftm": np.stack([Reference.first_token_mass(a, K) for a in maps]),
        "sm": np.stack([Reference.sink_mass(a, K) for a in maps]),
        "ent": np.stack([Reference.entropy(a, K) for a in maps]),
    }


def _check_against_reference(lm, profile, prompts, max_tokens):
    refs = [_reference(lm, p.text, max_tokens) for p in prompts]
    for res, exp in zip(profile.prompts, refs, strict=True):
        assert res.n_tokens == len(exp["ids"]) == max_tokens
        np.testing.assert_allclose(res.first_token_mass, exp["ftm"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(res.sink_mass, exp["sm"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(res.entropy, exp["ent"], atol=ATOL, rtol=0)
        for text, i in zip(res.tokens, exp["ids"], strict=True):
            decoded = lm.tokenizer.decode([i])
            # half of a multi-byte character decodes to U+FFFD; the report shows the raw piece instead
            assert text == (decoded if "\ufffd" not in decoded else lm.tokenizer.convert_ids_to_tokens(i))
    np.testing.assert_allclose(profile.first_token_mass, np.mean([e["ftm"] for e in refs], axis=0), atol=ATOL)
    np.testing.assert_allclose(profile.sink_mass, np.mean([e["sm"] for e in refs], axis=0), atol=ATOL)
    np.testing.assert_allclose(profile.entropy, np.mean([e["ent"] for e in refs], axis=0), atol=ATOL)
    return refs


# ------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_spec(smollm2):
    s = smollm2.spec
    assert (s.name, s.source) == ("smollm2-135m", "smollm2-135m")
    assert (s.architecture, s.model_type) == ("LlamaForCausalLM", "llama")
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == (30, 9, 3, 64)
    assert s.adds_bos is False
    assert (s.positional, s.max_positions) == ("rope", 8192)
    assert (s.sliding_window, s.layer_types) == (None, None)
    assert (s.dtype, s.device) == ("float32", "cpu")
    assert smollm2.model.config._attn_implementation == "sdpa"


def test_smollm2_metrics_match_eager_reference(smollm2):
    prompts = _prompts("prose", "code")
    profile = sinkscope.analyze(smollm2, prompts, max_tokens=256, map_size=32, progress=False)
    assert smollm2.model.config._attn_implementation == "sdpa"
    assert profile.first_token_mass.shape == (30, 9)
    assert profile.sink_mass.shape == (30, 9, K)
    refs = _check_against_reference(smollm2, profile, prompts, 256)

    # pooled maps for display come from the same probabilities
    att = profile.prompts[0].attention
    for layer in (0, 15, 29):
        np.testing.assert_allclose(att.maps[layer], Reference.pool(refs[0]["maps"][layer], att.bins), atol=ATOL)

    # sink positions: the received mass of the top positions, recomputed over all 30 x 9 heads
    res, maps = profile.prompts[0], refs[0]["maps"]
    received = sum(Reference.received(a, K)[0] for a in maps)
    _, queries = Reference.received(maps[0], K)
    for s in res.sink_positions:
        assert s.received == pytest.approx(received[s.position] / (queries[s.position] * 270), abs=ATOL)
        assert s.token == res.tokens[s.position]

    rec = profile.recommendation
    assert isinstance(rec.sinks, int) and 1 <= rec.sinks <= K
    assert len(rec.evidence["curve"]) == K
    assert rec.evidence["heads_used"] > 0
    d = profile.to_dict()
    assert d["model"]["n_layers"] == 30 and len(d["first_token_mass"]) == 30
    assert d["recommendation"]["sinks"] == rec.sinks


def test_smollm2_first_token_is_the_sink(smollm2):
    """SmolLM2 (no BOS) parks its attention on the first token: it must top the received-mass ranking."""
    profile = sinkscope.analyze(smollm2, _prompts("poem"), max_tokens=128, map_size=None, progress=False)
    top = profile.prompts[0].sink_positions[0]
    assert top.position == 0
    assert top.kind != "bos"  # SmolLM2's tokenizer adds no BOS
    assert top.vs_uniform > 3
    assert profile.sink_rate > 0.3


# ------------------------------------------------------------------------------------------- Gemma-3


def test_gemma3_spec_and_sliding_layers(gemma3):
    s = gemma3.spec
    assert s.model_type == "gemma3_text"
    assert s.n_layers == 18
    assert s.sliding_window == 512
    assert s.adds_bos is True
    assert s.positional == "rope"
    full = [i for i, t in enumerate(s.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17]
    assert all(t == "sliding_attention" for i, t in enumerate(s.layer_types) if i not in full)

    (prompt,) = _prompts("long-document")
    profile = sinkscope.analyze(gemma3, prompt, max_tokens=700, map_size=None, progress=False)
    assert gemma3.model.config._attn_implementation == "sdpa"
    assert profile.prompts[0].tokens[0] == gemma3.tokenizer.bos_token
    assert all((sp.kind == "bos") == (sp.position == 0) for sp in profile.prompts[0].sink_positions)
    refs = _check_against_reference(gemma3, profile, [prompt], 700)

    # the check means something: queries past the window can't see token 0 in sliding layers
    maps = refs[0]["maps"]
    for i, kind in enumerate(s.layer_types):
        tail = maps[i][:, 512:, 0]
        if kind == "sliding_attention":
            assert np.all(tail == 0)
        else:
            assert np.all(tail > 0)
    rec = profile.recommendation
    assert isinstance(rec.sinks, int) and 0 <= rec.sinks <= K


# ------------------------------------------------------------------------------------------- statistics mode


def _check_positions_and_maps(profile, refs, n_pairs):
    res, maps = profile.prompts[0], refs[0]["maps"]
    received = sum(Reference.received(a, K)[0] for a in maps)
    _, queries = Reference.received(maps[0], K)
    for s in res.sink_positions:
        assert s.received == pytest.approx(received[s.position] / (queries[s.position] * n_pairs), abs=ATOL)
    att = res.attention
    for layer in (0, len(maps) // 2, len(maps) - 1):
        np.testing.assert_allclose(att.maps[layer], Reference.pool(maps[layer], att.bins), atol=ATOL)


def test_smollm2_statistics_mode_matches_eager_reference(smollm2):
    """Statistics mode never forms a T x T map, yet gives the eager maps' numbers (design.md, 1e-4)."""
    prompts = _prompts("long-document")
    profile = sinkscope.analyze(smollm2, prompts, max_tokens=700, map_size=48, mode="stats", progress=False)
    assert profile.prompts[0].capture == "stats"
    assert smollm2.model.config._attn_implementation == "sdpa"
    refs = _check_against_reference(smollm2, profile, prompts, 700)
    _check_positions_and_maps(profile, refs, 30 * 9)


def test_gemma3_statistics_mode_matches_eager_reference(gemma3):
    """Past Gemma-3's 512-token window the sliding layers get transformers' mask: applied block by block."""
    prompts = _prompts("long-document")
    profile = sinkscope.analyze(gemma3, prompts, max_tokens=700, map_size=48, mode="stats", progress=False)
    assert gemma3.model.config._attn_implementation == "sdpa"
    refs = _check_against_reference(gemma3, profile, prompts, 700)
    _check_positions_and_maps(profile, refs, 18 * 4)


def test_smollm2_long_prompt_goes_to_statistics_mode(smollm2):
    """Past 1024 tokens analyze switches by itself, and gives what whole maps give."""
    (prompt,) = _prompts("long-document")
    auto = sinkscope.analyze(smollm2, prompt, max_tokens=2048, progress=False)
    assert (auto.prompts[0].n_tokens, auto.prompts[0].capture) == (2048, "stats")
    assert auto.settings["capture"].startswith("statistics mode")
    maps = sinkscope.analyze(smollm2, prompt, max_tokens=2048, mode="maps", progress=False)
    np.testing.assert_allclose(auto.first_token_mass, maps.first_token_mass, atol=ATOL, rtol=0)
    np.testing.assert_allclose(auto.sink_mass, maps.sink_mass, atol=ATOL, rtol=0)
    np.testing.assert_allclose(auto.entropy, maps.entropy, atol=ATOL, rtol=0)
    np.testing.assert_allclose(auto.prompts[0].attention.maps, maps.prompts[0].attention.maps, atol=ATOL)
    assert [s.position for s in auto.prompts[0].sink_positions] == [s.position for s in maps.prompts[0].sink_positions]
    assert auto.recommendation.sinks == maps.recommendation.sinks


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_models_check_row_is_exact_on_the_embedded_models(name, request):
    """``sinkscope models --check``'s checks on the real weights: every mode exact (Gemma-3's cache check
    streams past its 512-token sliding window on the model cut to its first layer)."""
    from sinkscope.checks import CHECKS, EXACT, check_model
    from sinkscope.scheme import decoder_layers

    lm = request.getfixturevalue(name)
    row = check_model(lm.model)
    assert {c: r.status for c, r in row.results.items()} == dict.fromkeys(CHECKS, EXACT), row.results
    assert lm.model.config.num_hidden_layers == lm.spec.n_layers  # the cut-down model was restored
    assert len(decoder_layers(lm.model)) == lm.spec.n_layers
