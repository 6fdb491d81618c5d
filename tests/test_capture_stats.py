"""Statistics mode (sinkscope.capture_stats, metrics.ChunkedStats) against transformers' own eager maps."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import TEXT_24, TEXT_60, build_llama, char_vocab, loaded
from families import build as build_family
from families import token_ids

from sinkscope import _native, analyze, capture_stats
from sinkscope.capture import STATS_IMPLEMENTATION, find_attention_modules, pool_bins
from sinkscope.errors import CaptureError, ConfigError
from sinkscope.metrics import ChunkedStats

K = 8
LONG = TEXT_60 * 3 + TEXT_24  # 205 characters: past the tiny Gemma-3's sliding window of 4 many times over


def _stats(lm, ids, **kw):
    with capture_stats(lm.model, k_max=K, **kw) as cap, torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)
    return cap


def _assert_matches(stats, a, ref, bins=None):
    np.testing.assert_allclose(stats.first_token_mass, ref.first_token_mass(a, K), atol=1e-6)
    np.testing.assert_allclose(stats.sink_mass, ref.sink_mass(a, K), atol=1e-6)
    np.testing.assert_allclose(stats.entropy, ref.entropy(a, K), atol=1e-5)
    total, queries = ref.received(a, K)
    np.testing.assert_allclose(stats.received.total, total, atol=1e-5)
    np.testing.assert_array_equal(stats.received.queries, queries)
    if bins is not None:
        assert stats.bins == bins
        np.testing.assert_allclose(stats.pooled, ref.pool(a, bins), atol=1e-6)


@pytest.fixture(params=["native", "torch"])
def row_pass(request, monkeypatch):
    """Each CPU row pass in turn: the fused C library (``sinkscope._native``) and the torch ops."""
    if request.param == "torch":
        monkeypatch.setattr(_native, "library", lambda: None)
    elif _native.library() is None:
        # A machine with a C compiler must build it: failing here beats a silent fall-back to the slow path.
        assert not shutil.which("cc") and not shutil.which("gcc"), _native.unavailable()
        pytest.skip(f"no native row pass here: {_native.unavailable()}")
    return request.param


# Block sizes: one row per block (the smallest a block can be), a few rows, and the whole prompt at once.
@pytest.mark.parametrize("block_bytes", [1, 20_000, 1 << 30])
def test_stats_equal_eager_maps(tiny, ref, block_bytes, row_pass):
    ids = ref.encode(tiny, LONG, tiny.spec.max_positions)
    maps = ref.eager_attentions(tiny.model, ids)
    cap = _stats(tiny, ids, map_size=12, block_bytes=block_bytes)
    assert sorted(cap.stats) == cap.layers == list(range(tiny.spec.n_layers))
    assert cap.tokens == ids.shape[1]
    bins = pool_bins(ids.shape[1], 12)
    for layer, a in enumerate(maps):
        _assert_matches(cap.stats[layer], a, ref, bins)


def test_unpooled_short_prompt_keeps_every_cell(tiny_llama, ref):
    """At or below map_size the "pooled" map is the map itself, as with pool_map."""
    ids = ref.encode(tiny_llama, TEXT_24)
    maps = ref.eager_attentions(tiny_llama.model, ids)
    cap = _stats(tiny_llama, ids, map_size=64)
    np.testing.assert_allclose(cap.stats[1].pooled, maps[1], atol=1e-6)


def test_model_output_is_unchanged(tiny, row_pass):
    """The layer outputs that statistics mode computes itself give the model's own logits."""
    ids = tiny.tokenizer(LONG, return_tensors="pt").input_ids[:, : tiny.spec.max_positions]
    with torch.no_grad():
        expected = tiny.model(input_ids=ids, use_cache=False).logits
        with capture_stats(tiny.model, k_max=K, block_bytes=5000):
            got = tiny.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_implementation_restored_and_registry_cleared(tiny_llama):
    import importlib

    capture_module = importlib.import_module("sinkscope.capture")  # the package's ``capture`` is the function
    model = tiny_llama.model
    assert model.config._attn_implementation == "sdpa"
    ids = tiny_llama.tokenizer(TEXT_60, return_tensors="pt").input_ids
    with capture_stats(model, k_max=K):
        assert model.config._attn_implementation == STATS_IMPLEMENTATION
        with torch.no_grad():
            model(input_ids=ids)
    assert model.config._attn_implementation == "sdpa"
    assert capture_module._jobs == {}
    with pytest.raises(RuntimeError, match="boom"), capture_stats(model, k_max=K):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and capture_module._jobs == {}
    # Outside a block the registered function is plain SDPA: a model left on it still runs.
    model.set_attn_implementation(STATS_IMPLEMENTATION)
    try:
        with torch.no_grad():
            out = model(input_ids=ids).logits
    finally:
        model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(out, model(input_ids=ids).logits)


def test_layer_selection_and_callback(tiny_llama, ref):
    ids = ref.encode(tiny_llama, TEXT_60)
    maps = ref.eager_attentions(tiny_llama.model, ids)
    seen = []
    cap = _stats(tiny_llama, ids, layers=[-1, 0], on_layer=lambda layer, st: seen.append(layer))
    assert cap.layers == [0, 2] and sorted(cap.stats) == [0, 2] and seen == [0, 2]
    _assert_matches(cap.stats[2], maps[2], ref)
    assert cap.stats[0].pooled is None and cap.stats[0].bins is None
    with pytest.raises(CaptureError, match="layer 5 out of range"):
        _stats(tiny_llama, ids, layers=[5])


def test_refuses_batches_and_kv_caches(tiny_llama):
    ids = tiny_llama.tokenizer(TEXT_60, return_tensors="pt").input_ids
    with pytest.raises(CaptureError, match="one sequence per forward pass"), capture_stats(tiny_llama.model), \
            torch.no_grad():
        tiny_llama.model(input_ids=ids.repeat(2, 1))
    with torch.no_grad():
        past = tiny_llama.model(input_ids=ids[:, :20], use_cache=True).past_key_values
    with pytest.raises(CaptureError, match="without a KV cache"), capture_stats(tiny_llama.model), torch.no_grad():
        tiny_llama.model(input_ids=ids[:, 20:], past_key_values=past, use_cache=True)
    assert tiny_llama.model.config._attn_implementation == "sdpa"


def test_refuses_bad_block():
    with pytest.raises(CaptureError, match="block_bytes"), capture_stats(build_llama(), block_bytes=0):
        pass


def test_nested_blocks_on_one_model_are_refused(tiny_llama):
    with capture_stats(tiny_llama.model), pytest.raises(CaptureError, match="already inside"), \
            capture_stats(tiny_llama.model):
        pass


def test_module_that_bypasses_the_interface_is_reported(tiny_llama, monkeypatch):
    """A model whose attention never calls the registered function (custom code) gets a clear error."""
    ids = tiny_llama.tokenizer(TEXT_60, return_tensors="pt").input_ids
    attn = find_attention_modules(tiny_llama.model)[1]
    monkeypatch.setattr(attn, "forward", lambda *a, **kw: (torch.zeros_like(kw["hidden_states"]), None))
    with pytest.raises(CaptureError, match=r"layers \[1\] never reached"), capture_stats(tiny_llama.model), \
            torch.no_grad():
        tiny_llama.model(input_ids=ids)


# ------------------------------------------------------------------------------------------ ChunkedStats


def _random_causal(h: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(h, t, t, generator=g) * 3
    scores[:, 0, 0] += 0  # keep shape obvious
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), -1)


def test_chunked_stats_any_block_order(ref):
    probs = _random_causal(3, 40)
    bins = pool_bins(40, 10)
    acc = ChunkedStats(3, 40, K, bins=bins)
    for q0, q1 in [(30, 40), (0, 3), (3, 17), (17, 30)]:  # out of order; keys cropped to each block's end
        acc.add(probs[:, q0:q1, :q1], q0)
    st = acc.finish()
    _assert_matches(st, probs.double().numpy(), ref, bins)


def test_chunked_stats_from_scores(ref, row_pass):
    """add_scores forms the probabilities itself: causal rows need no mask, masked rows a finite fill."""
    g = torch.Generator().manual_seed(1)
    t, bins = 50, pool_bins(50, 9)
    scores = torch.randn(3, t, t, generator=g) * 4
    scores[:, 20:, 3] += 9  # a sink at position 3
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    window = causal | torch.ones(t, t, dtype=torch.bool).tril(-6)  # sliding window of 6, as Gemma-3's layers
    for is_causal, masked in [(True, causal), (False, window)]:
        probs = torch.softmax(scores.masked_fill(masked, float("-inf")), -1)
        acc = ChunkedStats(3, t, K, bins=bins)
        for q0, q1 in [(0, 1), (1, 9), (9, 30), (30, 50)]:
            block = scores[:, q0:q1, :q1].clone()
            if not is_causal:
                block.masked_fill_(masked[q0:q1, :q1], torch.finfo(torch.float32).min)
            got = acc.add_scores(block.contiguous(), q0, torch.empty_like(block), causal=is_causal)
            torch.testing.assert_close(got, probs[:, q0:q1, :q1], atol=1e-6, rtol=1e-5)
        _assert_matches(acc.finish(), probs.double().numpy(), ref, bins)


def test_native_library_leaves_denormals_alone(row_pass):
    """The library is built with -ffast-math but must not switch the process to flush denormals to zero."""
    tiny = torch.tensor([1e-39])
    assert (tiny * 1.0).item() > 0 and (tiny / 2).item() > 0


def test_native_build_failure_falls_back(monkeypatch, tmp_path, caplog):
    """A compiler that fails leaves statistics mode on its torch path, with one warning, not an error."""
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # on PATH, exits 1
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_why_not", None)
    with caplog.at_level("WARNING", logger="sinkscope._native"):
        assert _native.library() is None
    assert "false failed" in _native.unavailable() and "torch path" in caplog.text
    probs = _random_causal(2, 20)
    acc = ChunkedStats(2, 20, 4)
    assert not acc._native
    acc.add_scores(probs.log().clamp_min(-1e30).contiguous(), 0, torch.empty_like(probs), causal=True)
    np.testing.assert_allclose(acc.finish().first_token_mass, probs[:, 4:, 0].double().mean(1).numpy(), atol=1e-6)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setenv("SINKSCOPE_NATIVE", "0")
    assert _native.library() is None and "SINKSCOPE_NATIVE=0" in _native.unavailable()
    assert _native.describe("cpu") == "torch operations (turned off by SINKSCOPE_NATIVE=0)"
    assert _native.describe("cuda") == "torch operations (on cuda)"


def test_damaged_cached_library_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    if _native._compiler() is None:
        pytest.skip("no C compiler")
    path = _native._build(_native._compiler())
    path.write_bytes(b"not a library")
    assert _native._load().sinkscope_rows_version() == _native.VERSION


def test_chunked_stats_refuses_overlaps_gaps_and_bad_shapes():
    probs = _random_causal(2, 20)
    acc = ChunkedStats(2, 20, 4)
    acc.add(probs[:, :10], 0)
    with pytest.raises(ValueError, match="overlap"):
        acc.add(probs[:, 5:12], 5)
    with pytest.raises(ValueError, match="10 of the 20 query rows were never added"):
        acc.finish()
    with pytest.raises(ValueError, match="don't fit"):
        acc.add(probs[:, 10:20, :15], 10)  # rows up to 19 need 20 keys
    with pytest.raises(ValueError, match="don't fit"):
        acc.add(probs[:1, 10:20], 10)
    with pytest.raises(ValueError, match="k_max"):
        ChunkedStats(2, 4, 4)


# ------------------------------------------------------------------------------------------- analyze


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3", "tiny_gpt2"])
def test_analyze_stats_equals_maps(request, name):
    lm = request.getfixturevalue(name)
    texts = [LONG, TEXT_60]
    maps = analyze(lm, texts, k_max=K, map_size=12, mode="maps", progress=False)
    stats = analyze(lm, texts, k_max=K, map_size=12, mode="stats", progress=False)
    assert [p.capture for p in stats.prompts] == ["stats", "stats"]
    assert [p.capture for p in maps.prompts] == ["maps", "maps"]
    assert stats.settings["capture"].startswith("statistics mode")
    assert stats.settings["row_pass"] == _native.describe("cpu") and "row_pass" not in maps.settings
    for a, b in zip(maps.prompts, stats.prompts, strict=True):
        assert a.n_tokens == b.n_tokens and a.tokens == b.tokens
        np.testing.assert_allclose(b.first_token_mass, a.first_token_mass, atol=1e-6)
        np.testing.assert_allclose(b.sink_mass, a.sink_mass, atol=1e-6)
        np.testing.assert_allclose(b.entropy, a.entropy, atol=1e-5)
        assert [s.position for s in b.sink_positions] == [s.position for s in a.sink_positions]
        np.testing.assert_allclose([s.received for s in b.sink_positions], [s.received for s in a.sink_positions],
                                   atol=1e-6)
        assert b.attention.bins == a.attention.bins and b.attention.labels == a.attention.labels
        np.testing.assert_allclose(b.attention.maps, a.attention.maps, atol=1e-6)
    assert stats.recommendation.sinks == maps.recommendation.sinks


def test_auto_mode_switches_past_the_length(tiny_llama, monkeypatch):
    from sinkscope import analysis

    monkeypatch.setattr(analysis, "STATS_FROM_TOKENS", 100)
    prof = analyze(tiny_llama, [LONG, TEXT_60], k_max=K, map_size=None, progress=False)
    assert [(p.n_tokens, p.capture) for p in prof.prompts] == [(205, "stats"), (61, "maps")]
    assert prof.settings["mode"] == "auto" and prof.settings["stats_from_tokens"] == 100
    assert "statistics mode" in prof.settings["capture"] and "whole maps" in prof.settings["capture"]
    assert [p["capture"] for p in prof.to_dict()["prompts"]] == ["stats", "maps"]


def test_auto_mode_keeps_maps_where_stats_cannot_run(tiny_llama, monkeypatch):
    from sinkscope import analysis

    monkeypatch.setattr(analysis, "STATS_FROM_TOKENS", 10)
    monkeypatch.setattr(analysis, "stats_supported", lambda model: "no reason")
    prof = analyze(tiny_llama, LONG, k_max=K, map_size=None, progress=False)
    assert prof.prompts[0].capture == "maps"
    assert prof.settings["stats_fallback"] == "no reason"  # the scheme's one-line reason, said in the report
    with pytest.raises(ConfigError, match=r"^no reason$"):
        analyze(tiny_llama, LONG, mode="stats", progress=False)


def test_bad_mode(tiny_llama):
    with pytest.raises(ConfigError, match="mode must be one of auto, maps, stats"):
        analyze(tiny_llama, TEXT_60, mode="fast", progress=False)


def test_memory_refusal_comes_before_any_work(tiny_llama, monkeypatch):
    from sinkscope import analysis

    calls = []
    monkeypatch.setattr(tiny_llama.model.model, "forward", lambda *a, **kw: calls.append(1))
    free = analysis.capture_bytes(tiny_llama.spec, 150, "stats") / 0.9  # room for 150 of the 205 tokens
    monkeypatch.setattr(analysis, "_available_bytes", lambda device: free)
    with pytest.raises(ConfigError, match=r"205 tokens in stats mode needs about .* pass --max-tokens 150 or less"):
        analyze(tiny_llama, LONG, mode="stats", progress=False)
    monkeypatch.setattr(analysis, "_available_bytes", lambda device: 1000)
    with pytest.raises(ConfigError, match="not even K \\+ 1 = 9 tokens fit"):
        analyze(tiny_llama, LONG, mode="stats", progress=False)
    assert calls == []
    # Whole maps that don't fit point at statistics mode.
    need = analysis.capture_bytes(tiny_llama.spec, 205, "maps")
    monkeypatch.setattr(analysis, "_available_bytes", lambda device: need)
    with pytest.raises(ConfigError, match="or use statistics mode"):
        analyze(tiny_llama, LONG, mode="maps", progress=False)
    assert calls == []


def test_stats_estimate_grows_linearly_without_sliding_window(tiny_llama, tiny_gemma3):
    from sinkscope.analysis import capture_bytes

    a, b = capture_bytes(tiny_llama.spec, 1000, "stats"), capture_bytes(tiny_llama.spec, 2000, "stats")
    assert b - a == capture_bytes(tiny_llama.spec, 3000, "stats") - b  # linear: no T x T term
    # Sliding-window layers get a T x T boolean mask from transformers: counted.
    g1, g2 = capture_bytes(tiny_gemma3.spec, 1000, "stats"), capture_bytes(tiny_gemma3.spec, 2000, "stats")
    assert g2 - g1 > 2000 * 2000 - 1000 * 1000


# ------------------------------------- attention-interface families: learned sinks, soft-capping, MLA

# gpt-oss: learned sink logits (s_aux); Gemma-2: soft-capped logits (5.0); DeepSeek-V3: MLA, value heads (6)
# narrower than the query/key heads (12); Llama: the control.
FAMILIES = ["llama", "gpt_oss", "gemma2", "deepseek_v3"]
FAMILY_T = 40
TOL = 1e-4


def _family(name: str, **overrides):
    """A tiny model of family ``name``; gpt-oss's sink logits are set to 0..2 so that the learned sink takes a
    visible share of every row (its random init is ~0.1)."""
    model = build_family(name, **overrides)
    if name == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                sinks = layer.self_attn.sinks
                sinks.copy_(torch.linspace(0.0, 2.0, sinks.numel()))
    return model


def _eager_logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, **kw).logits
    finally:
        model.set_attn_implementation(original)


def _sink_share(a: np.ndarray) -> np.ndarray:
    """``[heads, T]``: the learned sink's probability of each row of an eager map, 1 - (row sum)."""
    return np.clip(1.0 - a.sum(-1), 0.0, None)


def _entropy_with_sink(a: np.ndarray, k: int) -> np.ndarray:
    """Entropy of the whole softmax distribution, the keys and the sink outcome: -sum p log p - s log s."""
    s = _sink_share(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        keys = np.where(a > 0, -a * np.log(a), 0.0).sum(-1)
        sink = np.where(s > 0, -s * np.log(s), 0.0)
    return (keys + sink)[:, k:].mean(axis=1)


def _assert_family_layer(name: str, st, a: np.ndarray, ref, bins=None) -> None:
    np.testing.assert_allclose(st.first_token_mass, ref.first_token_mass(a, K), atol=TOL)
    np.testing.assert_allclose(st.sink_mass, ref.sink_mass(a, K), atol=TOL)
    total, _ = ref.received(a, K)
    np.testing.assert_allclose(st.received.total, total, atol=TOL)
    if bins is not None:
        np.testing.assert_allclose(st.pooled, ref.pool(a, bins), atol=TOL)
    if name == "gpt_oss":
        share = _sink_share(a)[:, K:].mean(axis=1)
        assert share.min() > 0.02 and share.max() > 0.2  # the sink is visible: a test of it, not of zeros
        assert st.learned_sink_mass is not None and st.learned_sink_mass.shape == share.shape
        np.testing.assert_allclose(st.learned_sink_mass, share, atol=TOL)
        np.testing.assert_allclose(st.entropy, _entropy_with_sink(a, K), atol=TOL)
        assert np.abs(st.entropy - ref.entropy(a, K)).max() > 10 * TOL  # the sink term is there
    else:
        assert st.learned_sink_mass is None
        np.testing.assert_allclose(st.entropy, ref.entropy(a, K), atol=TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_stats_equal_eager_maps(name, ref, row_pass):
    assert _native.usable("cpu") == (row_pass == "native")
    model = _family(name)
    ids = token_ids(FAMILY_T)
    maps = ref.eager_attentions(model, ids)
    with capture_stats(model, k_max=K, map_size=12, block_bytes=3000) as cap, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert sorted(cap.stats) == list(range(len(maps)))
    bins = pool_bins(FAMILY_T, 12)
    for layer, a in enumerate(maps):
        _assert_family_layer(name, cap.stats[layer], a, ref, bins)


@pytest.mark.parametrize(("name", "layers"), [(n, None) for n in FAMILIES]
                         + [(n, ly) for n in ("gpt_oss", "gemma2") for ly in ([0], [1])])
def test_family_logits_equal_eager(name, layers, ref, row_pass):
    """The outputs statistics mode computes give eager attention's logits; layers left out of ``layers`` with
    soft-capping or learned sinks (which SDPA refuses or ignores) stay exact too."""
    model = _family(name)
    ids = token_ids(FAMILY_T, seed=1)
    expected = _eager_logits(model, ids)
    with capture_stats(model, k_max=K, layers=layers, block_bytes=3000) as cap, torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert sorted(cap.stats) == (layers or list(range(len(model.model.layers))))
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    maps = ref.eager_attentions(model, ids)
    for layer, st in cap.stats.items():
        _assert_family_layer(name, st, maps[layer], ref)


@pytest.mark.parametrize("name", ["gpt_oss", "gemma2"])
def test_unmeasured_sinks_and_softcap_are_exact_with_batches_and_caches(name):
    """Outside a capture_stats block a model left on the registered function still gets exact attention
    where SDPA can't give it: a padded batch, then one cached decoding step, as under eager attention."""
    model = _family(name)
    ids = torch.cat([token_ids(12, seed=2), token_ids(12, seed=3)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    nxt = token_ids(1, seed=4).repeat(2, 1)

    def run(implementation: str) -> tuple[torch.Tensor, torch.Tensor]:
        original = model.config._attn_implementation
        model.set_attn_implementation(implementation)
        try:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, use_cache=True)
                step = model(input_ids=nxt, attention_mask=torch.cat([mask, mask[:, :1]], 1),
                             past_key_values=out.past_key_values, use_cache=True)
        finally:
            model.set_attn_implementation(original)
        return out.logits, step.logits

    from sinkscope.capture import _register

    _register()
    (got, got_step), (want, want_step) = run(STATS_IMPLEMENTATION), run("eager")
    keep = mask.bool()  # padded query rows attend to nothing: their outputs are arbitrary
    torch.testing.assert_close(got[keep], want[keep], atol=TOL, rtol=0)
    torch.testing.assert_close(got_step, want_step, atol=TOL, rtol=0)


def test_chunked_stats_with_learned_sinks(ref, row_pass):
    """add_scores with sink logits: the softmax of eager gpt-oss (the sink as one more column, then dropped)."""
    g = torch.Generator().manual_seed(5)
    h, t, bins = 3, 50, pool_bins(50, 9)
    scores = torch.randn(h, t, t, generator=g) * 3
    sinks = torch.tensor([-1.0, 0.5, 4.0])  # head 2's sink beats most scores: its rows sum to well below 1
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    window = causal | torch.ones(t, t, dtype=torch.bool).tril(-6)
    for is_causal, masked in [(True, causal), (False, window)]:
        logits = torch.cat([scores.masked_fill(masked, float("-inf")), sinks[:, None, None].expand(h, t, 1)], -1)
        probs = torch.softmax(logits.double(), -1)[..., :-1]
        acc = ChunkedStats(h, t, K, bins=bins)
        for q0, q1 in [(0, 1), (1, 9), (9, 30), (30, 50)]:
            block = scores[:, q0:q1, :q1].clone()
            if not is_causal:
                block.masked_fill_(masked[q0:q1, :q1], torch.finfo(torch.float32).min)
            got = acc.add_scores(block.contiguous(), q0, torch.empty_like(block), causal=is_causal,
                                 sink_logits=sinks)
            torch.testing.assert_close(got.double(), probs[:, q0:q1, :q1], atol=1e-6, rtol=1e-5)
        st = acc.finish()
        a = probs.numpy()
        np.testing.assert_allclose(st.learned_sink_mass, _sink_share(a)[:, K:].mean(1), atol=1e-6)
        assert st.learned_sink_mass[2] > 0.1
        np.testing.assert_allclose(st.entropy, _entropy_with_sink(a, K), atol=1e-5)
        np.testing.assert_allclose(st.first_token_mass, ref.first_token_mass(a, K), atol=1e-6)
        np.testing.assert_allclose(st.pooled, ref.pool(a, bins), atol=1e-6)
        total, _ = ref.received(a, K)
        np.testing.assert_allclose(st.received.total, total, atol=1e-5)


def test_chunked_stats_learned_sinks_every_block_or_none(row_pass):
    scores = torch.randn(2, 20, 20)
    acc = ChunkedStats(2, 20, 4)
    acc.add_scores(scores[:, :5, :5].contiguous(), 0, torch.empty(2, 5, 5), causal=True, sink_logits=torch.zeros(2))
    with pytest.raises(ValueError, match="every block"):
        acc.add_scores(scores[:, 5:9, :9].contiguous(), 5, torch.empty(2, 4, 9), causal=True)
    with pytest.raises(ValueError, match="add_scores"):
        acc.add(torch.softmax(scores[:, 5:9, :9], -1), 5)
    with pytest.raises(ValueError, match="one logit per head"):
        acc.add_scores(scores[:, 5:9, :9].contiguous(), 5, torch.empty(2, 4, 9), causal=True,
                       sink_logits=torch.zeros(3))
    plain = ChunkedStats(2, 20, 4)
    plain.add_scores(scores[:, :5, :5].contiguous(), 0, torch.empty(2, 5, 5), causal=True)
    with pytest.raises(ValueError, match="for none"):
        plain.add_scores(scores[:, 5:9, :9].contiguous(), 5, torch.empty(2, 4, 9), causal=True,
                         sink_logits=torch.zeros(2))
    plain.add_scores(scores[:, 5:, :].contiguous(), 5, torch.empty(2, 15, 20), causal=True)
    assert plain.finish().learned_sink_mass is None


def test_analyze_learned_sinks_maps_and_stats(tok_bos, ref, row_pass):
    """analyze() fills PromptResult.learned_sink_mass and counts the sink in the entropy, in both modes."""
    model = _family("gpt_oss", vocab_size=len(char_vocab()))
    lm = loaded(model, tok_bos, "tiny-gpt-oss")
    ids = ref.encode(lm, TEXT_60)
    maps = ref.eager_attentions(model, ids)
    want_lsm = np.stack([_sink_share(a)[:, K:].mean(1) for a in maps])
    want_ent = np.stack([_entropy_with_sink(a, K) for a in maps])
    for mode in ("maps", "stats"):
        prompt = analyze(lm, TEXT_60, k_max=K, map_size=None, mode=mode, progress=False).prompts[0]
        assert prompt.capture == mode and prompt.learned_sink_mass is not None
        np.testing.assert_allclose(prompt.learned_sink_mass, want_lsm, atol=TOL)
        np.testing.assert_allclose(prompt.entropy, want_ent, atol=TOL)


def test_analyze_without_learned_sinks_has_none(tiny_llama):
    for mode in ("maps", "stats"):
        prompt = analyze(tiny_llama, TEXT_60, k_max=K, map_size=None, mode=mode, progress=False).prompts[0]
        assert prompt.learned_sink_mass is None
