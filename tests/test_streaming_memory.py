"""KV-cache memory from the model's shape, checked against the measured size of real cache tensors."""

from __future__ import annotations

import families
import pytest
import torch
from conftest import loaded
from transformers import DynamicCache

from sinkscope.streaming.memory import (
    bytes_per_token_per_layer,
    format_bytes,
    kv_bytes,
    layer_bytes_per_token,
    memory_profile,
)


def measured_dense_bytes(lm, n_tokens: int) -> int:
    """Feed ``n_tokens`` one by one through a DynamicCache and add up its stored K/V tensors."""
    cache = DynamicCache(config=lm.model.config)
    ids = torch.arange(4, 4 + n_tokens).remainder(90) + 4
    with torch.no_grad():
        for t in range(n_tokens):
            lm.model(input_ids=ids[None, t:t + 1], past_key_values=cache, use_cache=True)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_bytes_per_token_llama(tiny_llama):
    # 2 (K and V) x 2 KV heads x head_dim 8 x 4 bytes
    assert bytes_per_token_per_layer(tiny_llama.spec) == 2 * 2 * 8 * 4
    assert bytes_per_token_per_layer(tiny_llama.spec, "bfloat16") == 2 * 2 * 8 * 2


@pytest.mark.parametrize("n_tokens", [1, 3, 9])
def test_dense_matches_measured_cache(tiny, n_tokens):
    if tiny.spec.positional == "absolute" and n_tokens > tiny.spec.max_positions:
        pytest.skip("beyond the position table")
    assert kv_bytes(tiny.spec, n_tokens) == measured_dense_bytes(tiny, n_tokens)


def test_gemma_sliding_layers_are_capped(tiny_gemma3):
    spec = tiny_gemma3.spec  # sliding / full / sliding, window 4: sliding layers keep 3 tokens
    per = bytes_per_token_per_layer(spec)
    assert kv_bytes(spec, 20) == (3 + 20 + 3) * per
    assert kv_bytes(spec, 20, sinks=2, window=5) == (3 + 6 + 3) * per
    assert kv_bytes(spec, 20) == measured_dense_bytes(tiny_gemma3, 20)


def test_sink_cache_is_constant_past_its_budget(tiny_llama):
    spec = tiny_llama.spec
    rows = memory_profile(spec, [4, 7, 100, 10_000], sinks=4, window=4)
    per = bytes_per_token_per_layer(spec) * spec.n_layers
    assert [r.sink_bytes for r in rows] == [4 * per, 7 * per, 7 * per, 7 * per]  # S + W - 1 stored
    assert [r.dense_bytes for r in rows] == [4 * per, 7 * per, 100 * per, 10_000 * per]
    assert rows[-1].ratio == pytest.approx(10_000 / 7)
    assert rows[-1].to_dict()["ratio"] == rows[-1].ratio


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"


def test_bad_arguments(tiny_llama):
    with pytest.raises(ValueError):
        kv_bytes(tiny_llama.spec, -1)
    with pytest.raises(ValueError):
        kv_bytes(tiny_llama.spec, 3, dtype="int4")


@pytest.mark.parametrize("n_tokens", [3, 12, 40])
def test_sink_cache_matches_measured_tensors(tiny_llama, tiny_gemma3, n_tokens):
    from sinkscope.streaming import SinkCache

    for lm in (tiny_llama, tiny_gemma3):
        cache = SinkCache(lm.model, 2, 6)
        with torch.no_grad():
            for t in range(n_tokens):
                lm.model(input_ids=torch.tensor([[4 + t % 80]]), past_key_values=cache, use_cache=True)
        assert kv_bytes(lm.spec, n_tokens, sinks=2, window=6) == cache.nbytes()


# ---------------------------------------------------------------------------- per-layer figures (the scheme)

PER_LAYER_FAMILIES = ["llama", "gemma4", "qwen3_next", "falcon", "mpt", "bloom", "gptj", "gpt2", "phi3", "gemma3",
                      "deepseek_v3", "gemma3n", "llama4"]


def measured_model_bytes(model, n_tokens: int, cache=None) -> int:
    """Feed ``n_tokens`` one by one (a DynamicCache unless ``cache``) and add up the stored K/V tensors; linear
    attention state and KV-shared layers hold none."""
    from sinkscope.streaming import SinkCache

    cache = DynamicCache(config=model.config) if cache is None else cache
    ids = families.token_ids(n_tokens)
    with torch.no_grad():
        for t in range(n_tokens):
            model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    if isinstance(cache, SinkCache):
        return cache.nbytes()
    tensors = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    return sum(t.nbytes for t in tensors if t is not None)


@pytest.mark.parametrize("name", PER_LAYER_FAMILIES)
def test_per_layer_dense_bytes_match_measured(name, tok_bos):
    model = families.build(name)
    spec = loaded(model, tok_bos, name).spec
    for n_tokens in (1, 9):
        assert kv_bytes(spec, n_tokens, model=model) == measured_model_bytes(model, n_tokens), n_tokens


@pytest.mark.parametrize("name", ["gemma4", "qwen3_next", "falcon", "gptj"])
def test_per_layer_sink_bytes_match_the_cache(name, tok_bos):
    from sinkscope.streaming import SinkCache

    model = families.build(name)
    spec = loaded(model, tok_bos, name).spec
    for n_tokens in (3, 20):
        cache = SinkCache(model, 2, 6)
        assert kv_bytes(spec, n_tokens, sinks=2, window=6, model=model) == measured_model_bytes(model, n_tokens, cache)


def test_per_layer_head_dims_and_linear_layers(tok_bos):
    gemma4 = families.build("gemma4")  # sliding: 2 KV heads x (8 + 8); full: 2 x (16 + 16); float32
    spec = loaded(gemma4, tok_bos, "gemma4").spec
    assert layer_bytes_per_token(spec, model=gemma4) == [2 * 16 * 4, 2 * 32 * 4]
    assert layer_bytes_per_token(spec) == [2 * 2 * 16 * 4] * 2  # model-wide: the largest head dim everywhere
    qwen = families.build("qwen3_next")  # [linear_attention, full_attention]: the linear state isn't per token
    spec = loaded(qwen, tok_bos, "qwen3_next").spec
    assert layer_bytes_per_token(spec, model=qwen) == layer_bytes_per_token(spec) == [0, 2 * 16 * 4]
    rows = memory_profile(spec, [5, 500], sinks=2, window=6, model=qwen)
    assert [r.sink_bytes for r in rows] == [5 * 128, 7 * 128] and rows[1].dense_bytes == 500 * 128
