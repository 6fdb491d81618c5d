"""Time and peak memory of sinkscope's analysis beside a plain SDPA forward of the same tokens.

Every case runs in a fresh child process so that its peak resident memory (ru_maxrss) is its own; the
figure reported is the peak above the process's memory right after the model was loaded. Run:

    .venv/bin/python benchmarks/capture.py                  # 512, 1024, 2048 tokens, smollm2-135m
    .venv/bin/python benchmarks/capture.py --tokens 512 4096 --naive

Prints one table with ratios (analysis / forward) measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = ("forward", "analyze", "naive")


def _text_ids(tokenizer, n: int):
    from pydoc_data.topics import topics  # long, human-written, offline English

    import torch

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
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
    text = lm.tokenizer.decode(ids[0])
    base = lm.model.base_model
    rss_kb = _current_rss_kb()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with torch.no_grad():
            if case == "forward":
                base(input_ids=ids, use_cache=False)
            elif case == "analyze":
                analyze(lm, sinkscope.Prompt("bench", text), max_tokens=n, progress=False)
            elif case == "naive":  # what most tools do: eager attention, every layer's maps kept
                lm.model.set_attn_implementation("eager")
                out = base(input_ids=ids, use_cache=False, output_attentions=True)
                assert len(out.attentions) == lm.spec.n_layers
                del out
                lm.model.set_attn_implementation("sdpa")
        times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "tokens": n, "seconds": min(times),
            "peak_mb": max(0, peak_kb - rss_kb) / 1024, "rss_after_load_mb": rss_kb / 1024}


def _current_rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the fastest is kept (default 2)")
    ap.add_argument("--naive", action="store_true", help="also time eager output_attentions (slow, memory-hungry)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.model, args.child[0], int(args.child[1]), args.repeat)))
        return

    cases = ["forward", "analyze"] + (["naive"] if args.naive else [])
    rows = []
    for n in args.tokens:
        for case in cases:
            cmd = [sys.executable, __file__, "--model", args.model, "--repeat", str(args.repeat),
                   "--child", case, str(n)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(f"{case} at {n} tokens failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {case:>8} {n:>6} tokens: {r['seconds']:8.2f} s  peak +{r['peak_mb']:8.0f} MB", file=sys.stderr)

    print(f"\nmodel {args.model}, torch threads {os.environ.get('BENCH_THREADS', os.cpu_count())}, "
          f"best of {args.repeat}; peak = resident memory above the loaded model")
    head = (f"{'tokens':>6} | {'forward s':>9} | {'analyze s':>9} | {'time x':>6} | {'fwd MB':>7} | "
            f"{'analyze MB':>10} | {'mem x':>6}")
    if args.naive:
        head += f" | {'naive s':>8} | {'naive MB':>8} | {'naive/analyze t':>15} | {'naive/analyze m':>15}"
    print(head)
    print("-" * len(head))
    by = {(r["case"], r["tokens"]): r for r in rows}
    for n in args.tokens:
        f, a = by.get(("forward", n)), by.get(("analyze", n))
        if not (f and a):
            continue
        line = (f"{n:>6} | {f['seconds']:>9.2f} | {a['seconds']:>9.2f} | {a['seconds'] / f['seconds']:>6.2f} | "
                f"{f['peak_mb']:>7.0f} | {a['peak_mb']:>10.0f} | {a['peak_mb'] / max(f['peak_mb'], 1):>6.2f}")
        nv = by.get(("naive", n))
        if args.naive and nv:
            line += (f" | {nv['seconds']:>8.2f} | {nv['peak_mb']:>8.0f} | {nv['seconds'] / a['seconds']:>15.2f} | "
                     f"{nv['peak_mb'] / max(a['peak_mb'], 1):>15.2f}")
        print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
