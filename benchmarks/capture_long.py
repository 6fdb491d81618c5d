"""Attention capture at long context: statistics mode beside the SDPA forward (the floor) and naive capture.

Cases, each in a fresh child process so that its peak resident memory (ru_maxrss) is its own; "peak" is the
resident memory above the process right after the model loaded:

- ``forward``: ``model.base_model(input_ids)`` with SDPA attention: the floor, no attention seen at all;
- ``stats``: ``sinkscope.analyze(lm, text, mode="stats")``: the whole analysis (every metric, pooled 96 x 96
  maps of every head, sink positions) in statistics mode;
- ``maps``: the same analysis from whole eager maps, one layer at a time (``mode="maps"``), with ``--maps``;
- ``naive``: what most tools do: eager attention with ``output_attentions=True``, every layer's maps kept and
  no metric computed. Skipped (and said so) where its estimated memory would not fit;
- ``paired``: ``forward`` and ``stats`` run alternately in one process; the table's times for those two come
  from here, so that their ratio does not depend on how busy the machine was when each ran alone.

Run (SmolLM2 on this CPU; one table with ratios measured side by side in the same run):

    .venv/bin/python benchmarks/capture_long.py                              # 1024 2048 4096, naive included
    .venv/bin/python benchmarks/capture_long.py --tokens 8192 16384 --no-naive --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = ("forward", "stats", "maps", "naive")


def _text_ids(tokenizer, n: int):
    import torch

    from sinkscope.streaming.evaluate import default_text  # Python's documentation topics: long, offline

    ids = tokenizer(default_text().text, return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"text has only {ids.shape[1]} tokens, asked for {n}")
    return torch.as_tensor(ids)


def run_case(model_name: str, case: str, n: int, repeat: int) -> dict:
    """One measurement, in this (child) process."""
    import torch

    import sinkscope
    from sinkscope.analysis import analyze

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    lm = sinkscope.load_model(model_name, progress=False)
    ids = _text_ids(lm.tokenizer, n)
    prompt = sinkscope.Prompt("bench", lm.tokenizer.decode(ids[0]))
    base = lm.model.base_model
    rss_kb = _current_rss_kb()
    if case == "paired":
        # Forward and statistics mode alternately in one process: their time ratio does not depend on how
        # fast the machine happened to be when each of the separate cases ran.
        best = {"forward": float("inf"), "stats": float("inf")}
        for _ in range(repeat):
            for which in best:
                t0 = time.perf_counter()
                with torch.no_grad():
                    if which == "forward":
                        base(input_ids=ids, use_cache=False)
                    else:
                        analyze(lm, prompt, max_tokens=n, mode="stats", progress=False)
                best[which] = min(best[which], time.perf_counter() - t0)
        return {"case": case, "tokens": n, "runs": repeat, "forward_s": best["forward"], "stats_s": best["stats"]}
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with torch.no_grad():
            if case == "forward":
                base(input_ids=ids, use_cache=False)
            elif case in ("stats", "maps"):
                prof = analyze(lm, prompt, max_tokens=n, mode=case, progress=False)
                assert prof.prompts[0].capture == case and prof.prompts[0].n_tokens == n
            elif case == "naive":
                lm.model.set_attn_implementation("eager")
                out = base(input_ids=ids, use_cache=False, output_attentions=True)
                assert len(out.attentions) == lm.spec.n_layers
                del out
                lm.model.set_attn_implementation("sdpa")
        times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "tokens": n, "seconds": min(times), "runs": repeat,
            "peak_mb": max(0, peak_kb - rss_kb) / 1024, "rss_after_load_mb": rss_kb / 1024}


def naive_bytes(shape: dict, n: int) -> int:
    """Every layer's float32 maps kept, plus one layer's eager temporaries (about three more maps)."""
    return (shape["n_layers"] + 3) * shape["n_heads"] * n * n * 4


def _shape(model_name: str) -> dict:
    """Layers and heads of the model, read in a child (the parent never holds the weights)."""
    code = (f"import json, sinkscope; s = sinkscope.load_model({model_name!r}, progress=False).spec; "
            "print(json.dumps({'n_layers': s.n_layers, 'n_heads': s.n_heads}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _current_rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# The targets, at 4096 tokens: statistics mode near the floor, and far below naive capture.
TARGET_TOKENS, MAX_OVER_FORWARD, MIN_UNDER_NAIVE = 4096, 1.5, 5.0


def _targets(by: dict) -> None:
    f, s, nv = (by.get((c, TARGET_TOKENS)) for c in ("forward", "stats", "naive"))
    if not (f and s):
        return
    checks = [(f"stats / forward, time <= {MAX_OVER_FORWARD}", s["seconds"] / f["seconds"] <= MAX_OVER_FORWARD),
              (f"stats / forward, memory <= {MAX_OVER_FORWARD}",
               s["peak_mb"] / max(f["peak_mb"], 1) <= MAX_OVER_FORWARD)]
    if nv:
        checks += [(f"naive / stats, time >= {MIN_UNDER_NAIVE}", nv["seconds"] / s["seconds"] >= MIN_UNDER_NAIVE),
                   (f"naive / stats, memory >= {MIN_UNDER_NAIVE}",
                    nv["peak_mb"] / max(s["peak_mb"], 1) >= MIN_UNDER_NAIVE)]
    print(f"targets at {TARGET_TOKENS} tokens: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}"
                                                             for name, ok in checks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs of the timed cases (paired, maps), fastest kept (default 2)")
    ap.add_argument("--no-naive", action="store_true", help="leave out naive output_attentions capture")
    ap.add_argument("--maps", action="store_true", help="also run the analysis from whole eager maps")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.model, args.child[0], int(args.child[1]), args.repeat)))
        return

    cases = ["forward", "stats", "paired"] + (["maps"] if args.maps else []) + ([] if args.no_naive else ["naive"])
    rows, skipped = [], []
    shape = _shape(args.model)
    for n in args.tokens:
        for case in cases:
            if case == "naive" and naive_bytes(shape, n) > 0.9 * _available_bytes():
                skipped.append(f"naive at {n} tokens: needs ~{naive_bytes(shape, n) / 2**30:.0f} GiB, "
                               f"{_available_bytes() / 2**30:.0f} GiB available")
                print(f"  skipped {skipped[-1]}", file=sys.stderr)
                continue
            # forward and stats give their memory here (times: the paired case), naive is slow: one run each.
            repeat = args.repeat if case in ("paired", "maps") else 1
            cmd = [sys.executable, __file__, "--model", args.model, "--repeat", str(repeat), "--child", case, str(n)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(f"{case} at {n} tokens failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            if case == "paired":
                print(f"  {case:>8} {n:>6} tokens: forward {r['forward_s']:.2f} s, stats {r['stats_s']:.2f} s "
                      "(alternating)", file=sys.stderr)
            else:
                print(f"  {case:>8} {n:>6} tokens: {r['seconds']:8.2f} s  peak +{r['peak_mb']:8.0f} MB",
                      file=sys.stderr)

    from sinkscope import _native

    row_pass = _native.describe("cpu")  # what the children used: same machine, cache and environment
    print(f"\nmodel {args.model}, torch threads {os.environ.get('BENCH_THREADS', os.cpu_count())}, "
          f"best of {args.repeat} (naive: 1 run); forward and stats times from one process running them "
          "alternately; peak = resident memory above the loaded model, each case in its own process; "
          f"statistics mode's row pass: {row_pass}")
    head = (f"{'tokens':>6} | {'forward s':>9} | {'stats s':>8} | {'stats/fwd t':>11} | {'fwd MB':>7} | "
            f"{'stats MB':>8} | {'stats/fwd m':>11} | {'naive s':>8} | {'naive MB':>8} | "
            f"{'naive/stats t':>13} | {'naive/stats m':>13}")
    if args.maps:
        head += f" | {'maps s':>7} | {'maps MB':>7}"
    print(head)
    print("-" * len(head))
    by = {(r["case"], r["tokens"]): r for r in rows}
    for n in args.tokens:
        f, s = by.get(("forward", n)), by.get(("stats", n))
        if not (f and s):
            continue
        pair = by.get(("paired", n))
        if pair:  # times from the alternating run; memory from the separate processes
            f, s = {**f, "seconds": pair["forward_s"]}, {**s, "seconds": pair["stats_s"]}
            by[("forward", n)], by[("stats", n)] = f, s
        line = (f"{n:>6} | {f['seconds']:>9.2f} | {s['seconds']:>8.2f} | {s['seconds'] / f['seconds']:>11.2f} | "
                f"{f['peak_mb']:>7.0f} | {s['peak_mb']:>8.0f} | {s['peak_mb'] / max(f['peak_mb'], 1):>11.2f}")
        nv = by.get(("naive", n))
        if nv:
            line += (f" | {nv['seconds']:>8.2f} | {nv['peak_mb']:>8.0f} | {nv['seconds'] / s['seconds']:>13.2f} | "
                     f"{nv['peak_mb'] / max(s['peak_mb'], 1):>13.2f}")
        else:
            line += f" | {'-':>8} | {'-':>8} | {'-':>13} | {'-':>13}"
        mp = by.get(("maps", n))
        if args.maps:
            line += f" | {mp['seconds']:>7.2f} | {mp['peak_mb']:>7.0f}" if mp else f" | {'-':>7} | {'-':>7}"
        print(line)
    for s in skipped:
        print(f"skipped {s}")
    _targets(by)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "skipped": skipped, "row_pass": row_pass}, fh, indent=1)


if __name__ == "__main__":
    main()
