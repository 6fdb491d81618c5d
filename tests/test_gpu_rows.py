"""The GPU row pass (sinkscope._gpu): its Triton kernels against float64 whole maps, and statistics mode through it.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, numpy on CPU tensors), so CI
checks their logic: masks, tile boundaries (T not a multiple of the tile, interior and edge tiles), GQA,
sliding windows, soft-capping, learned sinks and both ways of pooling. On a CUDA machine the same tests compile
them. The references are independent: float64 softmax of the same queries and keys, transformers' eager maps.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # before any kernel is defined: the interpreter is chosen at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import TEXT_60, loaded
from families import token_ids
from test_capture_stats import FAMILY_T, K, _assert_family_layer, _eager_logits, _family

from sinkscope import _gpu, analyze, capture_stats, metrics
from sinkscope.capture import pool_bins, pool_map

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (the gpu extra: pip install '.[gpu]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gpu_rows(monkeypatch):
    """Statistics mode through the GPU row pass: compiled on a GPU, interpreted on the CPU."""
    monkeypatch.setenv(_gpu.ENV, "1")
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"


def _reference(q, k, v, scale, window, softcap, sink):
    """float64 probabilities ``[heads, T, T]`` and output ``[T, heads, D_v]`` of the same attention."""
    group = q.shape[1] // k.shape[1]
    qd = q[0].double()
    kd, vd = (x[0].double().repeat_interleave(group, 0) for x in (k, v))
    s = qd @ kd.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    i = torch.arange(s.shape[-1], device=s.device)
    ok = i[None, :] <= i[:, None]
    if window:
        ok &= i[None, :] > i[:, None] - window
    s = s.masked_fill(~ok, float("-inf"))
    z = torch.logsumexp(s, -1)
    if sink is not None:
        z = torch.logaddexp(z, sink.double()[:, None])
    p = torch.exp(s - z[..., None])
    return p.cpu(), (p @ vd).transpose(0, 1).cpu()


CASES = {  # name: (T, heads, kv heads, D, D_v, window, softcap, learned sinks, map size, dtype)
    "gqa": (45, 4, 2, 16, 16, None, None, False, 8, torch.float32),
    "odd_dims_window": (70, 4, 2, 24, 8, 10, None, False, 8, torch.float32),
    "window_interior": (100, 2, 1, 16, 16, 50, None, False, 6, torch.float32),
    "softcap_sinks": (50, 4, 4, 16, 16, None, 5.0, True, 8, torch.float32),
    "per_token_bins": (40, 2, 2, 16, 16, None, None, False, 96, torch.float32),
    "wide_bins": (150, 2, 1, 16, 16, None, None, False, 4, torch.float32),
    "no_map": (45, 4, 1, 32, 32, None, None, False, None, torch.float32),
    "fp16": (45, 4, 2, 16, 16, None, None, False, 8, torch.float16),
    "bf16_window_sinks": (45, 4, 2, 16, 16, 7, None, True, 8, torch.bfloat16),
}


@pytest.mark.parametrize("case", CASES)
def test_row_pass_equals_float64_maps(case, gpu_rows):
    t, h, h_kv, d, d_v, window, softcap, sinks, map_size, dtype = CASES[case]
    g = torch.Generator().manual_seed(t + h + d)
    q = (torch.randn(1, h, t, d, generator=g) * 2).to(dtype).to(DEVICE)
    k = (torch.randn(1, h_kv, t, d, generator=g) * 2).to(dtype).to(DEVICE)
    v = torch.randn(1, h_kv, t, d_v, generator=g).to(dtype).to(DEVICE)
    sink = torch.linspace(1.0, 4.0, h).to(DEVICE) if sinks else None
    bins = pool_bins(t, map_size) if map_size else None
    local, scale = 8, d ** -0.5
    out, pending = _gpu.row_pass(q, k, v, scale=scale, softcap=softcap, window=window, sink=sink, k_max=4,
                                 local=local, bins=bins)
    st = _gpu.finish([pending])[0]
    what = st.row_pass
    p, expected = _reference(q, k, v, scale, window, softcap, sink)
    errors = {"first_token_mass": abs(st.first_token_mass - metrics.first_token_mass(p, 4)).max(),
              "sink_mass": abs(st.sink_mass - metrics.sink_mass(p, 4)).max(),
              "entropy": abs(st.entropy - metrics.entropy(p, 4, learned_sink=sinks)).max(),
              "received": abs(st.received.total - metrics.received_mass(p, 4, local).total).max()}
    pn = p.numpy()
    near = [np.mean([pn[hh, i, max(4, i - local + 1): i + 1].sum() for i in range(4, t)]) for hh in range(h)]
    errors["local_mass"] = abs(st.local_mass - np.array(near)).max()  # explicit loops over the window
    if sinks:
        assert st.learned_sink_mass is not None and st.learned_sink_mass.min() > 1e-3  # visible: tested
        errors["learned_sink_mass"] = abs(st.learned_sink_mass - metrics.learned_sink_mass(p, 4)).max()
    else:
        assert st.learned_sink_mass is None
    if bins:
        assert st.bins == bins
        errors["pooled"] = abs(st.pooled - pool_map(p, map_size)[0].numpy()).max()
    else:
        assert st.pooled is None
    assert max(errors.values()) < 1e-5, f"{what}: {errors}"
    # The output in the model's dtype: rounding to it is the only difference.
    out_tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert out.shape == (1, t, h, d_v) and out.dtype == dtype
    torch.testing.assert_close(out[0].double().cpu(), expected, atol=out_tol, rtol=out_tol)
    assert "Triton statistics kernel" in what


def test_window_changes_the_numbers(gpu_rows):
    """The window test is a test: the same inputs without the window give other statistics."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 40, 16, generator=g).to(DEVICE), torch.randn(1, 2, 40, 16, generator=g).to(DEVICE)
    runs = _gpu.finish([_gpu.row_pass(q, k, k, scale=0.25, softcap=None, window=w, sink=None, k_max=4, local=8,
                                      bins=None)[1] for w in (None, 6)])
    assert np.abs(runs[0].first_token_mass - runs[1].first_token_mass).max() > 1e-2


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt_oss", "gemma2", "deepseek_v3"])
def test_family_stats_through_gpu_rows(name, ref, gpu_rows):
    """Whole models: statistics mode through the GPU row pass against transformers' eager maps and logits
    (GQA, Gemma-3's sliding-window mask, gpt-oss's learned sinks, Gemma-2's soft-cap, DeepSeek's MLA heads)."""
    model = _family(name).to(DEVICE)
    ids = token_ids(FAMILY_T).to(DEVICE)
    maps = ref.eager_attentions(model, ids)
    expected = _eager_logits(model, ids)
    with capture_stats(model, k_max=K, map_size=12) as cap, torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    bins = pool_bins(FAMILY_T, 12)
    for layer, a in enumerate(maps):
        assert "Triton statistics kernel" in cap.stats[layer].row_pass
        _assert_family_layer(name, cap.stats[layer], a, ref, bins)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_analyze_says_which_row_pass_ran(tok_bos, gpu_rows):
    from conftest import build_llama

    lm = loaded(build_llama().to(DEVICE), tok_bos, "tiny-llama")
    profile = analyze(lm, [TEXT_60], k_max=4, mode="stats", progress=False)
    assert profile.settings["row_pass"].startswith("Triton statistics kernel")
    assert "attention and LSE by" in profile.to_dict()["settings"]["row_pass"]


def test_padding_mask_goes_to_the_torch_path(tok_bos, ref, gpu_rows):
    """A mask that is not the layer's own pattern (here: padding) is measured by the torch path, which says why."""
    from conftest import build_llama

    lm = loaded(build_llama().to(DEVICE), tok_bos, "tiny-llama")
    ids = ref.encode(lm, TEXT_60).to(DEVICE)
    mask = torch.ones_like(ids)  # (on the ids' device)
    mask[0, 3] = 0  # one key hidden from every query
    with capture_stats(lm.model, k_max=4) as cap, torch.no_grad():
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert all("Triton" not in st.row_pass for st in cap.stats.values())
    assert all(st.first_token_mass.shape == (lm.spec.n_heads,) for st in cap.stats.values())


def test_unusable_reasons(monkeypatch):
    q = torch.zeros(1, 4, 10, 8)
    k = torch.zeros(1, 2, 10, 8)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    monkeypatch.setenv(_gpu.ENV, "0")
    assert "SINKSCOPE_GPU_ROWS=0" in _gpu.unusable(q, k, k, None, "full", None)
    monkeypatch.setenv(_gpu.ENV, "auto")
    if DEVICE == "cpu":
        assert _gpu.unusable(q, k, k, None, "full", None) == "not on a CUDA device"
    monkeypatch.setenv(_gpu.ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, causal = q.to(DEVICE), k.to(DEVICE), causal.to(DEVICE)
    assert _gpu.unusable(q, k, k, None, "full", None) is None
    assert _gpu.unusable(q, k, k, causal, "full", None) is None
    assert "float64" in _gpu.unusable(q.double(), k.double(), k.double(), None, "full", None)
    assert "chunked" in _gpu.unusable(q, k, k, None, "chunked", 4)
    assert "additive" in _gpu.unusable(q, k, k, causal.float(), "full", None)
    assert "sliding window of 4" in _gpu.unusable(q, k, k, causal, "sliding", 4)  # a causal mask is not a window
    band = causal & ~torch.ones(10, 10, dtype=torch.bool, device=DEVICE).tril(-4)[None, None]
    assert _gpu.unusable(q, k, k, band, "sliding", 4) is None
    holed = band.clone()
    holed[..., 7, 5] = False
    assert "pattern" in _gpu.unusable(q, k, k, holed, "sliding", 4)
    # The model's layout [1, T, heads, D] seen as [1, heads, T, D]: a row is heads x D apart.
    long_q = torch.empty(1, 2**19, 32, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    long_k = torch.empty(1, 2**19, 8, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    half = slice(0, 2**18)
    assert _gpu.unusable(long_q[:, :, half], long_k[:, :, half], long_k[:, :, half], None, "full", None) is None
    assert "32-bit" in _gpu.unusable(long_q, long_k, long_k, None, "full", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "Triton is not installed" in _gpu.unusable(q, k, k, None, "full", None)


def test_without_the_gpu_row_pass_the_cpu_says_what_ran(tiny_llama, ref, monkeypatch):
    """On the CPU the default stays the C row pass (or torch ops): the GPU one runs only where asked."""
    monkeypatch.setenv(_gpu.ENV, "auto")
    ids = ref.encode(tiny_llama, TEXT_60)
    with capture_stats(tiny_llama.model, k_max=4) as cap, torch.no_grad():
        tiny_llama.model(input_ids=ids, use_cache=False)
    assert all("Triton" not in st.row_pass for st in cap.stats.values())


def test_a_kernel_that_fails_falls_back_to_the_torch_path(tiny_llama, ref, gpu_rows, monkeypatch):
    """A kernel that can't be built on this GPU or Triton: the torch path measures, and says why."""
    def fail(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(_gpu, "row_pass", fail)
    monkeypatch.setattr(_gpu, "_broken", None)
    ids = ref.encode(tiny_llama, TEXT_60)
    maps = ref.eager_attentions(tiny_llama.model, ids)
    model = copy.deepcopy(tiny_llama.model).to(DEVICE)  # on a GPU machine the row pass needs CUDA tensors
    with capture_stats(model, k_max=4) as cap, torch.no_grad():
        model(input_ids=ids.to(DEVICE), use_cache=False)
    for layer, st in cap.stats.items():
        assert "no kernel for this GPU" in st.row_pass and "Triton statistics kernel" not in st.row_pass
        np.testing.assert_allclose(st.first_token_mass, ref.first_token_mass(maps[layer], 4), atol=1e-6)
    x = ids[None].float().to(DEVICE)
    assert "failed here" in _gpu.unusable(x, x, x, None, "full", None)
