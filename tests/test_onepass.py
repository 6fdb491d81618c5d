"""One-pass streaming evaluation (sinkscope.streaming.onepass) against token-by-token SinkCache streaming.

The reference is the token-by-token stream (``streaming_nll``: one token per forward through ``SinkCache``),
which tests/test_streaming_cache.py and the support matrix hold to fresh forwards over the kept tokens. Every
family of tests/families.py is covered by the support matrix's ``onepass`` check; here: chunk sizes against
windows, sinks spanning chunks, local layers, positions kept small, precision far into a stream, refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_llama, loaded, pinned_stream_reference
from families import build

from sinkscope.errors import ConfigError
from sinkscope.streaming.evaluate import dense_nll, streaming_nll
from sinkscope.streaming.onepass import BandCache, onepass_nll


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models gain nothing from threads (conftest.one_torch_thread)."""


def ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 100, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_oss", "qwen3_next"])
@pytest.mark.parametrize(("sinks", "window", "chunk"), [
    (4, 8, 1),  # one token per forward: the band comes from the carried tail alone
    (0, 8, 3),  # chunks shorter than the window: tails cross several chunks
    (5, 6, 2),  # sinks arrive over three chunks
    (2, 10, 64),  # one forward for the whole text
    (3, 7, 7),
])
def test_equals_token_by_token(family, sinks, window, chunk, tok_nobos) -> None:
    model = build(family)
    lm = loaded(model, tok_nobos, family)
    x = ids(50)
    got = onepass_nll(model, x, sinks, window, chunk=chunk)
    ref = streaming_nll(lm, x, sinks, window)
    np.testing.assert_allclose(got[1:], ref[1:], atol=1e-5)
    assert np.isnan(got[0])
    # the reference does evict: without eviction (dense) the numbers differ
    assert np.abs(ref[1:] - dense_nll(lm, x)[1:]).max() > 1e-3


def test_no_eviction_is_dense(tok_nobos) -> None:
    model = build("gemma3")
    lm = loaded(model, tok_nobos, "gemma3")
    x = ids(40)
    # S + W covers the text; Gemma-3's local layers (window 6) still slide, as in the dense model
    np.testing.assert_allclose(onepass_nll(model, x, 4, 40, chunk=9)[1:], dense_nll(lm, x)[1:], atol=1e-5)


def test_positions_stay_local_to_each_chunk() -> None:
    """No forward sees a position beyond the carried tail plus its chunk, however long the text."""
    model = build_llama(max_position_embeddings=100_000)
    seen: list[int] = []
    hook = model.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(int(kw["position_ids"].max())), with_kwargs=True)
    try:
        onepass_nll(model, ids(600), 4, 16, chunk=50)
    finally:
        hook.remove()
    assert len(seen) == 12 and max(seen) <= 15 + 50 - 1


def test_float32_keeps_its_precision_far_into_the_stream() -> None:
    """20000 tokens: float32 one pass agrees with the float64 model's one pass; rotations stay within each
    chunk's local frame, so float32 never rotates by a large absolute position."""
    model = build_llama(max_position_embeddings=100_000)
    x = ids(20_000, seed=3)
    lo = onepass_nll(model, x, 4, 16, chunk=1024)
    hi = onepass_nll(model.double(), x, 4, 16, chunk=1024)
    model.float()
    assert np.nanmax(np.abs(lo - hi)) < 2e-5


def test_refusals_are_one_line(tok_nobos) -> None:
    for family, needle in (("gpt2", "absolute position"), ("mpt", "attention interface"),
                           ("deepseek_v3", "latent"), ("gemma3n", "KV sharing")):
        with pytest.raises(ConfigError, match=needle) as exc:
            BandCache(build(family), 2, 8)
        assert "\n" not in str(exc.value) and "one-pass" in str(exc.value)
    model = build("llama")
    with pytest.raises(ConfigError, match="sinks >= 0"):
        BandCache(model, -1, 8)
    with pytest.raises(ConfigError, match="window >= 1"):
        BandCache(model, 0, 0)


def test_attention_implementation_is_restored(tok_nobos) -> None:
    model = build("llama")
    before = model.config._attn_implementation
    onepass_nll(model, ids(30), 2, 8, chunk=8)
    assert model.config._attn_implementation == before

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    hook = model.model.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        onepass_nll(model, ids(30), 2, 8, chunk=8)
    hook.remove()
    assert model.config._attn_implementation == before
    # the model works as before, and a second evaluation gives the same numbers
    np.testing.assert_allclose(onepass_nll(model, ids(30), 2, 8, chunk=8)[1:],
                               onepass_nll(model, ids(30), 2, 8, chunk=5)[1:], atol=1e-6)


def test_a_layer_that_slips_past_is_caught(tok_nobos) -> None:
    """A layer whose attention doesn't reach the one-pass function (forced back to SDPA) is an error, never
    numbers from a path that did not run."""
    from sinkscope.errors import CaptureError

    model = build("llama")
    attn = model.model.layers[1].self_attn
    original = attn.forward

    def sdpa_forward(*args, **kwargs):
        cfg = attn.config
        saved = cfg._attn_implementation
        cfg._attn_implementation = "sdpa"
        try:
            return original(*args, **kwargs)
        finally:
            cfg._attn_implementation = saved

    attn.forward = sdpa_forward
    try:
        with pytest.raises(CaptureError, match="never reached"):
            onepass_nll(model, ids(30), 2, 8, chunk=8)
    finally:
        attn.forward = original


def test_a_dropped_softcap_is_refused_before_any_work(tok_nobos) -> None:
    """Gemma-2 under SDPA (transformers' default on a GPU) runs without its soft-cap: dense and token-by-token
    numbers would be another model's than one pass's, so eval-stream refuses and says how to load it."""
    from sinkscope.streaming.evaluate import prepare_stream_eval

    model = build("gemma2", attn="eager")
    # transformers 5.17 loads Gemma-2 with SDPA on a GPU; this one refuses SDPA for it, so set what 5.17 sets
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ConfigError, match="attn_implementation='eager'") as exc:
        prepare_stream_eval(loaded(model, tok_nobos, "gemma2"), ids(60), sinks=(0, 2), window=8)
    assert "soft-capped" in str(exc.value) and "\n" not in str(exc.value)
    eager = build("gemma2", attn="eager")
    assert prepare_stream_eval(loaded(eager, tok_nobos, "gemma2"), ids(60), sinks=(0, 2), window=8).ids


# ------------------------------------------------------------------------------------------- pinned positions


@pytest.mark.parametrize(("sinks", "window", "chunk", "pins"), [
    (2, 8, 5, (6, 11, 30)),  # pins arriving in later chunks, one right after the sinks
    (0, 6, 64, (3,)),  # a pin and no sinks, one forward
    (1, 7, 1, (1, 2, 20, 49)),  # one token per forward; a pin at the text's last token never leaves the window
])
def test_pins_equal_a_hand_managed_cache(sinks, window, chunk, pins) -> None:
    model = build_llama(seed=4)
    x = ids(50, seed=5)
    got = onepass_nll(model, x, sinks, window, chunk=chunk, pins=pins)
    ref = pinned_stream_reference(model, x, sinks, window, set(pins))
    np.testing.assert_allclose(got[1:], ref[1:], atol=1e-5)
    plain = onepass_nll(model, x, sinks, window, chunk=chunk)
    assert np.abs(got[1:] - plain[1:]).max() > 1e-3  # the pins changed what later tokens see


def test_pins_among_the_sinks_or_past_the_text_change_nothing(tok_nobos) -> None:
    model = build_llama(seed=4)
    x = ids(40, seed=6)
    plain = onepass_nll(model, x, 3, 8, chunk=7)
    np.testing.assert_allclose(onepass_nll(model, x, 3, 8, chunk=7, pins=(0, 2, 500))[1:], plain[1:], atol=1e-6)
    # and the hand-managed reference, without pins, is SinkCache's stream
    np.testing.assert_allclose(pinned_stream_reference(model, x, 3, 8, set())[1:],
                               streaming_nll(loaded(model, tok_nobos, "llama"), x, 3, 8)[1:], atol=1e-5)
    with pytest.raises(ConfigError, match="pinned positions must be whole numbers >= 0"):
        onepass_nll(model, x, 3, 8, pins=(-1,))
