"""Statistics mode on a GPU: the GPU row pass (sinkscope/_gpu) against float64 maps, and beside the SDPA forward.

Parts, each printed as it finishes and written to ``--json`` (pick them with ``--parts``):

1. ``kernels``: the row pass on random bfloat16/float16 queries and keys (T not a multiple of the tiles,
   MHA, GQA, a sliding window, soft-capping, learned sinks) against float64 whole maps of the same inputs,
   with every attention backend in turn (cuDNN, flash, memory-efficient, the Triton forward): the largest
   error of each metric and of the LSE, and which backends refused.
2. ``check``: a small float32 Llama, statistics mode (GPU row pass and torch path) against eager
   ``output_attentions`` maps on the GPU; then the same model split between the GPU and the CPU (accelerate).
3. ``bench``: the 7B shape (32 layers, 32 heads, hidden 4096, MLP 11008) in bfloat16. Per length: the plain
   SDPA forward of the base model (the floor), statistics mode with the GPU row pass (every metric and pooled
   96 x 96 maps of all 1024 heads), and with the torch path (``--torch-tokens``), timed alternately in this
   process, best of ``--repeat``; peak is ``torch.cuda.max_memory_allocated`` above the loaded weights.
4. ``profile`` (not run by default): the whole 7B model per ``--tokens``: the forward inside the block and the
   copy to the host timed apart, the CUDA kernels by total time, and the host synchronisations in the forward.
5. ``seventy``: decoder layers of a 70B shape (hidden 8192, 64 query / 8 KV heads, MLP 28672), as many as fit
   the GPU in bfloat16, at ``--seventy-tokens``: forward vs statistics mode, as in ``bench``.

``--devices N`` (N > 1) also splits the 7B model over N GPUs (``device_map="auto"``) and compares it with a
single-device run of the same weights. Run on a machine with a CUDA GPU (nothing is downloaded):

    python benchmarks/capture_gpu.py --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sinkscope import _gpu, metrics
from sinkscope.capture import capture_stats, pool_bins, pool_map

K = 8
SEVEN_B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 65536}
SEVENTY_B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
             "vocab_size": 32000, "max_position_embeddings": 65536}
SMALL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 9,
         "num_key_value_heads": 3, "vocab_size": 1000, "max_position_embeddings": 4096}


def build(shape: dict, dtype: torch.dtype, device: str, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, attn_implementation=attn)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in their final dtype: no float32 copy on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class torch_path:
    """Statistics mode on its torch path inside the block (the GPU row pass turned off)."""

    def __enter__(self) -> None:
        self.before = os.environ.get(_gpu.ENV)
        os.environ[_gpu.ENV] = "0"

    def __exit__(self, *exc: object) -> None:
        if self.before is None:
            os.environ.pop(_gpu.ENV, None)
        else:
            os.environ[_gpu.ENV] = self.before


# ----------------------------------------------------------------------------------------------- 1. kernels

KERNEL_CASES = {  # name: (T, heads, kv heads, head dim, window, softcap, learned sinks, dtype)
    "mha": (4133, 8, 8, 128, None, None, False, torch.bfloat16),
    "gqa": (4133, 8, 2, 128, None, None, False, torch.bfloat16),
    "window": (4133, 8, 2, 128, 512, None, False, torch.bfloat16),
    "softcap": (2050, 4, 2, 64, None, 30.0, False, torch.bfloat16),
    "sinks": (2050, 4, 4, 64, None, None, True, torch.bfloat16),
    "fp16_head96": (1000, 4, 2, 96, None, None, False, torch.float16),
}


def _errors(st, p: torch.Tensor, bins, learned: bool) -> dict:
    """Largest absolute error of every metric of ``st`` against float64 maps ``p`` ``[heads, T, T]``."""
    got = {"first_token_mass": (st.first_token_mass, metrics.first_token_mass(p, K)),
           "sink_mass": (st.sink_mass, metrics.sink_mass(p, K)),
           "entropy": (st.entropy, metrics.entropy(p, K, learned_sink=learned)),
           "received": (st.received.total, metrics.received_mass(p, K).total)}
    if bins:
        got["pooled"] = (st.pooled, pool_map(p, 96)[0].cpu().numpy())
    if learned:
        got["learned_sink_mass"] = (st.learned_sink_mass, metrics.learned_sink_mass(p, K))
    err = {name: float(abs(x - y).max()) for name, (x, y) in got.items()}
    err["received_relative"] = float((abs(got["received"][0] - got["received"][1])
                                      / abs(got["received"][1]).clip(1.0)).max())
    return err


def kernels() -> dict:
    out: dict = {}
    for name, (t, h, h_kv, d, window, softcap, sinks, dtype) in KERNEL_CASES.items():
        g = torch.Generator(device="cuda").manual_seed(t)
        q = torch.randn(1, h, t, d, device="cuda", generator=g, dtype=dtype) * 1.5
        k = torch.randn(1, h_kv, t, d, device="cuda", generator=g, dtype=dtype) * 1.5
        v = torch.randn(1, h_kv, t, d, device="cuda", generator=g, dtype=dtype)
        sink = torch.linspace(0.0, 3.0, h, device="cuda") if sinks else None
        scale = d ** -0.5
        # float64 reference from the same (rounded) inputs
        group = h // h_kv
        s = (q[0].double() @ k[0].double().repeat_interleave(group, 0).transpose(-1, -2)) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        i = torch.arange(t, device="cuda")
        ok = i[None, :] <= i[:, None]
        if window:
            ok &= i[None, :] > i[:, None] - window
        s = s.masked_fill(~ok, float("-inf"))
        lse_keys = torch.logsumexp(s, -1)
        z = lse_keys if sink is None else torch.logaddexp(lse_keys, sink.double()[:, None])
        p = torch.exp(s - z[..., None])
        ref_out = (p @ v[0].double().repeat_interleave(group, 0)).transpose(0, 1)
        del s
        bins = pool_bins(t, 96)
        row = {"tokens": t, "heads": h, "kv_heads": h_kv, "head_dim": d, "window": window, "softcap": softcap,
               "learned_sinks": sinks, "dtype": str(dtype), "backends": {}}
        backends = [*_gpu.BACKENDS, ("Triton forward (sinkscope)", None)]
        for backend, fn in backends:
            try:
                if fn is None:
                    o, lse = _gpu._triton_forward(q, k, v, scale, window, softcap)
                else:
                    got = fn(q, k, v, scale, window, softcap)
                    if got is None:
                        row["backends"][backend] = "not applicable"
                        continue
                    o, lse = got
                o = o.reshape(1, t, h, d)
                lse = lse.reshape(h, -1)[:, :t].float()
            except Exception as exc:
                row["backends"][backend] = f"refused: {str(exc).splitlines()[0][:160]}"
                continue
            lse_err = float((lse.double() - lse_keys).abs().max())
            total = lse if sink is None else torch.logaddexp(lse, sink[:, None])
            if sink is not None:
                o = (o.float() * torch.exp(lse - total).t()[None, :, :, None]).to(dtype)
            st = _gpu.finish([_gpu.layer_stats(q, k, total, scale=scale, softcap=softcap, window=window, sink=sink,
                                               k_max=K, local=metrics.LOCAL_WINDOW, bins=bins)])[0]
            err = _errors(st, p, bins, sinks)
            err["lse"] = lse_err
            err["output"] = float((o[0].double() - ref_out).abs().max())
            row["backends"][backend] = err
        _, pending = _gpu.row_pass(q, k, v, scale=scale, softcap=softcap, window=window, sink=sink, k_max=K,
                                   local=metrics.LOCAL_WINDOW, bins=bins)
        row["row_pass_default"] = pending.row_pass
        out[name] = row
        print(f"kernels {name}: {json.dumps(row)}", flush=True)
        del p, ref_out
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------- 2. check


def _stats(model, ids, **kw):
    with capture_stats(model, k_max=K, map_size=96, **kw) as cap, torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    return cap


def _model_errors(cap, maps) -> dict:
    err: dict[str, float] = {}
    for layer, a in enumerate(maps):
        e = _errors(cap.stats[layer], a[0].double(), True, False)
        for name, x in e.items():
            err[name] = max(err.get(name, 0.0), x)
    return err


def check(n: int) -> dict:
    """Statistics vs eager maps on the GPU (GPU row pass, torch path), then across a GPU/CPU split."""
    model = build(SMALL, torch.float32, "cuda")
    ids = torch.randint(0, SMALL["vocab_size"], (1, n), generator=torch.Generator().manual_seed(1)).cuda()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model.model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    model.set_attn_implementation("sdpa")
    cap = _stats(model, ids)
    out = {"tokens": n, "gpu_rows_vs_eager": _model_errors(cap, maps), "row_pass": cap.stats[0].row_pass}
    with torch_path():
        out["torch_path_vs_eager"] = _model_errors(_stats(model, ids), maps)
    print(f"check, {n} tokens, float32: {json.dumps(out)}", flush=True)

    from accelerate import dispatch_model

    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "cpu",
             "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": 0, "lm_head": "cpu"}
    model = dispatch_model(model, device_map=split)
    cap = _stats(model, ids)
    out["gpu_cpu_split_vs_eager"] = _model_errors(cap, maps)
    out["split_row_passes"] = sorted({st.row_pass for st in cap.stats.values()})
    print(f"check, GPU+CPU split (layers 0-1 on cuda:0, 2-3 on cpu): {json.dumps(out['gpu_cpu_split_vs_eager'])}",
          flush=True)
    del model, maps
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------- 3. bench


def _peak(fn) -> float:
    """GiB above what was allocated before, for one run of ``fn``."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _alternate(fns: dict, repeat: int) -> dict:
    """Best seconds of each function over ``repeat`` rounds, the functions run in turn within each round."""
    for fn in fns.values():  # warm-up: compile kernels, settle the allocator
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _measure(model, n: int, repeat: int, with_torch: bool, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
    ran: list[str] = []

    def forward() -> None:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)

    def stats() -> None:
        cap = _stats(model, ids)
        ran[:] = sorted({st.row_pass for st in cap.stats.values()})

    def torch_stats() -> None:
        with torch_path():
            _stats(model, ids)

    fns = {"forward": forward, "stats": stats}
    if with_torch:
        fns["torch_stats"] = torch_stats
    best = _alternate(fns, repeat)
    row: dict = {"tokens": n, **{f"{k}_s": v for k, v in best.items()}}
    row["stats_over_forward"] = best["stats"] / best["forward"]
    if with_torch:
        row["torch_over_forward"] = best["torch_stats"] / best["forward"]
    row["forward_gib"], row["stats_gib"] = _peak(forward), _peak(stats)
    row["memory_ratio"] = row["stats_gib"] / row["forward_gib"]
    row["row_pass"] = ran
    return row


def bench(tokens: list[int], torch_tokens: list[int], repeat: int) -> dict:
    model = build(SEVEN_B, torch.bfloat16, "cuda")
    weights = torch.cuda.memory_allocated() / 2**30
    print(f"7B-shaped Llama built: {weights:.1f} GiB of bf16 weights", flush=True)
    rows = []
    for n in tokens:
        row = _measure(model, n, repeat, n in torch_tokens, SEVEN_B["vocab_size"])
        rows.append(row)
        print(f"bench 7B: {json.dumps(row)}", flush=True)
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return {"weights_gib": weights, "rows": rows}


def profile(n: int) -> dict:
    """Where statistics mode's time goes on the whole 7B model at ``n`` tokens: the forward inside the block and
    the copy to the host apart, the CUDA kernels by total time (torch.profiler), and every synchronisation
    with the host during the forward (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = build(SEVEN_B, torch.bfloat16, "cuda")
    ids = torch.randint(0, SEVEN_B["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n)).cuda()

    def forward() -> None:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)

    def split() -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with capture_stats(model, k_max=K, map_size=96) as cap, torch.no_grad():
            model.model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            cap.flush()
        return t1 - t0, time.perf_counter() - t1

    forward()
    split()
    best = {"forward_s": float("inf"), "stats_forward_s": float("inf"), "stats_flush_s": float("inf")}
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward()
        torch.cuda.synchronize()
        best["forward_s"] = min(best["forward_s"], time.perf_counter() - t0)
        fwd, flush = split()
        best["stats_forward_s"] = min(best["stats_forward_s"], fwd)
        best["stats_flush_s"] = min(best["stats_flush_s"], flush)
    out: dict = {"tokens": n, **best}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with capture_stats(model, k_max=K, map_size=96) as cap, torch.no_grad():
                model.model(input_ids=ids, use_cache=False)
                torch.cuda.set_sync_debug_mode(0)
                cap.flush()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{Path(w.filename).name}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]
    out["syncs_in_forward"] = {where: syncs.count(where) for where in sorted(set(syncs))}
    for name, fn in (("forward", forward), ("stats", lambda: split())):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        out[f"{name}_kernels"] = [{"name": e.key[:90], "calls": e.count, "ms": e.device_time_total / 1e3}
                                  for e in rows[:14]]
        out[f"{name}_device_ms"] = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    print(f"profile 7B, {n} tokens: {json.dumps(out)}", flush=True)
    model = None  # (the closures above hold it otherwise)
    torch.cuda.empty_cache()
    return out


def seventy(n: int, repeat: int, layers: int | None) -> dict:
    """As many 70B-shaped decoder layers as fit one GPU (bf16), forward vs statistics mode at ``n`` tokens."""
    h, f, kv = SEVENTY_B["hidden_size"], SEVENTY_B["intermediate_size"], SEVENTY_B["num_key_value_heads"]
    head = h // SEVENTY_B["num_attention_heads"]
    per_layer = 2 * (2 * h * h + 2 * h * kv * head + 3 * h * f)
    free = torch.cuda.mem_get_info()[0]
    embed = 2 * 2 * h * SEVENTY_B["vocab_size"]
    fit = int((free - embed - 24 * 2**30) // per_layer)  # 24 GiB for activations at 32k and the allocator
    count = min(80, layers or fit)
    model = build({**SEVENTY_B, "num_hidden_layers": count}, torch.bfloat16, "cuda")
    weights = torch.cuda.memory_allocated() / 2**30
    print(f"70B-shaped layers: {count} of 80 ({weights:.1f} GiB of bf16 weights)", flush=True)
    row = _measure(model, n, repeat, False, SEVENTY_B["vocab_size"])
    row.update(layers=count, weights_gib=weights)
    print(f"seventy: {json.dumps(row)}", flush=True)
    del model
    torch.cuda.empty_cache()
    return row


def multi_device(n: int, devices: int) -> dict:
    """The 7B shape split over ``devices`` GPUs (accelerate) vs the same weights on one GPU."""
    from accelerate import dispatch_model, infer_auto_device_map

    model = build(SEVEN_B, torch.bfloat16, "cuda")
    weights = torch.cuda.memory_allocated() / 2**30
    ids = torch.randint(0, SEVEN_B["vocab_size"], (1, n), generator=torch.Generator().manual_seed(7)).cuda()
    t0 = time.perf_counter()
    single = _stats(model, ids)
    single_s = time.perf_counter() - t0
    model = model.cpu()
    torch.cuda.empty_cache()
    per = {i: f"{int(weights / devices + 2)}GiB" for i in range(devices)}
    device_map = infer_auto_device_map(model, max_memory=per, no_split_module_classes=["LlamaDecoderLayer"])
    model = dispatch_model(model, device_map=device_map)
    ids = ids.to(next(model.parameters()).device)
    t0 = time.perf_counter()
    split = _stats(model, ids)
    split_s = time.perf_counter() - t0
    err = {name: max(float(abs(getattr(split.stats[i], name) - getattr(single.stats[i], name)).max())
                     for i in single.stats)
           for name in ("first_token_mass", "sink_mass", "entropy")}
    layers_on: dict = {}
    for name, dev in device_map.items():
        layers_on.setdefault(str(dev), []).append(name)
    out = {"tokens": n, "devices": sorted(layers_on), "layers_per_device": {d: len(v) for d, v in layers_on.items()},
           "split_vs_single": err, "single_s": single_s, "split_s": split_s,
           "layers_measured": sorted(split.stats) == list(range(SEVEN_B["num_hidden_layers"]))}
    print(f"multi-device, {n} tokens: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["kernels", "check", "bench", "seventy"],
                    choices=["kernels", "check", "bench", "seventy", "profile"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--torch-tokens", type=int, nargs="*", default=[8192, 32768],
                    help="lengths at which the torch path is timed too (it is slow)")
    ap.add_argument("--check-tokens", type=int, default=1000)
    ap.add_argument("--seventy-tokens", type=int, default=32768)
    ap.add_argument("--seventy-layers", type=int, default=None, help="default: as many as fit")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiles", type=int, nargs=4, metavar=("BM", "BN", "WARPS", "STAGES"),
                    help=f"the statistics kernel's tiles (default {_gpu.TILES})")
    ap.add_argument("--devices", type=int, default=1, help="also run the multi-GPU check on this many GPUs")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one")
    if _gpu.triton_missing():
        raise SystemExit(_gpu.triton_missing())
    if args.tiles:
        _gpu.TILES = tuple(args.tiles)
    import transformers
    import triton

    result: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
                    "transformers": transformers.__version__, "tiles": list(_gpu.TILES), "shape": SEVEN_B}
    print(json.dumps(result), flush=True)
    if "kernels" in args.parts:
        result["kernels"] = kernels()
    if "check" in args.parts:
        result["check"] = check(args.check_tokens)
    if "bench" in args.parts:
        result["bench"] = bench(args.tokens, args.torch_tokens, args.repeat)
    if "profile" in args.parts:
        result["profile"] = [profile(n) for n in args.tokens]
    if "seventy" in args.parts:
        result["seventy"] = seventy(args.seventy_tokens, args.repeat, args.seventy_layers)
    if args.devices > 1:
        result["multi_device"] = multi_device(args.tokens[0], args.devices)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
