"""sinkscope.capture: hooks, eager switch and restore, layer/head selection, pooling, callbacks, errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TEXT_24, TEXT_60, build_gemma3, build_gpt2, build_llama
from torch import nn

from sinkscope.capture import bin_edges, capture, eager_attention, find_attention_modules, pool_map
from sinkscope.errors import CaptureError

BUILDERS = {"llama": build_llama, "gemma3": build_gemma3, "gpt2": build_gpt2}
ATTN_TYPES = {"tiny-llama": "LlamaAttention", "tiny-gemma3": "Gemma3Attention", "tiny-gpt2": "GPT2Attention"}


def _hooks(model) -> list[dict]:
    return [dict(m._forward_hooks) for m in find_attention_modules(model).values()]


def _run(lm, text=TEXT_24):
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        lm.model(input_ids=ids)
    return ids


# ------------------------------------------------------------------------------------- finding modules


def test_find_attention_modules_one_per_layer(tiny):
    mods = list(find_attention_modules(tiny.model).values())
    assert len(mods) == tiny.spec.n_layers
    assert {type(m).__name__ for m in mods} == {ATTN_TYPES[tiny.spec.name]}
    assert len({id(m) for m in mods}) == len(mods)


def test_find_attention_modules_order_is_layer_order():
    model = build_llama()
    assert find_attention_modules(model) == {i: layer.self_attn for i, layer in enumerate(model.model.layers)}


# ------------------------------------------------------------------------------------- maps vs reference


def test_maps_equal_transformers_eager_attentions(tiny, ref):
    ids = ref.encode(tiny, TEXT_60)
    expected = ref.eager_attentions(tiny.model, ids)
    with capture(tiny.model) as cap, torch.no_grad():
        tiny.model(input_ids=ids)
    assert cap.layers == list(range(tiny.spec.n_layers))
    assert sorted(cap.maps) == cap.layers
    assert cap.calls == tiny.spec.n_layers
    t = ids.shape[1]
    for layer in cap.layers:
        m = cap.maps[layer]
        assert m.dtype == torch.float32
        assert tuple(m.shape) == (1, tiny.spec.n_heads, t, t)
        np.testing.assert_allclose(m[0].numpy(), expected[layer], atol=1e-6, rtol=0)
        np.testing.assert_allclose(m[0].sum(-1).numpy(), 1.0, atol=1e-5)
        assert torch.all(torch.triu(m[0], diagonal=1) == 0)  # causal


def test_gemma3_sliding_layers_captured_with_their_window(tiny_gemma3, ref):
    lm = tiny_gemma3
    ids = ref.encode(lm, TEXT_24)
    with capture(lm.model) as cap, torch.no_grad():
        lm.model(input_ids=ids)
    t = ids.shape[1]
    q, k = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    outside = (q - k) >= lm.spec.sliding_window  # key too far behind the query for a window of 4
    for layer, kind in enumerate(lm.spec.layer_types):
        m = cap.maps[layer][0].numpy()
        if kind == "sliding_attention":
            assert np.all(m[:, outside] == 0)
            assert np.all(m[:, ~outside & (k <= q)] > 0)
        else:
            assert np.all(m[:, q >= k] > 0)


def test_sdpa_output_unchanged_by_capture(tiny):
    """Capturing must not change the model's results (eager and sdpa agree)."""
    ids = tiny.tokenizer(TEXT_24, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = tiny.model(input_ids=ids).logits
        with capture(tiny.model):
            hooked = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ hooks and implementation


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_hooks_removed_and_sdpa_restored_after_success(arch, tok_bos):
    model = BUILDERS[arch]()  # fresh: transformers never installed its own output-capturing hooks on it
    assert model.config._attn_implementation == "sdpa"
    assert all(h == {} for h in _hooks(model))
    ids = tok_bos(TEXT_24, return_tensors="pt").input_ids
    with capture(model, layers=[0, -1]) as cap:
        assert model.config._attn_implementation == "eager"
        during = _hooks(model)
        with torch.no_grad():
            model(input_ids=ids)
    n = model.config.num_hidden_layers
    assert [len(h) for h in during] == [1 if i in (0, n - 1) else 0 for i in range(n)]
    assert all(h == {} for h in _hooks(model))
    assert model.config._attn_implementation == "sdpa"
    assert sorted(cap.maps) == [0, n - 1]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_hooks_removed_and_sdpa_restored_after_exception(arch, tok_bos):
    model = BUILDERS[arch]()
    ids = tok_bos(TEXT_24, return_tensors="pt").input_ids
    with pytest.raises(RuntimeError, match="boom"), capture(model):
        with torch.no_grad():
            model(input_ids=ids)
        raise RuntimeError("boom")
    assert all(h == {} for h in _hooks(model))
    assert model.config._attn_implementation == "sdpa"
    # and the model still works normally afterwards, with nothing captured
    with torch.no_grad():
        model(input_ids=ids)
    assert all(h == {} for h in _hooks(model))


def test_hooks_removed_after_error_raised_inside_a_hook(tok_bos):
    model = build_llama()
    ids = tok_bos(TEXT_24, return_tensors="pt").input_ids

    def failing(layer, _probs):
        if layer == 1:
            raise RuntimeError("reduction failed in layer 1")

    with pytest.raises(RuntimeError, match="layer 1"), capture(model, on_layer=failing), torch.no_grad():
        model(input_ids=ids)
    assert all(h == {} for h in _hooks(model))
    assert model.config._attn_implementation == "sdpa"


def test_head_out_of_range_is_refused_before_any_hook(tok_bos):
    model = build_llama()
    with pytest.raises(CaptureError, match=r"\[0, 4\)"), capture(model, heads=[0, 9], keep_maps=False):
        pass
    assert all(h == {} for h in _hooks(model))
    assert model.config._attn_implementation == "sdpa"


def test_hooks_snapshot_restored_on_shared_models(tiny, ref):
    """On models that transformers has already hooked (output_attentions ran), only ours come and go."""
    ref.eager_attentions(tiny.model, ref.encode(tiny, TEXT_24))
    before = [set(h) for h in _hooks(tiny.model)]
    with pytest.raises(ValueError, match="inside"), capture(tiny.model):
        _run(tiny)
        raise ValueError("inside")
    assert [set(h) for h in _hooks(tiny.model)] == before
    assert tiny.model.config._attn_implementation == "sdpa"


def test_eager_model_left_eager():
    model = build_llama()
    model.set_attn_implementation("eager")
    with capture(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"


def test_eager_attention_restores_on_error():
    model = build_gpt2()
    with pytest.raises(KeyError), eager_attention(model):
        assert model.config._attn_implementation == "eager"
        raise KeyError("x")
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------- layers and heads


@pytest.mark.parametrize(("layers", "expected"), [([0], [0]), ([-1], [2]), ([2, -3], [0, 2]), ([-1, 2, 1], [1, 2])])
def test_layer_selection(tiny_llama, ref, layers, expected):
    ids = ref.encode(tiny_llama, TEXT_24)
    full = ref.eager_attentions(tiny_llama.model, ids)
    with capture(tiny_llama.model, layers=layers) as cap, torch.no_grad():
        tiny_llama.model(input_ids=ids)
    assert cap.layers == expected
    assert sorted(cap.maps) == expected
    assert cap.calls == len(expected)
    for layer in expected:
        np.testing.assert_allclose(cap.maps[layer][0].numpy(), full[layer], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [3, -4, 100])
def test_layer_out_of_range(tiny_llama, bad):
    with pytest.raises(CaptureError, match=f"layer {bad} out of range: the model has 3 layers"), \
            capture(tiny_llama.model, layers=[0, bad]):
        pytest.fail("the block must not run")
    assert tiny_llama.model.config._attn_implementation == "sdpa"


def test_head_selection(tiny_gemma3, ref):
    lm = tiny_gemma3
    ids = ref.encode(lm, TEXT_24)
    full = ref.eager_attentions(lm.model, ids)
    with capture(lm.model, heads=[3, 1]) as cap, torch.no_grad():
        lm.model(input_ids=ids)
    assert cap.heads == [3, 1]
    for layer in range(lm.spec.n_layers):
        assert cap.maps[layer].shape[1] == 2
        np.testing.assert_allclose(cap.maps[layer][0].numpy(), full[layer][[3, 1]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads", [[], [-1], [0, -2]])
def test_bad_heads(tiny_llama, heads):
    with pytest.raises(CaptureError, match="heads must be"), capture(tiny_llama.model, heads=heads):
        pass
    assert tiny_llama.model.config._attn_implementation == "sdpa"


def test_keep_maps_false_keeps_nothing(tiny_llama):
    with capture(tiny_llama.model, keep_maps=False) as cap:
        _run(tiny_llama)
    assert cap.maps == {}
    assert cap.calls == tiny_llama.spec.n_layers


# ------------------------------------------------------------------------------------------- callback


def test_on_layer_sees_each_selected_layer_once(tiny, ref):
    ids = ref.encode(tiny, TEXT_60)
    full = ref.eager_attentions(tiny.model, ids)
    seen: list[tuple[int, torch.Tensor]] = []
    layers = [-1, 0]
    with capture(tiny.model, layers=layers, heads=[0], keep_maps=False,
                 on_layer=lambda i, p: seen.append((i, p.clone()))) as cap, torch.no_grad():
        tiny.model(input_ids=ids)
    n = tiny.spec.n_layers
    assert [i for i, _ in seen] == [0, n - 1]  # once each, in forward order
    assert cap.maps == {}
    for i, probs in seen:
        assert probs.dtype == torch.float32
        assert tuple(probs.shape) == (1, tiny.spec.n_heads, ids.shape[1], ids.shape[1])  # all heads
        np.testing.assert_allclose(probs[0].numpy(), full[i], atol=1e-6, rtol=0)


def test_on_layer_with_two_forwards_is_called_twice(tiny_gpt2):
    calls: list[int] = []
    with capture(tiny_gpt2.model, on_layer=lambda i, p: calls.append(i)) as cap:
        _run(tiny_gpt2)
        _run(tiny_gpt2, TEXT_60)
    assert calls == [0, 1, 0, 1]
    assert cap.calls == 4
    assert cap.maps[0].shape[-1] == len(TEXT_60)  # the last forward's maps are kept


# ----------------------------------------------------------------------------------------------- pooling


def _check_bins(bins: list[tuple[int, int]], t: int, size: int) -> None:
    assert bins[0] == (0, 1)  # position 0 has its own bin
    assert bins[-1][1] == t
    assert all(a < b for a, b in bins)
    assert all(bins[i][1] == bins[i + 1][0] for i in range(len(bins) - 1))  # contiguous, no gaps
    assert len(bins) == min(size, t)
    widths = [b - a for a, b in bins[1:]]
    assert max(widths) - min(widths) <= 1


@pytest.mark.parametrize("size", [5, 8, 16])
def test_pooled_maps(tiny, ref, size):
    ids = ref.encode(tiny, TEXT_60)
    t = ids.shape[1]
    full = ref.eager_attentions(tiny.model, ids)
    with capture(tiny.model, pool=size) as cap, torch.no_grad():
        tiny.model(input_ids=ids)
    _check_bins(cap.bins, t, size)
    for layer in cap.layers:
        m = cap.maps[layer][0].numpy()
        assert m.shape == (tiny.spec.n_heads, size, size)
        np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(m, ref.pool(full[layer], cap.bins), atol=1e-5, rtol=0)
        np.testing.assert_allclose(m[:, 0, 0], full[layer][:, 0, 0], atol=1e-6)  # row 0 is query 0 alone
        np.testing.assert_allclose(m[:, :, 0], ref.pool(full[layer], cap.bins)[:, :, 0], atol=1e-6)


def test_pool_with_head_selection(tiny_llama, ref):
    ids = ref.encode(tiny_llama, TEXT_60)
    full = ref.eager_attentions(tiny_llama.model, ids)
    with capture(tiny_llama.model, pool=6, heads=[2], layers=[1]) as cap, torch.no_grad():
        tiny_llama.model(input_ids=ids)
    assert list(cap.maps) == [1]
    np.testing.assert_allclose(cap.maps[1][0].numpy(), ref.pool(full[1][[2]], cap.bins), atol=1e-5, rtol=0)


def test_pool_larger_than_prompt_keeps_full_maps(tiny_llama, ref):
    ids = ref.encode(tiny_llama, TEXT_24)
    t = ids.shape[1]
    full = ref.eager_attentions(tiny_llama.model, ids)
    with capture(tiny_llama.model, pool=64) as cap, torch.no_grad():
        tiny_llama.model(input_ids=ids)
    assert cap.bins == [(i, i + 1) for i in range(t)]
    np.testing.assert_allclose(cap.maps[0][0].numpy(), full[0], atol=1e-6, rtol=0)


def test_pool_map_on_known_matrix():
    # uniform causal attention over 7 positions, pooled to 3 bins: (0,1), (1,4), (4,7)
    t = 7
    a = torch.tril(torch.ones(t, t))
    a = (a / a.sum(-1, keepdim=True))[None]
    pooled, bins = pool_map(a, 3)
    assert bins == [(0, 1), (1, 4), (4, 7)]
    expected = np.zeros((3, 3))
    expected[0] = [1, 0, 0]
    # queries 1..3 see 2..4 keys: key 0 gets mean(1/2, 1/3, 1/4)
    expected[1, 0] = np.mean([1 / 2, 1 / 3, 1 / 4])
    expected[1, 1] = 1 - expected[1, 0]
    expected[2, 0] = np.mean([1 / 5, 1 / 6, 1 / 7])
    expected[2, 1] = np.mean([3 / 5, 3 / 6, 3 / 7])
    expected[2, 2] = 1 - expected[2, 0] - expected[2, 1]
    np.testing.assert_allclose(pooled[0].numpy(), expected, atol=1e-6)


def test_pool_map_rejects_non_square():
    with pytest.raises(CaptureError, match="square"):
        pool_map(torch.zeros(1, 4, 5), 2)


@pytest.mark.parametrize(("length", "size"), [(10, 3), (7, 7), (5, 9), (100, 1), (1000, 96)])
def test_bin_edges(length, size):
    edges = bin_edges(length, size)
    assert len(edges) == min(size, length)
    assert edges[0][0] == 0 and edges[-1][1] == length
    assert all(edges[i][1] == edges[i + 1][0] for i in range(len(edges) - 1))
    widths = [b - a for a, b in edges]
    assert min(widths) >= 1 and max(widths) - min(widths) <= 1


# ----------------------------------------------------------------------------------- unsupported models


class _Plain(nn.Module):
    def __init__(self, config=None, layers=None):
        super().__init__()
        if config is not None:
            self.config = config
        self.layers = layers if layers is not None else nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_plain_module_without_config():
    with pytest.raises(CaptureError, match="has no config"), capture(_Plain()):
        pass


def test_plain_module_with_config_but_no_attention():
    model = _Plain(SimpleNamespace(num_hidden_layers=2, _attn_implementation="sdpa"))
    with pytest.raises(CaptureError, match="can't find the decoder layers of _Plain"), capture(model):
        pass


def test_transformers_model_whose_layers_lack_self_attn():
    model = build_llama()
    for layer in model.model.layers:
        del layer.self_attn
    with pytest.raises(CaptureError, match="self_attn"), capture(model):
        pass
    assert model.config._attn_implementation == "sdpa"


class _NoProbsAttention(nn.Module):
    def forward(self, x):
        return x * 2  # a tensor, not (output, probabilities)


class _NoProbsLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _NoProbsAttention()

    def forward(self, x):
        return self.self_attn(x)


def test_attention_without_probabilities():
    model = _Plain(SimpleNamespace(num_hidden_layers=2), nn.ModuleList([_NoProbsLayer(), _NoProbsLayer()]))
    with pytest.raises(CaptureError, match=r"layers \[0, 1\] returned no probabilities"):
        with capture(model) as cap:
            model(torch.ones(3))
        assert cap.maps == {}
    assert all(layer.self_attn._forward_hooks == {} for layer in model.layers)


def test_model_that_cannot_switch_to_eager():
    model = _Plain(SimpleNamespace(num_hidden_layers=2, _attn_implementation="sdpa"),
                   nn.ModuleList([_NoProbsLayer(), _NoProbsLayer()]))
    with pytest.raises(CaptureError, match="can't switch its attention implementation to eager"), capture(model):
        pass
    assert all(layer.self_attn._forward_hooks == {} for layer in model.layers)
