# ruff: noqa: E501  (markdown table rows)
"""Write docs/models.md: the support matrix of every family in tests/families.py, from sinkscope.checks.

    .venv/bin/python docs/models_table.py          # rewrites docs/models.md (a few seconds)
    python3 docs/models_table.py --device cuda --stdout   # the same checks on a GPU, printed (not written)

The same rows are asserted by tests/test_support_matrix.py, which also checks that this file's table is
current. ``sinkscope models --check MODEL`` prints one such row for a user's model.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from families import FAMILIES, build  # noqa: E402
from test_support_matrix import ATTN  # noqa: E402

from sinkscope.checks import CHECKS, EXACT, check_model  # noqa: E402

HEAD = """# Model families: what sinkscope serves exactly, and what it refuses

Every row is a tiny random model of the family (transformers {version}, built from a config: hidden size 32,
2-4 layers, sliding windows and chunks of 6 tokens so that they matter) put through
`sinkscope.checks.check_model`, the same checks `sinkscope models --check MODEL` runs on your model:

| check | sinkscope path | independent reference | tolerance |
|---|---|---|---|
| maps | `capture` (eager switch, hooks) | transformers' `output_attentions=True` under eager attention | 1e-5 |
| stats | statistics mode (`capture_stats`) | metrics of the eager maps computed in numpy (first-token mass, sink mass, entropy, learned-sink mass) and the eager forward's logits (relative to their scale) | 1e-4 |
| analyze | `analyze(mode="maps")` and, where served, `mode="stats"` | metrics of the eager maps in numpy | 1e-4 |
| cache | `SinkCache` (2 sinks + a window of 8, or the layer's sliding window + 2), streamed past its first evictions, on the model cut to its first attention layer | a fresh forward without a cache over the kept tokens at positions 0 .. S+W-1 | 1e-4 relative |
| streamer | `Streamer` per-token NLL on the same stream | NLL from those fresh forwards | 1e-4 relative |
| onepass | the one-pass streaming evaluation (`eval-stream`'s default) of the whole model, 2 sinks + a window of 8, in chunks of 3 (carried keys cross several chunks) | the same tokens streamed token by token through `SinkCache` (`--exact-stream`) | 1e-4 relative |

**exact**: within the tolerance. **refused**: sinkscope raises a one-line `SinkscopeError` that names the
family, the mode, why, and what works instead, before any work; it never returns numbers from a path that
did not run. **skipped**: served, but the generic reference doesn't apply to the model's shape. The largest
error seen is in brackets. Where one pass is refused but `SinkCache` serves the model (its attention code
bypasses transformers' attention interface), `eval-stream` streams it token by token instead and says so. `tests/test_support_matrix.py` asserts every cell, and
`tests/test_streaming_cache.py` holds `SinkCache` on hybrid models (Qwen3-Next) to a reference of its own.
Regenerate with `.venv/bin/python docs/models_table.py`.

| family | scheme | {checks} |
|---|---|{dashes}
"""


def main() -> None:
    import argparse

    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="run the tiny models on this torch device (default cpu)")
    parser.add_argument("--stdout", action="store_true", help="print the table instead of writing docs/models.md")
    args = parser.parse_args()
    lines = [HEAD.format(version=transformers.__version__, checks=" | ".join(CHECKS),
                         dashes="---|" * len(CHECKS)).rstrip("\n")]
    reasons: dict[str, list[str]] = {}
    for name in sorted(FAMILIES):
        try:
            model = build(name, attn=ATTN.get(name)).to(args.device)
        except Exception as exc:  # a family this transformers version lacks or builds differently
            lines.append(f"| `{name}` | not built here: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} |")
            continue
        row = check_model(model)
        cells = []
        for check in CHECKS:
            r = row.results[check]
            if r.status == EXACT:
                cells.append(f"exact ({r.max_error:.0e})")
            else:
                cells.append(f"{r.status} [{len(reasons.setdefault(name, [])) + 1}]")
                reasons[name].append(f"{check}: {r.detail}")
        loaded = " (loaded eager, as `load_model` does)" if ATTN.get(name) else ""
        lines.append(f"| `{name}` | {row.summary()}{loaded} | " + " | ".join(cells) + " |")
    lines.append("\n## Why a mode is refused (or a check skipped)\n")
    for name, why in reasons.items():
        lines.append(f"**`{name}`**\n")
        lines.extend(f"{i}. {w}" for i, w in enumerate(why, 1))
        lines.append("")
    lines.append(TAIL)
    if args.stdout:
        print("\n".join(lines))
        return
    (ROOT / "docs" / "models.md").write_text("\n".join(lines))
    print(f"wrote {ROOT / 'docs' / 'models.md'}")


TAIL = """## Where the rules live

One place decides what a family needs: `sinkscope/scheme.py` derives an `AttentionScheme` once per model
from the model itself (attention modules, rotary module, config): per layer its kind (full, sliding,
chunked, linear), positions (RoPE in halves or interleaved, partial rotary, ALiBi, absolute, none), head
dims of queries/keys and values; for the model, learned sink logits, soft-capping, whether attention goes
through transformers' attention interface, whether the eager switch takes effect, KV sharing. Capture,
statistics mode, `SinkCache`, the memory profile, this table and `sinkscope models --check` read it. A new
family that follows transformers' conventions needs nothing; one that doesn't is an entry in its tables.

The same table on an NVIDIA H200 (CUDA, torch 2.11, transformers 5.17; `python3 docs/models_table.py
--device cuda --stdout`, 36 s for all 30 families) and on that machine's CPU gives the same status in every
cell, the largest error 8e-7 on the GPU and 1e-6 on the CPU: [reports/gpu/models-h200.md](reports/gpu/models-h200.md).

Falcon is loaded with `attn_implementation="eager"` by `sinkscope.load_model`: transformers ignores a later
switch to eager on Falcon, and capture refuses a Falcon loaded with SDPA rather than report maps it never saw.
"""


if __name__ == "__main__":
    main()
