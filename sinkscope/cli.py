"""The ``sinkscope`` command. Each subcommand parses, validates cheap things first, then calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import ConfigError, SinkscopeError

if TYPE_CHECKING:
    from .analysis import SinkProfile
    from .models import LoadedModel
    from .prompts import Prompt
    from .streaming.streamer import TokenStats

EVAL_TOKENS = 4000  # eval-stream: about 3 min for SmolLM2 on 2 CPU cores, recompute included (docs/cli.md)
VALIDATE_TOKENS = 2000  # report's validation: streaming + dense only, under a minute for SmolLM2 on 2 CPU cores
EPILOG = "Docs: docs/cli.md. Models: `sinkscope models`. Cache: $SINKSCOPE_CACHE (default ~/.cache/sinkscope)."


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 0,5,-1, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers like 0,1,2,4,8, "
                                         f"got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _modes(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]  # checked by the library (one-line error)


def _stride(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0.05 (5%), got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _check_stream_sizes(sinks: Sequence[int], window: int | Sequence[int], tokens: int | None) -> None:
    """The checks that need no model (the library repeats them with the model's context)."""
    if min(sinks) < 0:
        raise ConfigError(f"--sinks must be >= 0, got {min(sinks)}")
    if min([window] if isinstance(window, int) else window) < 1:
        raise ConfigError(f"--window must be at least 1, got {window if isinstance(window, int) else min(window)}")
    if tokens is not None and tokens < 1:
        raise ConfigError(f"--tokens must be at least 1, got {tokens}")


def _windows(args: argparse.Namespace, default: int = 256) -> int | list[int]:
    """``--window W`` or ``--windows W,W,...`` (a grid), not both."""
    if args.windows is not None and args.window is not None:
        raise ConfigError("give --window W or --windows W,W,... (a grid), not both")
    if args.windows is not None:
        return args.windows
    return args.window if args.window is not None else default


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: float32)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from a hub repository (off by default)")


def _load(source: str, args: argparse.Namespace, progress: bool = True) -> LoadedModel:
    """Load ``source`` with the command's --device / --dtype / --trust-remote-code."""
    from .models import load

    return load(source, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                progress=progress)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="sinkscope", description="Where does a transformer LLM park its attention? Attention-sink analysis.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"sinkscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_models = sub.add_parser(
        "models", help="list the embedded models; --check MODEL: which sinkscope modes serve a model exactly",
        description="List the embedded models, their install state and the conversion cache. With --check, load "
                    "MODEL (a registry name, HF directory, .gguf or hub id) and run every mode (whole maps, "
                    "statistics mode, analyze, SinkCache, streamer) against an independent reference on a short "
                    "prompt: each is exact, refused (with the reason and what works instead) or failed. "
                    "Exit status 0 when nothing failed, 1 otherwise.")
    p_models.add_argument("--check", metavar="MODEL", help="check this model (path, .gguf, registry name, hub id)")
    p_models.add_argument("--json", action="store_true", help="with --check: print the row as JSON")
    _add_model_options(p_models)
    p_models.set_defaults(func=cmd_models)

    p_rep = sub.add_parser(
        "report", help="analyse a model's attention sinks and write report.json/.html/.md",
        description="Capture attention on prompts, measure sinks per layer and head, recommend a sink count, "
                    "and write DIR/report.json, DIR/report.html (self-contained, opens offline) and DIR/report.md.",
        epilog=EPILOG)
    p_rep.add_argument("model", nargs="?", default="smollm2-135m",
                       help="registry name, local HF directory, .gguf file or hub id (default: smollm2-135m)")
    p_rep.add_argument("--prompt-file", action="append", default=None, metavar="F",
                       help="a UTF-8 text file to analyse; repeat for several (default: sample_prompts/*.txt)")
    p_rep.add_argument("--long-prompt", action="store_true",
                       help="also analyse a long text: Python's own documentation topics (standard library, "
                            "offline), cut to --max-tokens (without it, to the model's context)")
    p_rep.add_argument("--max-tokens", type=int, default=None, metavar="N",
                       help="truncate each prompt to N tokens (default: the model's context; with rotary positions "
                            "N may exceed it, and the report flags such prompts)")
    p_rep.add_argument("--mode", choices=["auto", "maps", "stats"], default="auto",
                       help="how attention is measured: maps = whole eager maps (short prompts), stats = "
                            "statistics mode (the same numbers computed block by block, no T x T maps: long "
                            "prompts), auto = stats for prompts over 1024 tokens (default)")
    p_rep.add_argument("--k-max", type=_positive_int, default=8, metavar="K",
                       help="measure the first K tokens as sink candidates (default: 8)")
    p_rep.add_argument("--out", default=None, metavar="DIR",
                       help="output directory (default: sinkscope-reports/MODEL)")
    p_rep.add_argument("--layers", type=_layers, default=None, metavar="L,L,...",
                       help="analyse only these layers (default: all)")
    p_rep.add_argument("--map-size", type=_positive_int, default=96, metavar="N",
                       help="pool displayed attention maps to at most N x N (default: 96)")
    p_rep.add_argument("--share", type=_share, default=0.95,
                       help="recommendation target: share of the first-K mass to keep (default: 0.95)")
    p_rep.add_argument("--threshold", type=_share, default=0.3,
                       help="first-token mass above which a head is a sink head (default: 0.3)")
    val = p_rep.add_argument_group(
        "validation by streaming (on by default; --no-validate skips it)",
        "Check the recommendation with perplexity under eviction (see `sinkscope eval-stream`, one pass per sink "
        "count): recommend the smallest sink count whose streaming perplexity is within --tolerance of the best; "
        "the attention estimate stays beside it.")
    val.add_argument("--validate", action=argparse.BooleanOptionalAction, default=None,
                     help="run the streaming evaluation and recommend from it (default: on where it can run, "
                          "else a note says why not; --validate: an error then; --no-validate: the attention "
                          "estimate alone)")
    val.add_argument("--validate-tokens", type=int, default=None, metavar="N",
                     help=f"tokens of the validation text to stream (default: {VALIDATE_TOKENS})")
    val.add_argument("--validate-text", default=None, metavar="F",
                     help="UTF-8 text to stream (default: Python's documentation topics, pydoc_data.topics)")
    val.add_argument("--window", type=int, default=None, metavar="W", help="recent tokens kept (default: 256)")
    val.add_argument("--windows", type=_int_list, default=None, metavar="W,W,...",
                     help="a grid of windows: the count must qualify at each (instead of --window)")
    val.add_argument("--sinks", type=_int_list, default=None, metavar="S,S,...",
                     help="sink counts to stream with (default: 0,1,2,4,8 and the attention estimate)")
    val.add_argument("--tolerance", type=_tolerance, default=None,
                     help="recommend the smallest count within this fraction of the best perplexity (default: 0.05)")
    p_rep.add_argument("--inputs", action=argparse.BooleanOptionalAction, default=True,
                       help="also measure the first prompt (its first 512 tokens) with the BOS token toggled and in "
                            "the chat template, side by side (default: on; --no-inputs skips it)")
    p_rep.add_argument("--ablate", action="store_true",
                       help="zero the heads flagged dormant and score the first prompt (512 tokens) against the "
                            "intact model and as many random non-sink heads zeroed (a few more forwards)")
    p_rep.add_argument("--pins", action=argparse.BooleanOptionalAction, default=True,
                       help="stream the first prompt with secondary sinks with them pinned, against as many more "
                            "leading tokens (three one-pass streams; default: on; --no-pins skips it)")
    p_rep.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_options(p_rep)
    p_rep.set_defaults(func=cmd_report)

    p_cmp = sub.add_parser(
        "compare", help="two or more reports side by side: the cross-model atlas (HTML and Markdown)",
        description="Read the report.json of two or more report directories (sinkscope report ... --out DIR) and "
                    "write compare.html, compare.md and compare.json: sink rate, recommended cache, sink strength "
                    "by relative depth, learned-sink mass, the first massive activation, dormant heads and the "
                    "BOS comparison, side by side.", epilog=EPILOG)
    p_cmp.add_argument("reports", nargs="+", metavar="REPORT_DIR", help="report directories (or report.json files)")
    p_cmp.add_argument("--out", default="sinkscope-reports/compare", metavar="DIR",
                       help="output directory (default: sinkscope-reports/compare)")
    p_cmp.set_defaults(func=cmd_compare)

    p_in = sub.add_parser(
        "inputs", help="does the sink depend on the BOS token or the chat template? one prompt, side by side",
        description="Measure one prompt as the tokenizer gives it, with the BOS token removed (or added) and as a "
                    "user message of the chat template, where the tokenizer has them: sink rate, first-token mass "
                    "and the recommended sink count of each, and whether the serving stack's choice matters.",
        epilog=EPILOG)
    p_in.add_argument("model", nargs="?", default="smollm2-135m", help="model source (default: smollm2-135m)")
    src_in = p_in.add_mutually_exclusive_group()
    src_in.add_argument("--prompt", metavar="TEXT", help="the prompt text (default: the first sample prompt)")
    src_in.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 file")
    p_in.add_argument("--max-tokens", type=_positive_int, default=512, metavar="N",
                      help="the prompt's first N tokens in every variant (default: 512)")
    p_in.add_argument("--k-max", type=_positive_int, default=8, metavar="K",
                      help="leading tokens measured (default: 8)")
    p_in.add_argument("--threshold", type=_share, default=0.3,
                      help="first-token mass above which a head is a sink head (default: 0.3)")
    p_in.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p_in.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_options(p_in)
    p_in.set_defaults(func=cmd_inputs)

    p_st = sub.add_parser(
        "stream", help="stream a model through a sink + window KV cache, live, with a status line",
        description="Feed a prompt, then generate token by token through a StreamingLLM cache that keeps the "
                    "first S tokens and the last W. The text goes to stdout as it comes; a status line (cache "
                    "length and memory, tokens/s, sinks on/off, drift) goes to stderr.", epilog=EPILOG)
    p_st.add_argument("model", nargs="?", default="smollm2-135m", help="model source (default: smollm2-135m)")
    src = p_st.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    src.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 file")
    p_st.add_argument("--sinks", type=int, default=4, metavar="S", help="sink tokens kept (default: 4)")
    p_st.add_argument("--window", type=int, default=256, metavar="W", help="recent tokens kept (default: 256)")
    p_st.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                      help="tokens to generate (default: 256)")
    p_st.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p_st.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: all)")
    p_st.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p_st.add_argument("--sinks-off-at", type=int, default=None, metavar="STEP",
                      help="evict the sinks from this stream step on (watch quality drop)")
    p_st.add_argument("--sinks-on-at", type=int, default=None, metavar="STEP",
                      help="switch sinks back on from this step on (re-prefills the first S tokens)")
    p_st.add_argument("--status-every", type=_positive_int, default=32, metavar="N",
                      help="print the status line every N tokens (default: 32)")
    p_st.add_argument("--jsonl", metavar="FILE", help="also write every token's statistics as JSON lines")
    p_st.add_argument("--no-eos", action="store_true", help="keep generating past the end-of-text token")
    _add_model_options(p_st)
    p_st.set_defaults(func=cmd_stream)

    p_ev = sub.add_parser(
        "eval-stream", help="perplexity of a long text under each sink count, beside dense and recompute",
        description="Score a long text as if streamed token by token through a sink + window cache, for each "
                    "sink count (and each window of a grid), beside dense attention (full cache) and a sliding "
                    "window re-computed for every token (Xiao et al. 2023, Table 1). Streaming runs in one pass "
                    "per cache (the same numbers as token by token; --exact-stream feeds token by token). Writes "
                    "DIR/stream_eval.json and DIR/stream_eval.html (self-contained) and recommends the smallest "
                    "sink count within --tolerance of the best perplexity.", epilog=EPILOG)
    p_ev.add_argument("model", nargs="?", default="smollm2-135m", help="model source (default: smollm2-135m)")
    p_ev.add_argument("--text-file", metavar="F",
                      help="UTF-8 text to stream (default: Python's documentation topics, pydoc_data.topics)")
    p_ev.add_argument("--sinks", type=_int_list, default=[0, 1, 2, 4, 8], metavar="S,S,...",
                      help="sink counts to stream with (default: 0,1,2,4,8)")
    p_ev.add_argument("--window", type=int, default=None, metavar="W",
                      help="recent tokens each query attends to; also recompute's window (default: 256)")
    p_ev.add_argument("--windows", type=_int_list, default=None, metavar="W,W,...",
                      help="a grid: every sink count at every window on the same targets, with a heatmap and the "
                           "cheapest cache within --tolerance of dense (recompute runs at the largest)")
    p_ev.add_argument("--tokens", type=int, default=EVAL_TOKENS, metavar="N",
                      help=f"stream the text's first N tokens (default: {EVAL_TOKENS})")
    p_ev.add_argument("--modes", type=_modes, default=["streaming", "dense", "recompute"], metavar="M,M",
                      help="any of streaming, dense, recompute (default: all three)")
    p_ev.add_argument("--exact-stream", action="store_true",
                      help="feed the text token by token through SinkCache instead of one pass: the same numbers, "
                           "hundreds of times slower (the reference the fast path is tested against)")
    p_ev.add_argument("--recompute-stride", type=_stride, default="auto", metavar="K",
                      help="recompute every K-th target only (every mode also reports its perplexity on those "
                           "targets); 'auto' bounds recompute to a couple of hundred targets (default: auto)")
    p_ev.add_argument("--tolerance", type=_tolerance, default=0.05,
                      help="recommend the smallest sink count within this fraction of the best (default: 0.05)")
    p_ev.add_argument("--out", default=None, metavar="DIR",
                      help="output directory (default: sinkscope-reports/MODEL)")
    p_ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_options(p_ev)
    p_ev.set_defaults(func=cmd_eval_stream)

    p_db = sub.add_parser(
        "dashboard", help="open the local dashboard: heatmaps beside a live stream with a sink-eviction switch",
        description="Serve the Dash dashboard on this machine: analyse prompts (layer x head heatmap, one "
                    "head's attention map, sink curves, recommendation) beside a live stream whose sinks can "
                    "be evicted and restored mid-stream. The first model is loaded before the URL is printed; "
                    "others load when picked in the page.", epilog=EPILOG)
    p_db.add_argument("--model", action="append", default=None, metavar="M",
                      help="a model to offer (repeat for several; the first is the default; default: smollm2-135m)")
    p_db.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    p_db.add_argument("--port", type=_port, default=8050, help="port (default: 8050)")
    lim = p_db.add_argument_group("server-side limits (each refusal is shown in the page)")
    lim.add_argument("--max-prompt-tokens", type=_positive_int, default=4096, metavar="N",
                     help="longest text a stream reads (default: 4096)")
    lim.add_argument("--max-new-tokens", type=_positive_int, default=1024, metavar="N",
                     help="most tokens a stream generates (default: 1024)")
    lim.add_argument("--max-analysis-tokens", type=_positive_int, default=4096, metavar="N",
                     help="longest prompt the page analyses (default: 4096)")
    lim.add_argument("--max-streams", type=_positive_int, default=4, metavar="N",
                     help="streams running at once, all pages together (default: 4)")
    p_db.add_argument("--reports", action="append", metavar="DIR",
                      help="report directories, or folders of them, offered in the atlas (repeatable; default: the "
                           "checkout's docs/reports)")
    p_db.add_argument("--debug", action="store_true",
                      help="Flask's development server with Dash's debug tools, for working on the dashboard itself "
                           "(default: the waitress server)")
    _add_model_options(p_db)
    p_db.set_defaults(func=cmd_dashboard)
    return parser


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def cmd_models(args: argparse.Namespace) -> int:
    """Print the registry: name, installed, converted, description; the install command where missing.
    With ``--check MODEL``: the model's support row (docs/models.md has the same row for each family)."""
    from .models import cache_dir, list_models

    if args.check:
        return _check(args)
    if args.json:
        raise ConfigError("--json goes with --check MODEL")

    rows = list_models()
    width = max(len(r["name"]) for r in rows) + (len(" (default)"))
    print(f"{'name':<{width}}  installed  converted  description")
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        print(f"{name:<{width}}  {'yes' if r['installed'] else 'no':<9}  {'yes' if r['converted'] else 'no':<9}  "
              f"{r['description']}")
    for r in rows:
        if not r["installed"]:
            print(f"\nto install {r['name']}: {r['install']}")
    print(f"\nconverted weights are cached in {cache_dir() / 'models'}")
    print("any local Hugging Face directory, .gguf file or hub id (org/name) works too.")
    return 0


def _check(args: argparse.Namespace) -> int:
    import json

    from .checks import check_model

    lm = _load(args.check, args, progress=not args.json)
    if not args.json:
        print(f"checking {lm.spec.name} ({lm.spec.architecture}) against independent references ...", flush=True)
    row = check_model(lm.model)
    if args.json:
        print(json.dumps(row.to_dict(), indent=1))
        return 0 if row.ok else 1
    print(f"{row.family}: {row.summary()}")
    for name, r in row.results.items():
        err = f" (max error {r.max_error:.1e})" if r.max_error is not None else ""
        print(f"  {name:<9} {r.status:<8} {r.detail}{err}")
    if not row.ok:
        print("some mode gave numbers off its reference or raised: please report it with this output")
    return 0 if row.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    """Analyse MODEL on prompts and write the three report files."""
    from .prompts import long_text, read_prompt_file, sample_prompts
    from .report import check_output_dir

    if args.max_tokens is not None and args.max_tokens < args.k_max + 1:
        raise ConfigError(f"--max-tokens must be at least K + 1 = {args.k_max + 1}, got {args.max_tokens}")
    validation = {"--validate-tokens": args.validate_tokens, "--validate-text": args.validate_text,
                  "--window": args.window, "--windows": args.windows, "--sinks": args.sinks,
                  "--tolerance": args.tolerance}
    given = [k for k, v in validation.items() if v is not None]
    if given and args.validate is False:
        raise ConfigError(f"{', '.join(given)} {'sets' if len(given) == 1 else 'set'} the validation, which "
                          "--no-validate skips: drop one or the other")
    window = _windows(args)
    tokens = args.validate_tokens if args.validate_tokens is not None else VALIDATE_TOKENS
    # Asked for (--validate or one of its options): what stops it is an error. By default: a note.
    required = args.validate is True or bool(given)
    validate = args.validate is not False
    if validate:
        _check_stream_sizes(args.sinks or [0], window, tokens)
    prompts = [read_prompt_file(f) for f in args.prompt_file] if args.prompt_file else []
    if args.long_prompt:
        prompts.append(long_text())
    if not prompts:
        prompts = sample_prompts()
    text = read_prompt_file(args.validate_text) if args.validate_text else None
    out = Path(args.out) if args.out else Path("sinkscope-reports") / _safe_name(args.model)
    out = check_output_dir(out)  # before the slow part: a bad --out must not cost a model load

    from .analysis import analyze
    from .report import write_report

    lm = _load(args.model, args, progress=not args.quiet)
    modes = ("streaming", "dense")
    if validate:  # refuse bad sizes, short texts and unsupported architectures before the analysis
        from .streaming.evaluate import DEFAULT_SINKS, prepare_stream_eval

        try:
            plan = prepare_stream_eval(lm, text, sinks=args.sinks or (*DEFAULT_SINKS, args.k_max), window=window,
                                       tokens=tokens, modes=modes)
        except SinkscopeError as exc:
            if required:
                raise
            validate = False
            print(f"note: no validation by streaming ({exc}); the recommendation is the attention estimate "
                  "(--no-validate skips this check)", file=sys.stderr)
        else:
            if plan.onepass_fallback:
                print(f"note: one pass can't serve {lm.spec.name} ({plan.onepass_fallback}); validating token by "
                      "token (exact, slower)", file=sys.stderr)
    profile = analyze(lm, prompts, k_max=args.k_max, max_tokens=args.max_tokens, layers=args.layers,
                      map_size=args.map_size, share=args.share, threshold=args.threshold, mode=args.mode,
                      progress=not args.quiet)
    if validate:
        profile.validate(lm, text, sinks=args.sinks, window=window, tokens=tokens, modes=modes,
                         tolerance=args.tolerance if args.tolerance is not None else 0.05, progress=not args.quiet)
    if args.inputs:
        from .inputs import input_sensitivity

        try:
            profile.inputs = input_sensitivity(lm, prompts[0], k_max=args.k_max, threshold=args.threshold,
                                               share=args.share, mode=args.mode, progress=not args.quiet).to_dict()
        except SinkscopeError as exc:  # e.g. a first prompt too short once the BOS is gone: the report stands
            print(f"note: no BOS / chat-template comparison ({exc}); --no-inputs skips it", file=sys.stderr)
    if args.ablate:
        _ablate(profile, lm, prompts[0])
    if args.pins:
        _pin(profile, lm, prompts)
    paths = write_report(profile, out)
    rec = profile.recommendation
    print(f"{lm.spec.name}: {len(profile.prompts)} prompt{'s' * (len(profile.prompts) != 1)}, "
          f"{sum(p.n_tokens for p in profile.prompts)} tokens; sink rate {profile.sink_rate:.1%}")
    _print_capture_notes(profile)
    for h in profile.sink_heads()[:3]:
        print(f"  sink head L{h['layer']}.H{h['head']}: first-token mass {h['first_token_mass']:.3f}")
    if profile.stream_eval:
        from .analysis import attention_estimate

        est = attention_estimate(rec)
        _print_stream_eval(profile.stream_eval)
        print(f"attention estimate: {est.sinks} sinks  ({est.method})")
    print(f"recommended sinks: {rec.sinks}  ({rec.method})")
    _print_cheapest(rec)
    d = profile.deploy
    cache = "" if d.cache_refused else f"SinkCache(model, sinks={d.sinks}, window={d.window}); "
    print(f"deploy: {cache}kvpress StreamingLLMPress(n_sink={d.sinks}); llama.cpp -c {d.sinks + d.window} "
          f"--keep {d.llama_cpp_keep} --context-shift (report.md: 'What to deploy')")
    if profile.inputs:
        print(f"BOS and chat template: {profile.inputs['verdict']}")
    dormant = profile.dormant_heads()
    if dormant:
        names = ", ".join(f"L{d['layer']}.H{d['head']}" for d in dormant[:6]) + (", ..." if len(dormant) > 6 else "")
        print(f"dormant heads: {len(dormant)} ({names})")
    if profile.ablation:
        print(f"ablation: {profile.ablation['verdict']}")
    if profile.pinning and "verdict" in profile.pinning:
        print(f"secondary sinks: {profile.pinning['verdict']}")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def _ablate(profile: SinkProfile, lm: LoadedModel, prompt: Prompt) -> None:
    """``report --ablate``: the dormant heads zeroed on the first prompt, against random non-sink heads."""
    import numpy as np

    from .heads import ablate_heads

    dormant = profile.dormant_heads()
    if not dormant:
        why = profile.head_outputs_dict().get("unavailable")
        print(f"note: nothing to ablate ({why or 'no head is flagged dormant'})", file=sys.stderr)
        return
    ftm = profile.first_token_mass
    others = [(profile.layers[int(i)], int(h)) for i, h in zip(*np.nonzero(ftm <= profile.threshold), strict=True)]
    profile.ablation = ablate_heads(lm, prompt.text, [(d["layer"], d["head"]) for d in dormant],
                                    control_from=others, name=prompt.name).to_dict()


def _pin(profile: SinkProfile, lm: LoadedModel, prompts: list[Prompt]) -> None:
    """``report --pins``: the first prompt's secondary sinks pinned, against as many more leading tokens."""
    from .pins import profile_pin_evidence

    if not any(p.secondary_sinks for p in profile.prompts):
        profile.pinning = {"unavailable": "no secondary sinks to pin"}
        return
    try:
        profile.pinning = profile_pin_evidence(lm, profile, prompts).to_dict()
    except SinkscopeError as exc:  # a model one pass can't stream, a prompt too short: the report stands
        profile.pinning = {"unavailable": str(exc)}
        print(f"note: secondary sinks not pinned ({exc}); --no-pins skips this", file=sys.stderr)


def _print_capture_notes(profile: SinkProfile) -> None:
    stats = [p for p in profile.prompts if p.capture == "stats"]
    if stats:
        names = ", ".join(f"{p.name} ({p.n_tokens})" for p in stats)
        print(f"statistics mode (exact per-head statistics, no T x T maps) for: {names}")
    fallback = profile.settings.get("stats_fallback")
    if fallback:
        print(f"note: long prompts measured with whole maps, not statistics mode: {fallback}")
    context = profile.model.max_positions
    for p in profile.prompts:
        if p.beyond_context:
            print(f"note: {p.name} ({p.n_tokens} tokens) runs past {profile.model.name}'s trained context of "
                  f"{context}; its numbers describe positions the model never trained on")


def cmd_compare(args: argparse.Namespace) -> int:
    """Write the atlas of two or more reports."""
    from .compare import atlas_rows, compare
    from .report import check_output_dir, write_compare

    entries = compare(args.reports)
    out = check_output_dir(args.out)
    paths = write_compare(entries, out)
    width = max(len(q) for q, _ in atlas_rows(entries))
    print(f"{'':<{width}}  " + "  |  ".join(e.name for e in entries))
    for q, cells in atlas_rows(entries):
        print(f"{q:<{width}}  " + "  |  ".join(cells))
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def cmd_inputs(args: argparse.Namespace) -> int:
    """Compare one prompt as tokenized, with the BOS token toggled and in the chat template."""
    import json

    from .inputs import input_sensitivity
    from .prompts import Prompt, read_prompt_file, sample_prompts

    if args.max_tokens < args.k_max + 1:
        raise ConfigError(f"--max-tokens must be at least K + 1 = {args.k_max + 1}, got {args.max_tokens}")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ConfigError("the prompt is empty")
        prompt = Prompt("prompt", args.prompt)
    else:
        prompt = read_prompt_file(args.prompt_file) if args.prompt_file else sample_prompts()[0]
    lm = _load(args.model, args, progress=not args.quiet)
    result = input_sensitivity(lm, prompt, k_max=args.k_max, max_tokens=args.max_tokens, threshold=args.threshold,
                               progress=not args.quiet)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    print(f"{lm.spec.name}, prompt {result.prompt!r} (K = {result.k_max}, sink head: first-token mass > "
          f"{result.threshold:g})")
    print(f"  {'variant':<14} {'tokens':>6}  {'sink rate':>9}  {'first-token':>11}  {'sinks':>5}  first tokens")
    for v in result.variants:
        first = " ".join(repr(t) for t in v.first_tokens[:3])
        print(f"  {v.name:<14} {v.n_tokens:>6}  {v.sink_rate:>9.1%}  {v.first_token_mass:>11.3f}  "
              f"{v.recommended_sinks:>5}  {first}")
    for name, why in result.unavailable.items():
        print(f"  {name}: not measured ({why})")
    print(result.verdict)
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    """Stream MODEL through a SinkCache: text on stdout, status lines on stderr."""
    import json

    from .prompts import read_prompt_file
    from .streaming.streamer import Streamer

    if args.sinks < 0 or args.window < 1:
        raise ConfigError(f"need --sinks >= 0 and --window >= 1, got {args.sinks} and {args.window}")
    if args.max_new_tokens < 0:
        raise ConfigError("--max-new-tokens must be >= 0")
    prompt = read_prompt_file(args.prompt_file).text if args.prompt_file else args.prompt
    if not prompt or not prompt.strip():
        raise ConfigError("the prompt is empty")
    jsonl = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else None  # noqa: SIM115 - closed below
    try:
        lm = _load(args.model, args)
        streamer = Streamer(lm, sinks=args.sinks, window=args.window)
        special = set(lm.tokenizer.all_special_ids)
        t0, n, last = _now(), 0, None
        for tok in streamer.stream(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                   seed=args.seed, stop_at_eos=not args.no_eos):
            n += 1
            if args.sinks_off_at is not None and tok.step + 1 == args.sinks_off_at:
                streamer.set_sinks(False)
            if args.sinks_on_at is not None and tok.step + 1 == args.sinks_on_at:
                streamer.set_sinks(True)
            if tok.token_id not in special:  # <bos>, <eos> ... are bookkeeping, not text
                sys.stdout.write(tok.text)
                sys.stdout.flush()
            if jsonl:
                jsonl.write(json.dumps(tok.to_dict()) + "\n")
            switched = last is not None and tok.sinks_enabled != last.sinks_enabled
            if n % args.status_every == 0 or switched or (tok.drift and not (last and last.drift)):
                _status(tok, n / max(_now() - t0, 1e-9))
            last = tok
        sys.stdout.write("\n")
        if last is not None:
            _status(last, n / max(_now() - t0, 1e-9))
    finally:
        if jsonl:
            jsonl.close()
    return 0


def cmd_eval_stream(args: argparse.Namespace) -> int:
    """Perplexity under eviction: write stream_eval.json and stream_eval.html, print the table."""
    from .prompts import read_prompt_file
    from .report import check_output_dir

    window = _windows(args)
    _check_stream_sizes(args.sinks, window, args.tokens)
    text = read_prompt_file(args.text_file) if args.text_file else None
    out = Path(args.out) if args.out else Path("sinkscope-reports") / _safe_name(args.model)
    out = check_output_dir(out)

    from .analysis import recommend_from_stream_eval
    from .report import write_stream_eval
    from .streaming.evaluate import prepare_stream_eval

    lm = _load(args.model, args, progress=not args.quiet)
    plan = prepare_stream_eval(lm, text, sinks=args.sinks, window=window, tokens=args.tokens,
                               modes=args.modes, exact_stream=args.exact_stream,
                               recompute_stride=args.recompute_stride)
    if plan.onepass_fallback and "streaming" in plan.modes:
        print(f"note: one pass can't serve {lm.spec.name} ({plan.onepass_fallback}); streaming it token by token "
              "(exact, slower)", file=sys.stderr)
    if len(plan.ids) < args.tokens:
        print(f"note: the text has {len(plan.ids)} tokens, fewer than --tokens {args.tokens}; streaming all of them",
              file=sys.stderr)
    ev = plan.run(progress=not args.quiet)
    rec = recommend_from_stream_eval(ev, args.tolerance) if "streaming" in plan.modes else None
    paths = write_stream_eval(ev, out, recommendation=rec)
    _print_stream_eval(ev.to_dict(include_nll=False))
    if rec is not None:
        print(f"recommended sinks: {rec.sinks}  ({rec.method})")
        _print_cheapest(rec)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def _print_cheapest(rec: object) -> None:
    ev = getattr(rec, "evidence", {})
    if "cheapest_cache" not in ev:
        return
    c = ev["cheapest_cache"]
    tol = ev.get("tolerance", 0.05)
    if c is None:
        print(f"cheapest cache within {tol:.0%} of dense: none of the grid")
    else:
        print(f"cheapest cache within {tol:.0%} of dense ({_fmt(c['dense_ppl'])}): {c['sinks']} sinks + window "
              f"{c['window']} = {c['cache_budget']} tokens, perplexity {_fmt(c['ppl'])}")


def _print_stream_eval(ev: dict) -> None:
    t = ev["targets"]
    windows = ev.get("windows") or [ev["window"]]
    win = f"windows {','.join(map(str, windows))}" if len(windows) > 1 else f"window {ev['window']}"
    settings = ev.get("settings") or {}
    print(f"{ev['model']['name']} · {ev['text']['name']}, {ev['tokens']} tokens · {win} · "
          f"{t['count']} scored tokens (positions {t['first']}..{t['last']}), the same in every mode · streaming "
          f"{settings.get('streaming', 'token by token')}")
    if settings.get("onepass_fallback"):
        print(f"  (token by token: one pass can't serve this model: {settings['onepass_fallback']})")
    stride = (ev.get("recompute_targets") or {}).get("stride", 1)
    sub = stride > 1
    grid = len(windows) > 1
    print(f"  {'mode':<10} {'sinks':>5}" + (f" {'window':>6}" if grid else "") + f" {'ppl':>9}"
          + (f" {'ppl on 1 in ' + str(stride):>14}" if sub else "") + f" {'tok/s':>8}  note")
    for r in ev["results"]:
        ppl = r.get("ppl")
        sub_ppl = r.get("ppl_on_recompute_targets")
        rate = r.get("tokens_per_s") or r.get("targets_per_s")
        notes = [n for n, on in (("beyond the trained context", r.get("beyond_context")),
                                 (f"{r.get('n_targets')} targets", r.get("mode") == "recompute" and sub)) if on]
        print(f"  {r['mode']:<10} {r.get('sinks', '-')!s:>5}" + (f" {r.get('window', '-')!s:>6}" if grid else "")
              + f" {_fmt(ppl):>9}" + (f" {_fmt(sub_ppl):>14}" if sub else "") + f" {_fmt(rate, 1):>8}  "
              f"{'; '.join(notes)}")


def _fmt(v: object, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _status(tok: TokenStats, rate: float) -> None:
    from .streaming.memory import format_bytes

    drift = "; ".join(tok.drift) if tok.drift else "none"
    print(f"\n[step {tok.step + 1} · cache {tok.cache_length} tok, {format_bytes(tok.cache_bytes)} · "
          f"{rate:.1f} tok/s · "
          f"sinks {'on' if tok.sinks_enabled else 'OFF'} · drift: {drift}]", file=sys.stderr, flush=True)


def _now() -> float:
    import time

    return time.perf_counter()


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Load the default model, then serve the dashboard until Ctrl-C."""
    import socket

    try:
        from dashboard import Limits, create_app, run
        from dashboard.serve import exposure_warning
    except ImportError as exc:
        raise ConfigError(f"the dashboard package is not importable ({exc}); install sinkscope from its "
                          "checkout (make setup)") from exc
    with socket.socket() as probe:  # say so now, not after a minute of model loading
        # As waitress binds: a port whose last server died (connections in TIME_WAIT) is free to reuse at once.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise ConfigError(f"can't listen on {args.host}:{args.port} ({exc.strerror}); pass another --port "
                              "or stop what uses it") from exc
    for d in args.reports or []:
        if not Path(d).expanduser().is_dir():
            raise ConfigError(f"--reports {d}: no such directory")
    names = list(dict.fromkeys(args.model or ["smollm2-135m"]))
    print(f"loading {names[0]} ...", file=sys.stderr, flush=True)
    first = _load(names[0], args)
    models: dict[str, LoadedModel | str] = {name: name for name in names}
    models[names[0]] = first
    app = create_app(models, limits=Limits(max_prompt_tokens=args.max_prompt_tokens,
                                           max_new_tokens=args.max_new_tokens,
                                           max_analysis_tokens=args.max_analysis_tokens,
                                           max_streams=args.max_streams),
                     loader=lambda source: _load(source, args, progress=False), reports=args.reports)
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.debug:
        print("note: --debug: Flask's development server with Dash's debug tools; not for sharing", file=sys.stderr)
    print(f"sinkscope dashboard on http://{args.host}:{args.port}/  (Ctrl-C to stop)", flush=True)
    run(app, host=args.host, port=args.port, debug=args.debug)
    print("sinkscope dashboard stopped: streams ended, background jobs finished", file=sys.stderr, flush=True)
    return 0


def _safe_name(source: str) -> str:
    stem = Path(source.rstrip("/")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem.removesuffix(".gguf"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; user mistakes become one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except SinkscopeError as exc:
        print(f"sinkscope: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nsinkscope: interrupted; no partial report was written", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    # transformers warns about things sinkscope handles itself (attention switches, generation defaults).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # its per-load bars are noise; sinkscope shows its own progress
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
