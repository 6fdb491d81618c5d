"""Massive activations (sinkscope.metrics.layer_activations, capture_activations) against independent computations:
numpy on the same tensor, and transformers' own output_hidden_states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TEXT_60, build_llama, loaded

from sinkscope import analyze, metrics
from sinkscope.analysis import MassiveActivations
from sinkscope.capture import capture_activations, capture_stats
from sinkscope.errors import CaptureError
from sinkscope.report import render_html, render_markdown


def _lower_median(x: np.ndarray) -> float:
    s = np.sort(x.reshape(-1))
    return float(s[(s.size - 1) // 2])


@pytest.fixture(params=["one block", "blocks of 3 tokens"])
def blocks(request, monkeypatch):
    if request.param != "one block":
        monkeypatch.setattr(metrics, "ACTIVATION_BLOCK", 3 * 24)


def test_layer_activations_equal_numpy(blocks):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 24, generator=g)
    h[0, 5] = 900.0  # a planted massive activation on the first token
    h[3, 7] = -40.0
    got = metrics.layer_activations(h, top=3)
    a = h.double().numpy()
    np.testing.assert_allclose(got.norms, np.linalg.norm(a, axis=1), rtol=1e-6)
    assert got.median == pytest.approx(_lower_median(np.abs(a)), rel=1e-6)
    order = np.argsort(-np.abs(a).reshape(-1))[:3]
    np.testing.assert_array_equal(got.top_tokens, order // 24)
    np.testing.assert_array_equal(got.top_dims, order % 24)
    np.testing.assert_allclose(got.top_values, a.reshape(-1)[order], rtol=1e-6)
    assert (got.top_tokens[0], got.top_dims[0], got.top_values[0]) == (0, 5, 900.0)
    assert got.massive and got.ratio == pytest.approx(900.0 / _lower_median(np.abs(a)), rel=1e-6)
    h[0, 5] = 50.0  # below 100: not massive however small the median
    assert not metrics.layer_activations(h).massive


def test_median_over_a_strided_sample(monkeypatch):
    monkeypatch.setattr(metrics, "MEDIAN_SAMPLE", 100)
    h = torch.arange(1, 1001, dtype=torch.float32).reshape(40, 25)
    step = 10  # ceil(1000 / 100)
    assert metrics.layer_activations(h).median == _lower_median(h.numpy().reshape(-1)[::step])


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        metrics.layer_activations(torch.zeros(2, 3, 4))


def test_capture_equals_output_hidden_states(tok_bos, ref):
    """Each decoder layer's output, as transformers' output_hidden_states gives it (entry i + 1 is layer i's
    output; the last entry is after the final norm, so the last layer is checked against its own hook)."""
    lm = loaded(build_llama(), tok_bos, "tiny-llama")
    ids = ref.encode(lm, TEXT_60)
    with torch.no_grad():
        hidden = lm.model.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        with capture_activations(lm.model) as acts, capture_stats(lm.model, k_max=4):
            lm.model.model(input_ids=ids, use_cache=False)
    n = lm.spec.n_layers
    assert sorted(acts.layers) == list(range(n))
    for i in range(n - 1):
        a = hidden[i + 1][0].double().numpy()
        np.testing.assert_allclose(acts.layers[i].norms, np.linalg.norm(a, axis=1), rtol=1e-5)
        assert acts.layers[i].median == pytest.approx(_lower_median(np.abs(a)), rel=1e-5)
        top = np.abs(a).reshape(-1).argmax()
        assert (acts.layers[i].top_tokens[0], acts.layers[i].top_dims[0]) == divmod(int(top), a.shape[1])


def test_capture_takes_one_sequence(tok_bos):
    model = build_llama()
    with pytest.raises(CaptureError, match="one sequence"), capture_activations(model), torch.no_grad():
        model.model(input_ids=torch.ones(2, 12, dtype=torch.long), use_cache=False)


def test_massive_summary_and_report(tok_bos):
    """The per-layer summary, report.json, report.md and report.html from a real analysis, plus a layer with a
    planted massive activation."""
    lm = loaded(build_llama(), tok_bos, "tiny-llama")
    profile = analyze(lm, [TEXT_60], k_max=4, progress=False)
    acts = profile.prompts[0].activations
    assert acts is not None and acts.norms.shape == (lm.spec.n_layers, profile.prompts[0].n_tokens)
    data = json.loads(json.dumps(profile.to_dict()))["activations"][0]
    assert data["prompt"] == profile.prompts[0].name and len(data["layers"]) == lm.spec.n_layers
    row = data["layers"][1]
    assert row["first_token_norm"] == pytest.approx(float(acts.norms[1, 0]))
    assert row["top"][0]["dim"] == int(acts.top_dims[1, 0])
    assert "## Massive activations" in render_markdown(profile)
    assert 'id="fig-activations"' in render_html(profile)
    assert len(profile.plot_activations().data) >= 3

    planted = MassiveActivations(norms=acts.norms, median=acts.median.copy(), top_values=acts.top_values.copy(),
                                 top_tokens=acts.top_tokens, top_dims=acts.top_dims)
    assert planted.first_massive_layer is None  # random weights: nothing massive
    planted.top_values[2, 0] = 1e4 * planted.median[2] + 100
    assert planted.first_massive_layer == 2 and planted.massive.tolist() == [False, False, True]


@pytest.mark.real
def test_smollm2_first_token_carries_massive_activations(smollm2):
    """SmolLM2's first token: a residual norm far above the median token's from the middle layers on, nearly
    all of it in one dimension (Sun et al. 2024's massive activation)."""
    profile = analyze(smollm2, [TEXT_60 * 6], progress=False)
    acts = profile.prompts[0].activations
    first = acts.first_massive_layer
    assert first is not None and first < smollm2.spec.n_layers // 2
    later = range(first, smollm2.spec.n_layers - 1)
    assert all(int(acts.top_tokens[i, 0]) == 0 for i in later)
    ratio = acts.norms[list(later), 0] / np.median(acts.norms[list(later)], axis=1)
    assert ratio.min() > 10


def test_models_without_one_residual_stream_say_why(tok_bos):
    """Gemma-3n's decoder layers carry several residual streams (AltUp): no norms, and the report says why."""
    from families import build as build_family

    lm = loaded(build_family("gemma3n"), tok_bos, "tiny-gemma3n")
    profile = analyze(lm, [TEXT_60], k_max=4, progress=False)
    p = profile.prompts[0]
    assert p.activations is None and "residual stream" in p.activations_unavailable
    assert profile.to_dict()["activations"] == [{"prompt": p.name, "unavailable": p.activations_unavailable}]
    assert "No residual norms" in render_markdown(profile) and "No residual norms" in render_html(profile)
    assert "no residual norms" in profile.plot_activations().layout.annotations[0].text
