"""SinkCache: exactness against DynamicCache, re-rotation against independent recomputation, bookkeeping.

The independent references don't use the cache at all:

* one-layer Llama: a layer's keys and values depend only on the token and its position, so the next-token
  logits of a stream equal a fresh forward over the token ids the query attends to (sinks + window), with
  explicit positions ``0 .. S+W-1``;
* Gemma-3 ``[sliding, full]``: the local layer sees only relative distances, so a dense forward (no cache)
  over the whole stream gives the inputs of the global layer for every token; running the global layer
  itself over the kept tokens at positions ``0 .. S+W-1``, then the norm and the LM head, gives the logits;
* every family SinkCache serves (tests/families.py): a one-layer model against the fresh forward (partial and
  interleaved RoPE, GPT-J's sinusoidal table, ALiBi, NoPE, proportional RoPE); Qwen3-Next
  ``[linear_attention, full_attention]`` and Gemma-4 ``[sliding, full]`` against a dense forward spliced into
  the attention layer (`spliced_reference`). The refused families must say why, in one line.
"""

from __future__ import annotations

import inspect

import families
import pytest
import torch
from conftest import build_gemma3, build_gpt2, build_llama
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import sinkscope.streaming.cache as cache_mod
from sinkscope.errors import ConfigError
from sinkscope.streaming import SinkCache

VOCAB = 64


def tiny_llama(layers: int = 1, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kwargs = {"max_position_embeddings": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
              "initializer_range": 0.1, **overrides}  # larger weights: peaked attention, positions matter more
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, **kwargs)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma(layer_types=("sliding_attention", "full_attention"), sliding_window: int = 4, seed: int = 1,
               attn: str = "sdpa") -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                           max_position_embeddings=128, layer_types=list(layer_types), sliding_window=sliding_window,
                           initializer_range=0.1)
    model = Gemma3ForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (1, n), generator=g)


@torch.no_grad()
def stream(model, ids: torch.Tensor, cache, on_step=None) -> list[torch.Tensor]:
    """Feed ``ids`` one token at a time; the last-position logits of every step."""
    out = []
    for t in range(ids.shape[1]):
        if on_step is not None:
            on_step(t, cache)
        out.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1])
    return out


def attended(t: int, sinks: int, window: int) -> list[int]:
    """Stream indices the query at index ``t`` attends to (sinks on throughout)."""
    if t < sinks + window:
        return list(range(t + 1))
    return list(range(sinks)) + list(range(t - window + 1, t + 1))


@torch.no_grad()
def fresh_logits(model, ids: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """No cache: the kept ids at positions 0 .. len-1, last-position logits (ALiBi models: from the sequence)."""
    kwargs = {"input_ids": ids[:, idx], "use_cache": False}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = torch.arange(len(idx)).unsqueeze(0)
    return model(**kwargs).logits[0, -1]


@torch.no_grad()
def gemma_reference(model, ids: torch.Tensor, t: int, idx: list[int]) -> torch.Tensor:
    """Logits of token ``t`` for a Gemma-3 [sliding, full] model whose global layer attends to ``idx``."""
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = model.model.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids[:, :t + 1], use_cache=False)  # dense: the local layer is exact without a cache
    finally:
        handle.remove()
    h = seen["h"][:, idx]
    pos = torch.arange(len(idx)).unsqueeze(0)
    pe = model.model.rotary_emb(h, pos, "full_attention")
    y = model.model.layers[1](h, position_embeddings=pe, attention_mask=None, position_ids=pos)
    return model.lm_head(model.model.norm(y))[0, -1]


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_short_stream_matches_dynamic_cache(arch):
    model = build_llama() if arch == "llama" else build_gemma3()  # 3 layers; Gemma-3 local window 4
    ids = token_ids(14)
    sink = stream(model, ids, SinkCache(model, 2, 12))  # 14 = S + W tokens: nothing evicted yet
    dense = stream(model, ids, DynamicCache(config=model.config))
    for t, (a, b) in enumerate(zip(sink, dense, strict=True)):
        assert torch.allclose(a, b, atol=1e-5), f"token {t}: {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefill_then_tokens_match_dynamic_cache(arch):
    model = build_llama() if arch == "llama" else build_gemma3()
    ids = token_ids(16)
    with torch.no_grad():
        caches = [SinkCache(model, 4, 12), DynamicCache(config=model.config)]
        pre = [model(input_ids=ids[:, :9], past_key_values=c, use_cache=True).logits for c in caches]
        assert torch.allclose(*pre, atol=1e-5)
        rest = [stream(model, ids[:, 9:], c) for c in caches]
    assert torch.allclose(torch.stack(rest[0]), torch.stack(rest[1]), atol=1e-5)


@pytest.mark.parametrize(("sinks", "window"), [(2, 6), (4, 5), (0, 7), (1, 1)])
def test_rerotation_matches_fresh_recomputation_llama(sinks, window):
    model = tiny_llama()
    ids = token_ids(40)
    logits = stream(model, ids, SinkCache(model, sinks, window))
    for t in range(sinks + window, 40, 3):
        ref = fresh_logits(model, ids, attended(t, sinks, window))
        assert torch.allclose(logits[t], ref, atol=1e-4), f"t={t}: {(logits[t] - ref).abs().max():.2e}"


def test_rerotation_check_is_sensitive(monkeypatch):
    """Without re-rotation (a naive eviction) the same comparison fails: the test above has teeth."""
    model = tiny_llama()
    ids = token_ids(40)
    cache = SinkCache(model, 2, 6)
    monkeypatch.setattr(cache_mod, "rerotate", lambda keys, *args: keys)
    logits = stream(model, ids, cache)
    ref = fresh_logits(model, ids, attended(39, 2, 6))
    assert (logits[39] - ref).abs().max() > 1e-3


def test_rerotation_with_yarn_attention_scaling():
    model = tiny_llama(rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                                        "original_max_position_embeddings": 32})
    assert model.model.rotary_emb.attention_scaling != 1.0
    ids = token_ids(30)
    logits = stream(model, ids, SinkCache(model, 2, 6))
    for t in (10, 29):
        assert torch.allclose(logits[t], fresh_logits(model, ids, attended(t, 2, 6)), atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("sliding_window", "sinks", "window"), [(4, 2, 6), (12, 2, 6), (5, 0, 4)])
def test_rerotation_matches_reference_gemma3(sliding_window, sinks, window, attn):
    """Local window smaller and larger than S + W (the latter puts local keys at negative positions)."""
    model = tiny_gemma(sliding_window=sliding_window, attn=attn)
    ids = token_ids(36, seed=1)
    logits = stream(model, ids, SinkCache(model, sinks, window))
    for t in (sinks + window + 1, 20, 35):
        ref = gemma_reference(model, ids, t, attended(t, sinks, window))
        assert torch.allclose(logits[t], ref, atol=1e-4), f"t={t}: {(logits[t] - ref).abs().max():.2e}"


def test_gemma3_local_only_layers_keep_their_window():
    """All-local Gemma-3: sinks don't apply, every layer keeps its trained window, so streaming is the dense model."""
    model = tiny_gemma(layer_types=("sliding_attention",) * 2, sliding_window=5)
    ids = token_ids(30)
    logits = torch.stack(stream(model, ids, SinkCache(model, 2, 4)))
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits[0]
    assert torch.allclose(logits, dense, atol=1e-4)


def test_long_prefill_is_dense_then_trimmed():
    model = tiny_llama()
    ids = token_ids(31)
    cache = SinkCache(model, 2, 6)
    with torch.no_grad():
        pre = model(input_ids=ids[:, :30], past_key_values=cache, use_cache=True).logits
        dense = model(input_ids=ids[:, :30], use_cache=False).logits
    assert torch.allclose(pre, dense, atol=1e-5)  # the prefill saw its whole context at positions 0..29
    assert cache.get_seq_length() == cache.capacity == 7 and cache.seen_tokens == 30
    nxt = stream(model, ids[:, 30:], cache)[0]
    assert torch.allclose(nxt, fresh_logits(model, ids, attended(30, 2, 6)), atol=1e-4)


# ------------------------------------------------------------------------------------------ bookkeeping


def test_lengths_positions_and_bytes_gemma3():
    model = tiny_gemma(layer_types=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=4)
    cache = SinkCache(model, 2, 6)
    assert cache.capacity == 7 and cache.cache_length == 0 and cache.nbytes() == 0

    def check(t, c):  # state before feeding token t
        assert c.seen_tokens == t
        assert c.get_seq_length() == min(t, 7)
        assert c.stored_lengths() == [min(t, 3), min(t, 7), min(t, 3)]
        assert c.cache_length == min(t, 7) <= c.sinks + c.window
        per_token = 2 * 2 * 8 * 4  # keys + values, 2 KV heads, head dim 8, float32
        assert c.nbytes() == per_token * sum(c.stored_lengths())
        assert c.nbytes() == sum(t.nbytes for layer in c.layers for t in (layer.keys, layer.values)
                                 if t is not None)

    stream(model, token_ids(25), cache, on_step=check)
    check(25, cache)
    cache.reset()
    check(0, cache)


def test_window_only_when_no_sinks():
    model = tiny_llama()
    ids = token_ids(20)
    cache = SinkCache(model, 0, 5)
    logits = stream(model, ids, cache)
    assert cache.get_seq_length() == 4
    assert torch.allclose(logits[19], fresh_logits(model, ids, list(range(15, 20))), atol=1e-4)


def test_sink_switch_off_then_on():
    """S=2, W=4. Hand-written expectations of the documented switch: off drops the sinks at once (a plain
    window of W), on re-prefills the first S tokens exactly (sinks + window again)."""
    model = tiny_llama()
    ids = token_ids(16)
    expected = {
        9: [0, 1, 6, 7, 8, 9],  # sinks on
        10: [7, 8, 9, 10],  # switched off before 10: the sinks are gone at once, a window of W
        11: [8, 9, 10, 11],
        12: [9, 10, 11, 12],
        13: [0, 1, 10, 11, 12, 13],  # switched on before 13: tokens 0 and 1 re-prefilled
        14: [0, 1, 11, 12, 13, 14],
        15: [0, 1, 12, 13, 14, 15],
    }
    lengths = {}

    def flip(t, c):
        if t == 10:
            c.set_sinks(False)
            assert not c.sinks_enabled and c.cache_length == 3
        if t == 13:
            c.set_sinks(True, sink_ids=ids[0, :2].tolist())
            assert c.sinks_enabled and c.cache_length == 5
        lengths[t] = c.cache_length

    cache = SinkCache(model, 2, 4)
    logits = stream(model, ids, cache, on_step=flip)
    for t, idx in expected.items():
        ref = fresh_logits(model, ids, idx)
        assert torch.allclose(logits[t], ref, atol=1e-4), f"t={t}: {(logits[t] - ref).abs().max():.2e}"
    assert [lengths[t] for t in (10, 11, 12, 13, 14)] == [3, 3, 3, 5, 5]
    assert cache.cache_length == 5


def test_switching_back_on_restores_the_original_sinks_exactly():
    """Re-prefilling the first S tokens gives back the keys and values they had (any depth: they only ever
    saw each other); local layers of Gemma-3 move with the frame and keep their keys. Also Qwen3-Next (its
    linear layer before the attention layer), Gemma-4 (per-layer head dims), BLOOM (ALiBi), GPT-J."""
    models = (tiny_llama(layers=3), tiny_gemma(("sliding_attention", "full_attention") * 2, sliding_window=6),
              families.build("qwen3_next"), families.build("gemma4"), families.build("bloom"),
              families.build("gptj"))
    for model in models:
        ids = token_ids(40)
        cache = SinkCache(model, 3, 8)
        stream(model, ids[:, :20], cache)
        before = [(layer.keys[..., :3, :].clone(), layer.values[..., :3, :].clone())
                  for layer in cache.layers if isinstance(layer, cache_mod._SinkLayer)]
        cache.set_sinks(False)
        stream(model, ids[:, 20:30], cache)
        cache.set_sinks(True, sink_ids=ids[0, :3])
        after = [(layer.keys[..., :3, :], layer.values[..., :3, :])
                 for layer in cache.layers if isinstance(layer, cache_mod._SinkLayer)]
        for (k0, v0), (k1, v1) in zip(before, after, strict=True):
            assert torch.allclose(k0, k1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-5)
        assert cache.get_seq_length() == 3 + 8 - 1
        stream(model, ids[:, 30:], cache)  # streams on within budget
        assert cache.cache_length == 3 + 8 - 1


def test_switch_refusals():
    model = tiny_llama()
    ids = token_ids(12)
    cache = SinkCache(model, 2, 4)
    stream(model, ids[:, :1], cache)
    with pytest.raises(ConfigError, match="fewer than its 2 sinks"):
        cache.set_sinks(False)
    stream(model, ids[:, 1:8], cache)
    cache.set_sinks(False)
    with pytest.raises(ConfigError, match="first 2 token ids"):
        cache.set_sinks(True)
    with pytest.raises(ConfigError, match="has 3 ids"):
        cache.set_sinks(True, sink_ids=[1, 2, 3])
    from_config = SinkCache(model.config, 2, 4)
    stream(model, ids[:, :8], from_config)
    from_config.set_sinks(False)
    with pytest.raises(ConfigError, match="needs the model"):
        from_config.set_sinks(True, sink_ids=ids[0, :2])


def test_config_built_cache_serves_a_manual_loop():
    model = tiny_llama()
    ids = token_ids(20)
    a = stream(model, ids, SinkCache(model.config, 2, 6))
    b = stream(model, ids, SinkCache(model, 2, 6))
    assert torch.allclose(torch.stack(a), torch.stack(b), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_explicit_absolute_positions_are_replaced_by_the_cache(arch):
    """What generate() does: position_ids counted over the whole stream. The cache owns positions (GPT-J: the
    hook sits on GPTJModel, which holds the decoder layers; it has no rotary module)."""
    model = tiny_llama() if arch == "llama" else one_layer("gptj")
    ids = token_ids(20)
    cache = SinkCache(model, 2, 6)
    with torch.no_grad():
        for t in range(20):
            out = model(input_ids=ids[:, t:t + 1], position_ids=torch.tensor([[t]]), past_key_values=cache)
    assert torch.allclose(out.logits[0, -1], fresh_logits(model, ids, attended(19, 2, 6)), atol=1e-4)


# ------------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_past_the_window(arch):
    model = tiny_llama(layers=2) if arch == "llama" else tiny_gemma()
    prompt = token_ids(5)
    new = 20  # more than S + W = 8
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=SinkCache(model, 2, 6), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    assert out.sequences.shape == (1, 5 + new)
    # The same tokens through a manual loop give the same logits (so generate used the cache's positions).
    cache = SinkCache(model, 2, 6)
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache).logits[0, -1:]
        manual = [logits]
        for t in range(5, 5 + new - 1):
            manual.append(model(input_ids=out.sequences[:, t:t + 1], past_key_values=cache).logits[0, -1:])
    assert torch.allclose(torch.cat(out.logits), torch.cat(manual), atol=1e-4)


def test_generate_refuses_config_built_and_evicted_caches():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="from the model"):
        model.generate(token_ids(3), past_key_values=SinkCache(model.config, 2, 6), max_new_tokens=2)
    cache = SinkCache(model, 2, 6)
    stream(model, token_ids(12), cache)
    with pytest.raises(ConfigError, match="evicted"):
        model.generate(token_ids(13), past_key_values=cache, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("sinks", "window"), [(-1, 4), (2, 0), (1.5, 4), (2, True), (None, 4)])
def test_bad_sizes(sinks, window):
    with pytest.raises(ConfigError, match="sinks >= 0 and window >= 1"):
        SinkCache(tiny_llama(), sinks, window)


def test_sizes_past_the_model_positions():
    model = tiny_llama()  # 128 positions
    SinkCache(model, 4, 124)
    with pytest.raises(ConfigError, match="128 positions"):
        SinkCache(model, 4, 125)


def test_forward_past_the_model_positions_is_refused_before_storing():
    model = tiny_llama(max_position_embeddings=32)
    cache = SinkCache(model, 2, 6)
    with torch.no_grad():
        model(input_ids=token_ids(20), past_key_values=cache)
        assert cache.max_forward_tokens == 32 - 7
        with pytest.raises(ConfigError, match="at most 25 tokens"):
            model(input_ids=token_ids(26), past_key_values=cache)
        assert cache.seen_tokens == 20 and cache.get_seq_length() == 7
        model(input_ids=token_ids(25), past_key_values=cache)  # exactly fits
    assert cache.seen_tokens == 45


def test_batch_size_change_is_refused():
    model = tiny_llama()
    cache = SinkCache(model, 2, 6)
    with torch.no_grad():
        assert cache.batch_size == -1
        model(input_ids=token_ids(4).repeat(2, 1), past_key_values=cache)
        assert cache.batch_size == 2
        with pytest.raises(ConfigError, match="batch size 2"):
            model(input_ids=token_ids(1), past_key_values=cache)
        cache.reset()
        model(input_ids=token_ids(1), past_key_values=cache)
    assert cache.seen_tokens == 1


def test_gpt2_is_refused():
    model = build_gpt2()
    for source in (model, model.config):
        with pytest.raises(ConfigError, match=r"GPT2LMHeadModel: .*learns absolute position embeddings instead of ro"):
            SinkCache(source, 4, 16)


def test_longrope_is_refused():
    cfg = {"rope_type": "longrope", "rope_theta": 100.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
           "original_max_position_embeddings": 32}
    with pytest.raises(ConfigError, match="longrope"):
        SinkCache(tiny_llama(rope_parameters=cfg), 2, 6)


def test_crop_and_non_models_are_refused():
    model = tiny_llama()
    cache = SinkCache(model, 2, 6)
    with pytest.raises(ConfigError, match="cropped"):
        cache.crop(-1)
    with pytest.raises(ConfigError, match="model or config"):
        SinkCache("llama", 2, 6)


def test_gemma3_switch_keeps_local_layers_exact():
    """Gemma-3 [sliding, full]: off, then on again; the global layer sees the expected tokens and the local
    layer (which moved with the frame) still sees its own sliding window."""
    model = tiny_gemma()
    ids = token_ids(20)
    logits = {}
    cache = SinkCache(model, 2, 4)
    with torch.no_grad():
        for t in range(20):
            if t == 10:
                cache.set_sinks(False)
            if t == 14:
                cache.set_sinks(True, sink_ids=ids[0, :2])
            logits[t] = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
    for t, idx in {11: [8, 9, 10, 11], 14: [0, 1, 11, 12, 13, 14], 16: [0, 1, 13, 14, 15, 16]}.items():
        ref = gemma_reference(model, ids, t, idx)
        assert torch.allclose(logits[t], ref, atol=1e-4), f"t={t}: {(logits[t] - ref).abs().max():.2e}"


# ------------------------------------------------------------------------------------------------- families
#
# Every family of tests/families.py that SinkCache serves, cut down to ONE full-attention layer (in the family's
# own config names where it has them), streamed token by token past many evictions against a fresh forward
# over the kept ids (`fresh_logits`). The scheme facts each case is meant to exercise are checked too, so that
# a case can't silently turn into plain RoPE.

S_FAM, W_FAM, T_FAM = 2, 8, 40
_ONE_LAYER = {"gptj": {"n_layer": 1}, "mpt": {"n_layers": 1}, "bloom": {"n_layer": 1},
              "smollm3": {"no_rope_layers": [0]}, "smollm3_rope": {"no_rope_layers": [1]},
              "gemma2": {"layer_types": ["full_attention"]}, "gemma3": {"layer_types": ["full_attention"]},
              "gemma4": {"layer_types": ["full_attention"]}, "gpt_oss": {"layer_types": ["full_attention"]},
              "mistral": {"sliding_window": None}, "mixtral": {"sliding_window": None},
              "phi3": {"sliding_window": None}, "qwen2": {"use_sliding_window": False}}
# name -> (positions, rope layout, rotary dims, key head dim) of the one layer
SERVED = {
    "llama": ("rope", "half", 8, 8), "mistral": ("rope", "half", 8, 8), "mixtral": ("rope", "half", 8, 8),
    "qwen2": ("rope", "half", 8, 8), "qwen3": ("rope", "half", 8, 8), "qwen3_moe": ("rope", "half", 8, 8),
    "phi": ("rope", "half", 4, 8), "phi3": ("rope", "half", 8, 8), "gpt_neox": ("rope", "half", 4, 8),
    "stablelm": ("rope", "half", 2, 8), "gptj": ("rope", "interleaved", 4, 8),
    "cohere": ("rope", "interleaved", 8, 8), "falcon": ("rope", "half", 8, 8),
    "falcon_alibi": ("alibi", None, None, 8), "mpt": ("alibi", None, None, 8), "bloom": ("alibi", None, None, 8),
    "gemma": ("rope", "half", 8, 8), "gemma2": ("rope", "half", 8, 8), "gemma3": ("rope", "half", 8, 8),
    "gemma4": ("rope", "half", 16, 16), "olmo2": ("rope", "half", 8, 8), "granite": ("rope", "half", 8, 8),
    "gpt_oss": ("rope", "half", 8, 8), "smollm3": ("none", None, None, 8), "smollm3_rope": ("rope", "half", 8, 8),
}


def one_layer(name: str, **overrides):
    """Family ``name`` with one full-attention layer (``smollm3``: a NoPE layer, ``smollm3_rope``: a RoPE one)."""
    family = "smollm3" if name.startswith("smollm3") else name
    return families.build(family, num_hidden_layers=1, **{**_ONE_LAYER.get(name, {}), **overrides})


def max_error_after_evictions(model, ids: torch.Tensor, logits: list[torch.Tensor], sinks: int, window: int,
                              reference=fresh_logits) -> float:
    """Largest |logit difference| to the reference over the steps that follow the first eviction."""
    return max((logits[t] - reference(model, ids, attended(t, sinks, window))).abs().max().item()
               for t in range(sinks + window, ids.shape[1]))


@pytest.mark.parametrize("name", sorted(SERVED))
def test_family_streams_exactly(name):
    model = one_layer(name)
    ids = families.token_ids(T_FAM)
    cache = SinkCache(model, S_FAM, W_FAM)
    layer = cache.layers[0]
    positions, layout, rotary_dim, head_dim = SERVED[name]
    assert cache.scheme.layers[0].positions == positions and cache.scheme.layers[0].qk_head_dim == head_dim
    assert (layer.rope is None) == (positions != "rope")  # ALiBi and NoPE keys are never re-rotated
    if layer.rope is not None:
        assert (layer.rope.layout, 2 * layer.rope.inv_freq.numel()) == (layout, rotary_dim)
    logits = stream(model, ids, cache)
    assert cache.seen_tokens == T_FAM and cache.get_seq_length() == S_FAM + W_FAM - 1
    err = max_error_after_evictions(model, ids, logits, S_FAM, W_FAM)
    assert err < 1e-4, f"{name}: max |logit difference| {err:.2e} after evictions"


@pytest.mark.parametrize("name", ["phi", "gpt_neox", "gptj", "cohere", "gemma4"])
def test_family_check_has_teeth(name, monkeypatch):
    """Partial, interleaved and proportional RoPE: without re-rotation the same comparison fails."""
    model = one_layer(name)
    ids = families.token_ids(T_FAM)
    cache = SinkCache(model, S_FAM, W_FAM)
    monkeypatch.setattr(cache_mod, "rerotate", lambda keys, *args: keys)
    assert max_error_after_evictions(model, ids, stream(model, ids, cache), S_FAM, W_FAM) > 1e-3


def spliced_reference(layer: int):
    """Reference for a model whose layers before ``layer`` (the only sink layer) never evict: linear attention
    (Qwen3-Next) or a local sliding window (Gemma-4). A dense forward over the whole stream, without any cache,
    gives the input of ``layer`` for every token; a forward over the kept ids at positions ``0 .. len-1`` with
    ``layer``'s input replaced by those dense hidden states (the model's own rotary, masks, norm and head)
    gives the logits."""

    @torch.no_grad()
    def reference(model, ids: torch.Tensor, idx: list[int]) -> torch.Tensor:
        block = model.model.layers[layer]
        seen = {}

        def grab(mod, args, kwargs):
            seen["h"] = args[0] if args else kwargs["hidden_states"]

        def splice(mod, args, kwargs):
            h = seen["h"][:, idx]
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(input_ids=ids[:, :idx[-1] + 1], use_cache=False)
        finally:
            handle.remove()
        handle = block.register_forward_pre_hook(splice, with_kwargs=True)
        try:
            return fresh_logits(model, ids, idx)
        finally:
            handle.remove()

    return reference


def test_qwen3_next_keeps_linear_state_and_evicts_attention():
    """[linear_attention, full_attention]: the linear layer keeps transformers' fixed-size state (it sees the
    whole stream), the attention layer gets sinks + window; the reference runs the dense model for the linear
    layer."""
    model = families.build("qwen3_next")
    ids = families.token_ids(T_FAM)
    cache = SinkCache(model, S_FAM, W_FAM)
    assert [type(layer).__name__ for layer in cache.layers] == ["LinearAttentionLayer", "_SinkLayer"]
    logits = stream(model, ids, cache)
    assert cache.get_seq_length() == S_FAM + W_FAM - 1 and cache.seen_tokens == T_FAM
    assert cache.stored_lengths() == [0, S_FAM + W_FAM - 1] and cache.has_previous_state(0)
    err = max_error_after_evictions(model, ids, logits, S_FAM, W_FAM, reference=spliced_reference(1))
    assert err < 1e-4, f"max |logit difference| {err:.2e}"
    cache.reset()
    assert cache.seen_tokens == 0 and not cache.has_previous_state(0)


def test_gemma4_per_layer_head_dims():
    """Gemma-4 [sliding (head dim 8, default RoPE), full (head dim 16, proportional partial RoPE)]."""
    model = families.build("gemma4")
    ids = families.token_ids(T_FAM)
    cache = SinkCache(model, S_FAM, W_FAM)
    logits = stream(model, ids, cache)
    assert [layer.keys.shape[-1] for layer in cache.layers] == [8, 16]
    freqs = cache.layers[1].rope.inv_freq
    assert freqs.numel() == 8 and int((freqs > 0).sum()) == 2  # proportional: 4 of 16 dimensions rotate
    err = max_error_after_evictions(model, ids, logits, S_FAM, W_FAM, reference=spliced_reference(1))
    assert err < 1e-4, f"max |logit difference| {err:.2e}"


def test_smollm3_nope_layers_are_not_rerotated():
    model = families.build("smollm3", num_hidden_layers=4)  # no_rope_layer_interval 2: layers 1 and 3 NoPE
    cache = SinkCache(model, S_FAM, W_FAM)
    assert [layer.rope is not None for layer in cache.layers] == [True, False, True, False]
    stream(model, families.token_ids(20), cache)
    assert cache.get_seq_length() == S_FAM + W_FAM - 1


@pytest.mark.parametrize("name", ["gptj", "phi", "cohere", "falcon_alibi", "gemma4"])
def test_config_built_cache_matches_model_built(name):
    """From a config the scheme comes from the meta-device model, RoPE from the rotary class (GPT-J: its table)."""
    model = one_layer(name)
    ids = families.token_ids(24)
    a = stream(model, ids, SinkCache(model.config, S_FAM, W_FAM))
    b = stream(model, ids, SinkCache(model, S_FAM, W_FAM))
    assert torch.allclose(torch.stack(a), torch.stack(b), atol=1e-6)


@pytest.mark.parametrize("name", ["bloom", "falcon_alibi", "mpt", "gptj", "cohere"])
def test_generate_matches_the_token_loop(name):
    """generate() with a SinkCache past several evictions gives the token loop's logits: ALiBi (the bias length
    follows the cache through the replaced 2-D mask) and interleaved RoPE (GPT-J's positions reach GPTJModel)."""
    overrides = {"gptj": {"n_layer": 2}, "mpt": {"n_layers": 2}, "bloom": {"n_layer": 2}}.get(name, {})
    model = families.build(name, **overrides)
    prompt = families.token_ids(5)
    new = 20
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=SinkCache(model, 2, 6), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    cache = SinkCache(model, 2, 6)
    with torch.no_grad():
        manual = [model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[0, -1:]]
        for t in range(5, 5 + new - 1):
            manual.append(model(input_ids=out.sequences[:, t:t + 1], past_key_values=cache, use_cache=True)
                          .logits[0, -1:])
    assert cache.seen_tokens == 5 + new - 1 > cache.get_seq_length()
    assert torch.allclose(torch.cat(out.logits), torch.cat(manual), atol=1e-4)


def test_padded_masks_and_use_cache_false_are_refused():
    model = one_layer("bloom")
    cache = SinkCache(model, 2, 6)
    with torch.no_grad(), pytest.raises(ConfigError, match="padded batches"):
        model(input_ids=families.token_ids(4), attention_mask=torch.tensor([[0, 1, 1, 1]]), past_key_values=cache)
    with torch.no_grad(), pytest.raises(ConfigError, match="use_cache=True"):
        model(input_ids=families.token_ids(4), past_key_values=cache, use_cache=False)
    assert cache.seen_tokens == 0


REFUSED = {
    "gpt2": "learns absolute position embeddings",
    "opt": "learns absolute position embeddings",
    "deepseek_v3": "multi-head latent attention",
    "llama4": "scales queries by their absolute position",
    "llama4_chunked": "chunked attention layers",
    "gemma3n": "KV sharing",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_families_say_why(name):
    model = (families.build("llama4", attn_temperature_tuning=False) if name == "llama4_chunked"
             else families.build(name))
    arch = model.config.architectures[0] if model.config.architectures else type(model).__name__
    for source in (model, model.config):
        with pytest.raises(ConfigError) as exc:
            SinkCache(source, 2, 8)
        msg = str(exc.value)
        assert "\n" not in msg and REFUSED[name] in msg and msg.startswith(f"{arch}: SinkCache"), msg
        assert "use analyze/report" in msg  # what works instead
