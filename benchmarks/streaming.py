"""Streaming cost: SinkCache vs a dense cache, a stream past 2x the context, and the speed of re-computation.

    .venv/bin/python benchmarks/streaming.py cost     # per-token latency and memory at stream positions
    .venv/bin/python benchmarks/streaming.py long     # one stream past 2x max_position_embeddings
    .venv/bin/python benchmarks/streaming.py speed    # streaming vs sliding window with re-computation
    .venv/bin/python benchmarks/streaming.py onepass  # Table 1: one pass vs token by token at 1k, 4k, 16k
    .venv/bin/python benchmarks/streaming.py onelong --long-tokens 100000  # one pass far past the context
    .venv/bin/python benchmarks/streaming.py all

Perplexity under eviction (Table 1 of Xiao et al.) is `sinkscope eval-stream`; see docs/performance.md.
Text: Python's own documentation (``pydoc_data.topics``), offline. Each part prints its table with ratios
measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch

import sinkscope
from sinkscope.streaming import SinkCache, Streamer


def _text_ids(tokenizer, n: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text).input_ids
    while len(ids) < n:  # long runs may need more than the docs hold: repeat them
        ids = ids + ids
    return ids[:n]


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _step(model, cache, token: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]


def _prefill(model, cache, ids: list[int], chunk: int) -> None:
    with torch.no_grad():
        for i in range(0, len(ids), chunk):
            model(input_ids=torch.tensor([ids[i:i + chunk]]), past_key_values=cache, use_cache=True)


def cost(lm, positions: list[int], sinks: int, window: int, probe: int) -> list[dict]:
    """Per-token latency and process memory after `p` tokens, for each p, SinkCache vs DynamicCache."""
    from transformers import DynamicCache

    ids = _text_ids(lm.tokenizer, max(positions) + probe)
    rows = []
    for kind in ("sink", "dense"):
        cache = SinkCache(lm.model, sinks, window) if kind == "sink" else DynamicCache(config=lm.model.config)
        done = 0
        for p in sorted(positions):
            # Reach position p fast (chunked prefill; the state after it is what token-by-token would store),
            # then time `probe` single-token steps there.
            _prefill(lm.model, cache, ids[done:p], chunk=window if kind == "sink" else 1024)
            done = p
            t0 = time.perf_counter()
            for tok in ids[p:p + probe]:
                _step(lm.model, cache, tok)
            ms = (time.perf_counter() - t0) * 1000 / probe
            done += probe
            nbytes = cache.nbytes() if kind == "sink" else sum(
                layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            rows.append({"cache": kind, "position": p, "ms_per_token": ms, "rss_mb": _rss_mb(),
                         "kv_mb": nbytes / 2**20})
            print(f"  {kind:>5} at {p:>6}: {ms:7.1f} ms/token, KV {nbytes / 2**20:8.1f} MiB, RSS {_rss_mb():7.0f} MB",
                  flush=True)
    return rows


def long_stream(lm, n_tokens: int, sinks: int, window: int, span: int) -> dict:
    """Stream `n_tokens` token by token; return rolling perplexity over windows of `span` tokens."""
    ids = _text_ids(lm.tokenizer, n_tokens)
    s = Streamer(lm, sinks=sinks, window=window)
    nll = np.array([t.nll for t in s.feed(ids, chunk=1)][1:], dtype=float)
    blocks = [float(np.exp(nll[i:i + span].mean())) for i in range(0, len(nll) - span + 1, span)]
    return {"tokens": n_tokens, "sinks": sinks, "window": window, "span": span, "rolling_ppl": blocks,
            "cache_length": s.cache.cache_length, "max_positions": lm.spec.max_positions}


def speed(lm, sinks: int, window: int, probe: int) -> dict:
    """Tokens per second: streaming with SinkCache vs re-encoding the last `window` tokens for every token."""
    ids = _text_ids(lm.tokenizer, window + sinks + probe + 1)
    cache = SinkCache(lm.model, sinks, window)
    _prefill(lm.model, cache, ids[: sinks + window], chunk=window)
    t0 = time.perf_counter()
    for tok in ids[sinks + window: sinks + window + probe]:
        _step(lm.model, cache, tok)
    stream_s = (time.perf_counter() - t0) / probe
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(probe):
            end = sinks + window + i + 1
            lm.model(input_ids=torch.tensor([ids[end - window:end]]), use_cache=False, logits_to_keep=1)
    recompute_s = (time.perf_counter() - t0) / probe
    return {"window": window, "sinks": sinks, "stream_ms": stream_s * 1000, "recompute_ms": recompute_s * 1000,
            "speedup": recompute_s / stream_s}


def table1(lm, sizes: list[int], sinks: list[int], window: int, steps: int, full_at: int | None) -> list[dict]:
    """Perplexity under eviction for five sink counts + dense at each size: one pass (timed whole) against token
    by token. A token-by-token step costs the same at every stream position once the cache is full (it holds
    S + W - 1 tokens), so each cache's step is timed over `steps` steps after its prefill, and the whole run
    is the prefill plus that rate times the steps left; at `full_at` tokens one cache is also streamed whole,
    which checks that figure and the numbers (one pass against token by token, per token)."""
    from sinkscope.streaming.evaluate import dense_nll, onepass_stream_nll, streaming_nll

    rows = []
    rate: dict[int, tuple[float, float]] = {}  # sinks -> (prefill s, s per step)
    longest = _text_ids(lm.tokenizer, max(sizes))
    for s in sinks:
        cache = SinkCache(lm.model, s, window)
        t0 = time.perf_counter()
        _prefill(lm.model, cache, longest[: s + window], chunk=s + window)
        pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        for tok in longest[s + window: s + window + steps]:
            _step(lm.model, cache, tok)
        rate[s] = (pre, (time.perf_counter() - t0) / steps)
    for n in sizes:
        ids = longest[:n]
        t0 = time.perf_counter()
        dense_nll(lm, ids)
        dense_s = time.perf_counter() - t0
        one = {}
        for s in sinks:
            t0 = time.perf_counter()
            onepass_stream_nll(lm, ids, s, window)
            one[s] = time.perf_counter() - t0
        token = {s: rate[s][0] + rate[s][1] * max(0, n - s - window) for s in sinks}
        row = {"tokens": n, "window": window, "sinks": sinks, "dense_s": dense_s, "onepass_s": one,
               "token_by_token_s": token, "token_steps_timed": steps,
               "onepass_table_s": dense_s + sum(one.values()), "token_table_s": dense_s + sum(token.values())}
        if full_at == n:
            s = sinks[len(sinks) // 2]
            t0 = time.perf_counter()
            ref = streaming_nll(lm, ids, s, window)
            row["token_by_token_whole"] = {"sinks": s, "seconds": time.perf_counter() - t0,
                                           "estimated": token[s]}
            got = onepass_stream_nll(lm, ids, s, window)
            row["max_nll_difference"] = float(np.nanmax(np.abs(got - ref)))
        rows.append(row)
        print(f"  {n:>6} tokens: Table 1 one pass {row['onepass_table_s']:7.1f} s vs token by token "
              f"{row['token_table_s']:8.0f} s: {row['token_table_s'] / row['onepass_table_s']:6.1f}x", flush=True)
    return rows


def one_long(lm, n_tokens: int, sinks: list[int], window: int, span: int) -> dict:
    """One pass over `n_tokens` of the default text for each sink count: rolling perplexity per `span` tokens."""
    from sinkscope.streaming.evaluate import default_text, onepass_stream_nll

    ids = list(lm.tokenizer(default_text().text).input_ids)
    if len(ids) < n_tokens:
        raise SystemExit(f"the default text has {len(ids)} tokens, fewer than {n_tokens}")
    ids = ids[:n_tokens]
    out = {"tokens": n_tokens, "window": window, "span": span, "max_positions": lm.spec.max_positions, "runs": []}
    for s in sinks:
        t0 = time.perf_counter()
        nll = onepass_stream_nll(lm, ids, s, window)[1:]
        secs = time.perf_counter() - t0
        blocks = [float(np.exp(nll[i:i + span].mean())) for i in range(0, len(nll) - span + 1, span)]
        out["runs"].append({"sinks": s, "seconds": secs, "ppl": float(np.exp(nll[s + window:].mean())),
                            "rolling_ppl": blocks, "rss_mb": _rss_mb()})
        print(f"  S={s}: {secs:.0f} s, perplexity {out['runs'][-1]['ppl']:.2f}, rolling per {span}: "
              + " ".join(f"{b:.1f}" for b in blocks), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["cost", "long", "speed", "onepass", "onelong", "all"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--positions", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--probe", type=int, default=32, help="tokens timed at each point (default 32)")
    ap.add_argument("--long-tokens", type=int, default=None, help="default: 2.5 x max_position_embeddings")
    ap.add_argument("--span", type=int, default=1024, help="tokens per rolling-perplexity block")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="onepass: text lengths")
    ap.add_argument("--table-sinks", type=int, nargs="+", default=[0, 1, 2, 4, 8], help="onepass/onelong: S")
    ap.add_argument("--steps", type=int, default=100, help="onepass: token-by-token steps timed per cache")
    ap.add_argument("--full-at", type=int, default=1000,
                    help="onepass: also stream one cache whole, token by token, at this size (0: never)")
    args = ap.parse_args()

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    lm = sinkscope.load_model(args.model, progress=False)
    print(f"model {args.model}, S={args.sinks}, W={args.window}, torch threads {torch.get_num_threads()}")
    results: dict = {}
    if args.part in ("cost", "all"):
        rows = cost(lm, args.positions, args.sinks, args.window, args.probe)
        results["cost"] = rows
        by = {(r["cache"], r["position"]): r for r in rows}
        print(f"\n{'position':>8} | {'sink ms/tok':>11} | {'dense ms/tok':>12} | {'dense/sink':>10} | "
              f"{'sink KV MiB':>11} | {'dense KV MiB':>12} | {'sink RSS MB':>11} | {'dense RSS MB':>12}")
        for p in args.positions:
            s, d = by[("sink", p)], by[("dense", p)]
            print(f"{p:>8} | {s['ms_per_token']:>11.1f} | {d['ms_per_token']:>12.1f} | "
                  f"{d['ms_per_token'] / s['ms_per_token']:>10.2f} | {s['kv_mb']:>11.1f} | {d['kv_mb']:>12.1f} | "
                  f"{s['rss_mb']:>11.0f} | {d['rss_mb']:>12.0f}")
    if args.part in ("speed", "all"):
        r = speed(lm, args.sinks, args.window, args.probe)
        results["speed"] = r
        print(f"\nstreaming {r['stream_ms']:.1f} ms/token vs re-computation {r['recompute_ms']:.1f} ms/token "
              f"at window {r['window']}: {r['speedup']:.1f}x faster")
    if args.part in ("onepass", "all"):
        print(f"\nTable 1 ({len(args.table_sinks)} sink counts + dense, window {args.window}):")
        rows = table1(lm, args.sizes, args.table_sinks, args.window, args.steps, args.full_at or None)
        results["onepass"] = rows
        print(f"\n{'tokens':>6} | {'dense s':>7} | {'one pass s (5 caches)':>21} | {'token by token s':>16} | "
              f"{'ratio':>6} | {'Table 1 one pass s':>18}")
        for r in rows:
            one, tok = sum(r["onepass_s"].values()), sum(r["token_by_token_s"].values())
            print(f"{r['tokens']:>6} | {r['dense_s']:>7.1f} | {one:>21.1f} | {tok:>16.0f} | {tok / one:>6.1f} | "
                  f"{r['onepass_table_s']:>18.1f}")
            if "token_by_token_whole" in r:
                w = r["token_by_token_whole"]
                print(f"       at {r['tokens']}: S={w['sinks']} streamed whole token by token in {w['seconds']:.0f} s "
                      f"(estimated {w['estimated']:.0f} s); one pass vs token by token: max NLL difference "
                      f"{r['max_nll_difference']:.1e} nats")
    if args.part == "onelong":
        n = args.long_tokens or 100_000
        print(f"\none pass over {n} tokens ({n / (lm.spec.max_positions or n):.1f}x the context), window "
              f"{args.window}:")
        results["onelong"] = one_long(lm, n, args.table_sinks, args.window, args.span)
    if args.part in ("long", "all"):
        n = args.long_tokens or int(2.5 * (lm.spec.max_positions or 8192))
        t0 = time.perf_counter()
        r = long_stream(lm, n, args.sinks, args.window, args.span)
        r["seconds"] = time.perf_counter() - t0
        results["long"] = r
        ppl = r["rolling_ppl"]
        first, last = np.mean(ppl[:3]), np.mean(ppl[-3:])
        print(f"\n{n} tokens token by token ({n / (lm.spec.max_positions or n):.1f}x the context) in "
              f"{r['seconds']:.0f} s; cache length {r['cache_length']}")
        print("rolling perplexity per", args.span, "tokens:", " ".join(f"{x:.1f}" for x in ppl))
        print(f"first 3 blocks {first:.2f}, last 3 blocks {last:.2f}, ratio {last / first:.2f}; "
              f"max/min {max(ppl) / min(ppl):.2f}; finite: {all(map(math.isfinite, ppl))}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
