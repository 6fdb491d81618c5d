"""What each head writes (metrics.head_outputs, capture_head_outputs), the dormant-head flag and its ablation
(sinkscope.heads), against independent computations: each head's slice pushed through the model's own output
projection, values recomputed from v_proj, and models whose projection columns are zeroed by hand."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import TEXT_60, build_gpt2, build_llama, loaded

from sinkscope import analysis, analyze, capture_head_outputs, metrics, scheme
from sinkscope.cli import main
from sinkscope.errors import ConfigError
from sinkscope.heads import ablate_heads, perplexity, zero_heads
from sinkscope.report import render_html, render_markdown

K = 4


def _per_head_norms(proj: torch.nn.Module, x: torch.Tensor, n_heads: int) -> np.ndarray:
    """``[T, H]`` norms of each head's slice through ``proj`` itself (bias removed), other heads zeroed."""
    d_v = x.shape[-1] // n_heads
    zero = proj(torch.zeros_like(x[:1]))
    out = []
    for h in range(n_heads):
        xh = torch.zeros_like(x)
        xh[:, h * d_v: (h + 1) * d_v] = x[:, h * d_v: (h + 1) * d_v]
        out.append(torch.linalg.vector_norm((proj(xh) - zero).double(), dim=-1))
    return torch.stack(out, -1).detach().numpy()


def test_head_outputs_equal_each_slice_through_the_projection():
    torch.manual_seed(0)
    proj = torch.nn.Linear(24, 40, bias=True)
    x = torch.randn(30, 24)
    got = metrics.head_outputs(x, proj.weight, n_heads=4, k_max=K)
    ref = _per_head_norms(proj, x, 4)
    np.testing.assert_allclose(got.output_norm, ref[K:].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got.first_row_norm, ref[0], rtol=1e-6)
    with pytest.raises(ValueError, match="heads x D_v"):
        metrics.head_outputs(x, proj.weight, n_heads=5, k_max=K)


@pytest.mark.parametrize("build", [build_llama, build_gpt2], ids=["llama", "gpt2-conv1d"])
def test_capture_matches_the_projection_of_each_head(build, tok_bos):
    model = build()
    ids = tok_bos(TEXT_60, return_tensors="pt").input_ids
    inputs: dict[int, torch.Tensor] = {}
    mods = scheme.attention_modules(model)
    projs = {i: getattr(m, "o_proj", None) or m.c_proj for i, m in mods.items()}
    hooks = [p.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0][0].detach()))
             for i, p in projs.items()]
    with capture_head_outputs(model, k_max=K) as heads, torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    n_heads = model.config.num_attention_heads
    assert sorted(heads.layers) == sorted(mods) and heads.unavailable is None
    for i, x in inputs.items():
        ref = _per_head_norms(projs[i], x, n_heads)
        np.testing.assert_allclose(heads.layers[i].output_norm, ref[K:].mean(0), rtol=1e-5)
        np.testing.assert_allclose(heads.layers[i].first_row_norm, ref[0], rtol=1e-5)
    if build is build_llama:  # position 0's output is its own value: recompute it from v_proj
        attn, layer0 = mods[1], model.model.layers[1]
        d = model.config.hidden_size // n_heads
        group = n_heads // model.config.num_key_value_heads
        with torch.no_grad():
            v = attn.v_proj(layer0.input_layernorm(out.hidden_states[1][0, :1]))[0]
            w = attn.o_proj.weight
            want = [float(torch.linalg.vector_norm(w[:, h * d:(h + 1) * d] @ v[(h // group) * d:(h // group + 1) * d]))
                    for h in range(n_heads)]
        np.testing.assert_allclose(heads.layers[1].first_row_norm, want, rtol=1e-5)


def test_dormant_rule():
    ftm = np.array([[0.9, 0.9, 0.1, 0.9]])
    norm = np.array([[1.0, 4.0, 0.1, 3.0]])  # median 2.0
    ratio = metrics.output_ratio(norm)
    np.testing.assert_allclose(ratio, [[0.5, 2.0, 0.05, 1.5]])
    assert metrics.is_dormant(ftm, ratio, 0.3).tolist() == [[False, False, False, False]]  # 0.5 is not below
    assert metrics.is_dormant(ftm, ratio * 0.9, 0.3).tolist() == [[True, False, False, False]]  # not a sink: no


def test_zero_heads_equals_zeroed_projection_columns(tok_bos):
    lm = loaded(build_llama(seed=7), tok_bos, "tiny")
    ids = tok_bos(TEXT_60, return_tensors="pt").input_ids
    heads = [(0, 1), (2, 3)]
    d = lm.model.config.hidden_size // lm.model.config.num_attention_heads
    by_hand = copy.deepcopy(lm.model)
    with torch.no_grad():
        for layer, h in heads:
            by_hand.model.layers[layer].self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
        want, intact = by_hand(ids).logits, lm.model(ids).logits
        with zero_heads(lm.model, heads):
            got = lm.model(ids).logits
        after = lm.model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, intact)  # the hooks are gone
    with pytest.raises(ConfigError, match="there is no head 9"), zero_heads(lm.model, [(0, 9)]):
        pass
    with pytest.raises(ConfigError, match="layer 7 has no softmax attention"), zero_heads(lm.model, [(7, 0)]):
        pass


def test_ablation_against_the_models_own_loss(tok_bos):
    lm = loaded(build_llama(seed=8), tok_bos, "tiny")
    ids = tok_bos(TEXT_60, return_tensors="pt").input_ids
    with torch.no_grad():
        base = math.exp(float(lm.model(ids, labels=ids).loss))
    assert perplexity(lm, ids) == pytest.approx(base, rel=1e-5)
    pool = [(0, 0), (0, 2), (1, 1), (2, 0)]
    ab = ablate_heads(lm, TEXT_60, [(1, 2)], control_from=pool, seed=3)
    assert ab.base_ppl == pytest.approx(base, rel=1e-5) and ab.n_tokens == ids.shape[1]
    assert len(ab.control_heads) == 1 and ab.control_heads[0] in pool
    d = lm.model.config.hidden_size // lm.model.config.num_attention_heads
    for heads, got in (([(1, 2)], ab.ablated_ppl), (ab.control_heads, ab.control_ppl)):
        by_hand = copy.deepcopy(lm.model)
        with torch.no_grad():
            for layer, h in heads:
                by_hand.model.layers[layer].self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
            want = math.exp(float(by_hand(ids, labels=ids).loss))
        assert got == pytest.approx(want, rel=1e-5)
    doc = ab.to_dict()
    assert doc["change"] == pytest.approx(ab.ablated_ppl / ab.base_ppl - 1, rel=1e-9)
    assert "zeroing the 1 flagged head" in doc["verdict"]
    with pytest.raises(ConfigError, match="no heads"):
        ablate_heads(lm, TEXT_60, [])


def test_analysis_and_report_carry_head_outputs(sink_llama, monkeypatch):
    profile = analyze(sink_llama, TEXT_60, k_max=K, progress=False)
    assert profile.output_norm.shape == profile.first_token_mass.shape
    doc = profile.to_dict()["head_outputs"]
    assert len(doc["output_norm"]) == len(profile.layers) and doc["dormant_ratio"] == metrics.DORMANT_RATIO
    monkeypatch.setattr(metrics, "DORMANT_RATIO", 10.0)  # every sink head flagged
    assert len(profile.dormant_heads()) == len(profile.sink_heads())
    assert "## Dormant heads" in render_markdown(profile)
    monkeypatch.setattr(scheme, "OUTPUT_PROJECTIONS", ("no_such_projection",))
    profile = analyze(sink_llama, TEXT_60, k_max=K, progress=False)
    assert profile.output_norm is None and profile.dormant_heads() == []
    assert "no output projection named no_such_projection" in profile.to_dict()["head_outputs"]["unavailable"]
    assert "No head outputs: " in render_markdown(profile)


def test_report_ablate(capsys, llama_dir, tmp_path, monkeypatch):
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEXT_60)
    args = ["report", str(llama_dir), "--prompt-file", str(prompt), "--k-max", str(K), "--no-validate",
            "--no-inputs", "--quiet", "--ablate"]
    rc = main([*args, "--out", str(tmp_path / "a")])
    _, err = capsys.readouterr()
    assert rc == 0 and ("nothing to ablate" in err) == (json.loads((tmp_path / "a" / "report.json").read_text())
                                                         ["ablation"] is None)
    monkeypatch.setattr(metrics, "DORMANT_RATIO", 100.0)  # every head a sink head (threshold 0), all flagged
    rc = main([*args, "--threshold", "0.001", "--out", str(tmp_path / "b")])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    ab = json.loads((tmp_path / "b" / "report.json").read_text())["ablation"]
    assert ab is not None and ab["heads"] and ab["control_ppl"] is None and "ablation: zeroing the" in stdout
    assert "Ablation on p" in (tmp_path / "b" / "report.md").read_text()


# ------------------------------------------------------------------------------------------- key geometry


def _loop_geometry(q: np.ndarray, k: np.ndarray, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean cos(q_i, k_0), mean over i of the mean cos(q_i, k_j), j = 1..i), i >= K, with explicit loops."""
    h, t = q.shape[:2]
    group = h // k.shape[0]

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    sink, other = np.zeros(h), np.zeros(h)
    for hh in range(h):
        kk, qq = k[hh // group], q[hh]
        sink[hh] = np.mean([cos(qq[i], kk[0]) for i in range(k_max, t)])
        other[hh] = np.mean([np.mean([cos(qq[i], kk[j]) for j in range(1, i + 1)]) for i in range(k_max, t)])
    return sink, other


def _loop_margin(q: np.ndarray, k: np.ndarray, k_max: int, scale: float, softcap: float | None = None,
                 window: int | None = None) -> np.ndarray:
    """Per head, the median over every query i >= max(K, 1) that sees key 0 of cap(s_i0) - cap(max_j s_ij),
    j = 1..i visible, with explicit loops (the lower middle of an even count, as torch's median)."""
    h, t = q.shape[:2]
    group = h // k.shape[0]

    def cap(x):
        x = x * scale
        return x if softcap is None else softcap * math.tanh(x / softcap)

    out = np.zeros(h)
    for hh in range(h):
        kk, qq = k[hh // group], q[hh]
        margins = []
        for i in range(max(k_max, 1), t):
            if window is not None and i >= window:
                continue
            best = max(float(qq[i] @ kk[j]) for j in range(1, i + 1) if window is None or i - j < window)
            margins.append(cap(float(qq[i] @ kk[0])) - cap(best))
        out[hh] = np.sort(margins)[(len(margins) - 1) // 2]
    return out


@pytest.mark.parametrize("softcap, window", [(None, None), (3.0, 12), (None, 30)])
def test_key_geometry_against_loops(monkeypatch, softcap, window):
    monkeypatch.setattr(metrics, "ACTIVATION_BLOCK", 4 * 8 * 7)  # blocks of 7 queries: the carry between blocks
    monkeypatch.setattr(metrics, "MARGIN_ROWS", 1000)  # every query: the loop reference takes them all
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 40, 8), torch.randn(2, 40, 8), torch.randn(2, 40, 5) * 3
    k[:, 0] *= 2.5  # a first key that wins some rows and loses others
    got = metrics.key_geometry(q, k, v, K, scale=0.4, softcap=softcap, window=window)
    qd, kd = q.double().numpy(), k.double().numpy()
    sink, other = _loop_geometry(qd, kd, K)
    np.testing.assert_allclose(got.sink_key_cos, sink, atol=1e-12)
    np.testing.assert_allclose(got.other_key_cos, other, atol=1e-12)
    norms = np.linalg.norm(kd, axis=-1)
    np.testing.assert_allclose(got.sink_key_norm, np.repeat(norms[:, 0], 2), rtol=1e-12)
    np.testing.assert_allclose(got.key_norm_median, np.repeat(np.sort(norms[:, 1:])[:, 19], 2), rtol=1e-12)
    v_norms = np.linalg.norm(v.double().numpy(), axis=-1)
    np.testing.assert_allclose(got.sink_value_norm, np.repeat(v_norms[:, 0], 2), rtol=1e-12)
    np.testing.assert_allclose(got.value_norm_median, np.repeat(np.sort(v_norms[:, 1:])[:, 19], 2), rtol=1e-12)
    margin = _loop_margin(qd, kd, K, 0.4, softcap, window)
    np.testing.assert_allclose(got.sink_margin, margin, atol=1e-10)
    assert (margin > 0).any() or (margin < 0).any()


def test_sink_margin_samples_evenly_spaced_queries():
    """With fewer sampled rows than queries: the median over the rows at round(linspace(K, T - 1, n)), each row's
    margin from explicit loops; no query that sees key 0 (a window no wider than K): NaN."""
    torch.manual_seed(2)
    q, k = torch.randn(2, 50, 8), torch.randn(2, 50, 8)
    got = metrics.sink_margin(q, k, K, scale=0.5, rows=7)
    rows = np.unique(np.round(np.linspace(K, 49, 7)).astype(int))
    qd, kd = q.double().numpy(), k.double().numpy()
    for hh in range(2):
        m = [0.5 * (qd[hh, i] @ kd[hh, 0]) - 0.5 * max(qd[hh, i] @ kd[hh, j] for j in range(1, i + 1)) for i in rows]
        assert got[hh] == pytest.approx(np.sort(m)[(len(m) - 1) // 2], abs=1e-10)
    assert np.isnan(metrics.sink_margin(q, k, K, scale=0.5, window=K)).all()


def test_capture_geometry_sees_what_transformers_passes(tok_bos):
    """The queries and keys transformers hands to an attention function (recorded by a function registered here,
    not by sinkscope), through explicit loops, against capture_geometry and analyze in both modes."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from sinkscope import capture_geometry

    seen: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, float]] = {}

    def record(module, query, key, value, mask, **kw):
        seen[module.layer_idx] = (query[0].detach().double().numpy(), key[0].detach().double().numpy(),
                                  value[0].detach().double().numpy(), kw["scaling"])
        return sdpa_attention_forward(module, query, key, value, mask, **kw)

    AttentionInterface.register("test_record_qk", record)
    AttentionMaskInterface.register("test_record_qk", sdpa_mask)
    model = build_llama(seed=9)
    lm = loaded(model, tok_bos, "tiny")
    ids = tok_bos(TEXT_60, return_tensors="pt").input_ids
    model.set_attn_implementation("test_record_qk")
    with torch.no_grad():
        model(input_ids=ids)
    model.set_attn_implementation("sdpa")
    with capture_geometry(model, k_max=K) as geo, torch.no_grad():
        model(input_ids=ids)
    profiles = [analyze(lm, TEXT_60, k_max=K, mode=m, map_size=None, progress=False) for m in ("maps", "stats")]
    n = ids.shape[1]
    rows = np.unique(np.round(np.linspace(K, n - 1, min(metrics.MARGIN_ROWS, n - K))).astype(int))
    for layer, (q, k, v, scaling) in seen.items():
        sink, other = _loop_geometry(q, k, K)
        group = q.shape[0] // k.shape[0]
        margin = []
        for hh in range(q.shape[0]):
            kk = k[hh // group]
            m = np.sort([scaling * (q[hh, i] @ kk[0] - max(q[hh, i] @ kk[j] for j in range(1, i + 1))) for i in rows])
            margin.append(m[(len(m) - 1) // 2])
        v_norms = np.linalg.norm(v, axis=-1)
        v0, v_median = np.repeat(v_norms[:, 0], group), np.repeat(np.sort(v_norms[:, 1:])[:, (n - 2) // 2], group)
        getters = [lambda name, at=layer: getattr(geo.layers[at], name)]
        getters += [lambda name, p=p, at=layer: p.geometry(name)[at] for p in profiles]
        for get in getters:
            np.testing.assert_allclose(get("sink_key_cos"), sink, atol=1e-6)
            np.testing.assert_allclose(get("other_key_cos"), other, atol=1e-6)
            np.testing.assert_allclose(get("sink_margin"), margin, atol=1e-5)
            np.testing.assert_allclose(get("sink_value_norm"), v0, rtol=1e-6)
            np.testing.assert_allclose(get("value_norm_median"), v_median, rtol=1e-6)
    assert set(profiles[0].to_dict()["key_geometry"]) == set(analysis.GEOMETRY_FIELDS) == {
        "sink_key_cos", "other_key_cos", "sink_key_norm", "key_norm_median", "sink_margin", "sink_value_norm",
        "value_norm_median"}


def test_sink_margin_uses_the_layers_window_and_softcap():
    """Gemma-2 (soft-capped logits, sliding layers with a window of 6): capture_geometry's margin against loops
    over the queries and keys transformers passes, capped and windowed as the scheme says each layer is."""
    from families import build, token_ids
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from sinkscope import capture_geometry

    seen: dict[int, tuple[np.ndarray, np.ndarray, float, float]] = {}

    def record(module, query, key, value, mask, **kw):
        seen[module.layer_idx] = (query[0].detach().double().numpy(), key[0].detach().double().numpy(),
                                  kw["scaling"], kw["softcap"])
        return eager_attention_forward(module, query, key, value, mask, **kw)

    AttentionInterface.register("test_record_qk_cap", record)
    AttentionMaskInterface.register("test_record_qk_cap", eager_mask)
    model = build("gemma2", seed=3)
    ids = token_ids(30, seed=3)
    model.set_attn_implementation("test_record_qk_cap")
    with torch.no_grad():
        model(input_ids=ids)
    model.set_attn_implementation("eager")
    with capture_geometry(model, k_max=2) as geo, torch.no_grad():
        model(input_ids=ids)
    windows = [layer.window for layer in scheme.attention_scheme(model).layers]
    assert None in windows and 6 in windows
    for layer, (q, k, scaling, softcap) in seen.items():
        assert softcap == 5.0
        want = _loop_margin(q, k, 2, scaling, softcap, windows[layer])
        # (layer 1's input passed through float32 attention: not bit-equal to the recorded run's)
        np.testing.assert_allclose(geo.layers[layer].sink_margin, want, atol=1e-5)


def test_sink_llama_aligns_with_its_sink_key_and_the_report_says_so(sink_llama, monkeypatch):
    from sinkscope import analysis

    profile = analyze(sink_llama, TEXT_60, k_max=K, progress=False)
    assert (profile.geometry("sink_key_cos") > 0.9).all() and (abs(profile.geometry("other_key_cos")) < 0.2).all()
    md = render_markdown(profile)
    assert "## How queries meet the first token" in md and "Over the 12 sink heads" in md
    html = render_html(profile)
    assert "<h2>How queries meet the first token</h2>" in html and "<h2>Dormant heads</h2>" in html
    monkeypatch.setattr(analysis, "stats_supported", lambda model: "its attention is not the interface (test)")
    profile = analyze(sink_llama, TEXT_60, k_max=K, progress=False)
    assert profile.geometry("sink_key_cos") is None
    assert profile.to_dict()["key_geometry"] == {"unavailable": "its attention is not the interface (test)"}
    assert "No key geometry: its attention is not the interface (test)." in render_markdown(profile)


# ---------------------------------------------------------------------------------------- secondary sinks


@pytest.mark.parametrize("mode", ["maps", "stats"])
def test_secondary_sinks_against_eager_maps(colon_sink_llama, ref, mode):
    """Per layer, from the received mass of transformers' eager maps (explicit loops) and the rule written out
    here: the positions, their layers and their peaks; the same in both capture modes."""
    lm = colon_sink_llama
    text = TEXT_60 * 2
    ids = ref.encode(lm, text)
    maps = ref.eager_attentions(lm.model, ids)
    t, n_heads = ids.shape[1], maps[0].shape[0]
    uniform = ref.uniform(t, K)
    want: dict[int, list[tuple[int, float]]] = {}
    for layer, a in enumerate(maps):
        total, count = ref.received(a, K)
        for j in range(1, t):
            if count[j] < 16:
                continue
            mean = total[j] / (count[j] * n_heads)
            if mean >= 0.02 and mean >= 10 * uniform[j]:
                want.setdefault(j, []).append((layer, mean))
    profile = analyze(lm, text, k_max=K, mode=mode, map_size=None, progress=False)
    got = profile.prompts[0].secondary_sinks
    colon = TEXT_60.index(":") + 1  # after the BOS token
    assert got and got[0].position == colon and got[0].token == ":" and got[0].kind == "punct"
    expected = sorted(want, key=lambda j: -max(m for _, m in want[j]))[:10]
    assert [s.position for s in got] == expected
    for s in got:
        assert s.layers == [layer for layer, _ in want[s.position]]
        assert s.peak == pytest.approx(max(m for _, m in want[s.position]), rel=1e-5)
    assert profile.to_dict()["secondary_sinks"][0]["positions"][0]["position"] == colon
    md = render_markdown(profile)
    assert "## Secondary sinks" in md and "| 0-2 |" in md
