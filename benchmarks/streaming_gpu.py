"""Table 1 on a GPU: one-pass streaming evaluation against token-by-token SinkCache streaming.

    python3 benchmarks/streaming_gpu.py --device cuda --sizes 1000 4000 16000 --json out.json

The model is SmolLM2-135M's shape (Llama: 30 layers, hidden 576, 9 heads, 3 KV heads, vocabulary 49152)
with random weights built from its config, since weights can't travel to a lent GPU machine; times don't
depend on the weights. Token ids are random. Token by token, one step costs the same at every position once
the cache is full (S + W - 1 tokens), so each cache's step is timed over ``--steps`` steps and the run is
the prefill plus that rate times the steps left; at ``--full-at`` tokens one cache is streamed whole too, to
check that figure and the numbers (one pass against token by token, per token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sinkscope.streaming.cache import SinkCache
from sinkscope.streaming.onepass import onepass_nll

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
           "tie_word_embeddings": True}


def build(device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, attn_implementation="sdpa")).to(dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def token_by_token(model, ids: torch.Tensor, sinks: int, window: int, steps: int | None, device: str):
    """(prefill s, s per step, nll per token or None): the first S + W tokens in one forward, then one by one."""
    cache = SinkCache(model, sinks, window)
    warm = sinks + window
    sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids[None, :warm], past_key_values=cache, use_cache=True).logits[0]
    sync(device)
    pre = time.perf_counter() - t0
    first = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:warm], reduction="none")
    nll = [float("nan"), *first.tolist()]
    last = logits[-1]
    end = len(ids) if steps is None else min(len(ids), warm + steps)
    t0 = time.perf_counter()
    for t in range(warm, end):
        nll.append(float(torch.nn.functional.cross_entropy(last[None].float(), ids[t:t + 1])))
        last = model(input_ids=ids[None, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
    sync(device)
    per = (time.perf_counter() - t0) / max(1, end - warm)
    return pre, per, nll if steps is None else None


@torch.no_grad()
def dense(model, ids: torch.Tensor, device: str) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(ids), 1024):
        model(input_ids=ids[None, i:i + 1024], past_key_values=cache, use_cache=True)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--sinks", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--full-at", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args.device, dtype)
    g = torch.Generator().manual_seed(0)
    longest = torch.randint(0, SMOLLM2["vocab_size"], (max(args.sizes),), generator=g).to(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{name}, {args.dtype}, SmolLM2 shape, window {args.window}, sinks {args.sinks}", flush=True)
    onepass_nll(model, longest[:600], 4, args.window, chunk=args.chunk)  # warm-up (kernels, allocator)
    token_by_token(model, longest[:600], 4, args.window, 20, args.device)
    rate = {s: token_by_token(model, longest, s, args.window, args.steps, args.device)[:2] for s in args.sinks}
    rows = []
    for n in args.sizes:
        ids = longest[:n]
        d = dense(model, ids, args.device)
        one = {}
        for s in args.sinks:
            sync(args.device)
            t0 = time.perf_counter()
            onepass_nll(model, ids, s, args.window, chunk=args.chunk)
            sync(args.device)
            one[s] = time.perf_counter() - t0
        tok = {s: rate[s][0] + rate[s][1] * max(0, n - s - args.window) for s in args.sinks}
        row = {"tokens": n, "dense_s": d, "onepass_s": one, "token_by_token_s": tok,
               "ratio": sum(tok.values()) / sum(one.values()), "table1_onepass_s": d + sum(one.values()),
               "table1_token_s": d + sum(tok.values())}
        if n == args.full_at:
            s = args.sinks[len(args.sinks) // 2]
            t0 = time.perf_counter()
            _, _, ref = token_by_token(model, ids, s, args.window, None, args.device)
            whole = time.perf_counter() - t0
            got = onepass_nll(model, ids, s, args.window, chunk=args.chunk)
            diff = max(abs(a - b) for a, b in zip(got[1:], ref[1:], strict=True))
            row["token_by_token_whole"] = {"sinks": s, "seconds": whole, "estimated": tok[s],
                                           "max_nll_difference": diff}
        rows.append(row)
        print(f"{n:>6} tokens: dense {d:6.2f} s | one pass, {len(one)} caches {sum(one.values()):7.2f} s | token by "
              f"token {sum(tok.values()):8.1f} s | ratio {row['ratio']:6.1f}x | Table 1 one pass "
              f"{row['table1_onepass_s']:.2f} s" + (f" | whole S={row['token_by_token_whole']['sinks']}: "
                                                   f"{row['token_by_token_whole']['seconds']:.1f} s (est. "
                                                   f"{row['token_by_token_whole']['estimated']:.1f}), max NLL "
                                                   f"diff {row['token_by_token_whole']['max_nll_difference']:.1e}"
                                                   if "token_by_token_whole" in row else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "dtype": args.dtype, "window": args.window,
                                               "sinks": args.sinks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
