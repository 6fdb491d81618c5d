"""Statistics mode on a GPU: a 7B-shaped Llama (random bf16 weights) at long context, beside its SDPA forward.

Three parts, each printed as it finishes and written to ``--json``:

1. ``check``: statistics mode against eager ``output_attentions`` maps on the GPU (a small float32 Llama,
   random weights): the largest absolute difference of every metric; then the same model split between the
   GPU and the CPU with accelerate (``device_map``), to show that capture follows layers across devices.
2. ``bench``: the 7B shape (32 layers, 32 heads, hidden 4096, MLP 11008) in bfloat16. Per length: the plain
   SDPA forward of the base model (the floor: flash kernels, no attention seen), statistics capture of every
   layer (``capture_stats``: every metric and pooled 96 x 96 maps of all 1024 heads), and naive capture
   (eager attention, ``output_attentions=True``, every map kept) where its memory fits. Time is the best of
   ``--repeat`` runs after a warm-up; peak is ``torch.cuda.max_memory_allocated`` above the loaded weights.
3. ``--devices N`` (N > 1): the same 7B model split over N GPUs with ``device_map="auto"``; statistics
   mode checked against a single-device run of the same weights.

Run on a machine with a CUDA GPU (the weights are built there; nothing is downloaded):

    python benchmarks/capture_gpu.py --tokens 8192 32768 --naive-tokens 2048 4096 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sinkscope import metrics
from sinkscope.capture import capture_stats, pool_map

K = 8
SEVEN_B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 32768}
SMALL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 9,
         "num_key_value_heads": 3, "vocab_size": 1000, "max_position_embeddings": 4096}


def build(shape: dict, dtype: torch.dtype, device: str, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, attn_implementation=attn)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in their final dtype: no float32 copy of 7B on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _stats(model, ids, **kw):
    with capture_stats(model, k_max=K, map_size=96, **kw) as cap, torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    return cap


def _errors(cap, maps) -> dict:
    err: dict[str, float] = {}
    for layer, a in enumerate(maps):
        st, a = cap.stats[layer], a[0].float().cpu()
        got = {"first_token_mass": (st.first_token_mass, metrics.first_token_mass(a, K)),
               "sink_mass": (st.sink_mass, metrics.sink_mass(a, K)),
               "entropy": (st.entropy, metrics.entropy(a, K)),
               "received": (st.received.total, metrics.received_mass(a, K).total),
               "pooled": (st.pooled, pool_map(a, 96)[0].numpy())}
        for name, (x, y) in got.items():
            err[name] = max(err.get(name, 0.0), float(abs(x - y).max()))
    return err


def check(n: int) -> dict:
    """Statistics vs eager maps on the GPU, then across a GPU/CPU split."""
    model = build(SMALL, torch.float32, "cuda")
    ids = torch.randint(0, SMALL["vocab_size"], (1, n), generator=torch.Generator().manual_seed(1)).cuda()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model.model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    model.set_attn_implementation("sdpa")
    out = {"tokens": n, "gpu_vs_eager": _errors(_stats(model, ids), maps)}
    print(f"check, {n} tokens, statistics vs eager on the GPU: {out['gpu_vs_eager']}", flush=True)

    from accelerate import dispatch_model

    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "cpu",
             "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": 0, "lm_head": "cpu"}
    model = dispatch_model(model, device_map=split)
    cap = _stats(model, ids)
    out["gpu_cpu_split_vs_eager"] = _errors(cap, maps)
    out["split"] = {k: str(v) for k, v in split.items()}
    print(f"check, GPU+CPU split (layers 0-1 on cuda:0, 2-3 on cpu): {out['gpu_cpu_split_vs_eager']}", flush=True)
    del model, maps
    torch.cuda.empty_cache()
    return out


def _timed(fn, repeat: int) -> tuple[float, float]:
    """(best seconds of ``repeat`` runs after one warm-up, peak GiB above what was allocated before)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, (torch.cuda.max_memory_allocated() - base) / 2**30


def bench(tokens: list[int], naive_tokens: list[int], repeat: int) -> list[dict]:
    model = build(SEVEN_B, torch.bfloat16, "cuda")
    weights = torch.cuda.memory_allocated() / 2**30
    print(f"7B-shaped Llama built: {weights:.1f} GiB of bf16 weights", flush=True)
    rows = []
    for n in sorted(set(tokens) | set(naive_tokens)):
        ids = torch.randint(0, SEVEN_B["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n)).cuda()
        row: dict = {"tokens": n}

        def forward(ids: torch.Tensor = ids) -> None:
            with torch.no_grad():
                model.model(input_ids=ids, use_cache=False)

        def stats(ids: torch.Tensor = ids) -> None:
            _stats(model, ids)

        def naive(ids: torch.Tensor = ids) -> None:
            model.set_attn_implementation("eager")
            try:
                with torch.no_grad():
                    out = model.model(input_ids=ids, output_attentions=True, use_cache=False)
                assert len(out.attentions) == SEVEN_B["num_hidden_layers"]
                del out
            finally:
                model.set_attn_implementation("sdpa")

        row["forward_s"], row["forward_gib"] = _timed(forward, repeat)
        if n in tokens:
            row["stats_s"], row["stats_gib"] = _timed(stats, max(1, repeat - 1))
        if n in naive_tokens:
            need = SEVEN_B["num_hidden_layers"] * SEVEN_B["num_attention_heads"] * n * n * 2 / 2**30
            free = torch.cuda.mem_get_info()[0] / 2**30
            if need < 0.8 * free:
                row["naive_s"], row["naive_gib"] = _timed(naive, 1)
            else:
                row["naive_skipped"] = f"needs ~{need:.0f} GiB for the maps alone, {free:.0f} GiB free"
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return rows


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
    # Room for a little more than 1/devices of the weights per GPU, so that the layers must spread out.
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
    layers_on = {}
    for name, dev in device_map.items():
        layers_on.setdefault(str(dev), []).append(name)
    out = {"tokens": n, "devices": sorted(layers_on), "layers_per_device": {d: len(v) for d, v in layers_on.items()},
           "split_vs_single": err, "single_s": single_s, "split_s": split_s,
           "layers_measured": sorted(split.stats) == list(range(SEVEN_B["num_hidden_layers"]))}
    print(f"multi-device, {n} tokens: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--naive-tokens", type=int, nargs="*", default=[2048, 4096])
    ap.add_argument("--check-tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--devices", type=int, default=1, help="also run the multi-GPU check on this many GPUs")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one")
    import transformers

    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": transformers.__version__, "shape": SEVEN_B}
    print(json.dumps(result), flush=True)
    result["check"] = check(args.check_tokens)
    result["bench"] = bench(args.tokens, args.naive_tokens, args.repeat)
    if args.devices > 1:
        result["multi_device"] = multi_device(args.tokens[0], args.devices)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
