"""Command line: `duat [inspect|demo|scale] [options]` (also `python -m duat_kernels`); inspect is the default."""

from __future__ import annotations

import argparse
import sys

import torch

from duat_kernels.demo import format_report, run_demo

# W' x' + b' must reproduce the modules in float32 to this relative error.
DEMO_TOLERANCE = 1e-5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duat", description="Materialise and analyse the DUAT operator W'_HVO.")
    sub = parser.add_subparsers(dest="command")
    insp = sub.add_parser("inspect", help="W' of every attention layer of a real model on a text (the default)")
    insp.add_argument("--model", default="minilm", help="minilm (default), smollm2, or a local folder / .gguf file")
    insp.add_argument("--text", default=None, help="input text (default: a built-in sentence)")
    insp.add_argument("--layer", type=int, nargs="+", default=None, help="layer indices (default: all)")
    insp.add_argument("--backend", default="auto", help="auto (default), cpp or reference")
    insp.add_argument("--save", metavar="FILE.safetensors", help="write W', b' and block norms of each layer")
    insp.add_argument("--plot", metavar="PNG", help="heatmaps of the N x N block norms, tokens on the axes")
    insp.add_argument("--long", action="store_true", help="capture q/k instead of A (long texts; also automatic "
                      "when A would not fit): norms on a grid, spectral norm, no dense W'")
    demo = sub.add_parser("demo", help="W' of a seeded random attention layer with every backend")
    demo.add_argument("--tokens", type=int, default=24, help="sequence length N (default 24)")
    demo.add_argument("--embed-dim", type=int, default=192, help="model width M (default 192)")
    demo.add_argument("--heads", type=int, default=6, help="number of heads h (default 6)")
    demo.add_argument("--layout", choices=["token", "feature"], default="token")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--repeats", type=int, default=3, help="timed repetitions, best one reported")
    demo.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    scale = sub.add_parser("scale", help="time and peak memory of the matrix-free analyses as N grows")
    scale.add_argument("--n", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384],
                       help="sequence lengths (default 64 256 1024 4096 16384)")
    scale.add_argument("--m", type=int, default=256, help="model width M (default 256)")
    scale.add_argument("--heads", type=int, default=4, help="heads h (default 4)")
    scale.add_argument("--spectral-max-n", type=int, default=None,
                       help="largest N for spectral_norm, which costs tens of matvecs (default: every N)")
    scale.add_argument("--plot", metavar="PNG", help="write a log-log plot of time against N")
    scale.add_argument("--seed", type=int, default=0)
    scale.add_argument("--from-qk", action="store_true",
                       help="recompute A from random causal q/k (never stored; block norms on a 256x256 grid)")
    return parser


def run_scale(args) -> int:
    from duat_kernels.analysis import scaling

    if any(n < 2 for n in args.n) or args.m < 1 or args.heads < 1 or args.m % args.heads:
        raise SystemExit("duat scale: need every --n >= 2, --m >= 1, --heads >= 1 and --m divisible by --heads")
    rows = scaling.scaling_sweep(sorted(args.n), args.m, args.heads, args.spectral_max_n, args.seed,
                                 from_qk=args.from_qk)
    print(scaling.format_table(rows, args.m, args.heads, from_qk=args.from_qk))
    if args.plot:
        scaling.plot(rows, args.plot, args.m, args.heads)
        print(f"plot written to {args.plot}")
    return 0


def run_inspect(args) -> int:
    from duat_kernels.models import DEFAULT_TEXT, load, long_context
    from duat_kernels.models import inspection

    if long_context.wants_long(args):  # issue 11 hook: q/k capture, A never stored
        return long_context.run_inspect_long(args)
    model, tokenizer = load(args.model)
    inputs = tokenizer([args.text or DEFAULT_TEXT], return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    reports = inspection.inspect_layers(model, dict(inputs), args.layer, args.backend, keep=bool(args.save))
    print(inspection.format_reports(reports, f"{args.model} ({model.config.model_type})", tokens))
    if args.save:
        inspection.save(reports, args.save, tokens)
        print(f"W', b' and block norms written to {args.save}")
    if args.plot:
        inspection.plot_block_norms(reports, args.plot, tokens, f"{args.model}: block norms of W'")
        print(f"heatmap written to {args.plot}")
    worst = max(r.rel_error for r in reports)
    if not worst <= DEMO_TOLERANCE:
        print(f"FAILED: W' x' + b' differs from a layer's output by {worst:.2e} > {DEMO_TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["inspect", *argv]
    args = build_parser().parse_args(argv)
    try:
        if args.command == "scale":
            return run_scale(args)
        if args.command == "inspect":
            return run_inspect(args)
    except (ImportError, FileNotFoundError) as exc:  # a missing optional dependency or model: say what to do
        print(f"duat {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.embed_dim % args.heads:
        raise SystemExit(f"duat demo: --embed-dim {args.embed_dim} must be divisible by --heads {args.heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, floor, shape = run_demo(args.tokens, args.embed_dim, args.heads, args.seed, args.layout, args.repeats)
    print(format_report(rows, floor, shape, args.tokens, args.embed_dim, args.heads, args.layout))
    failed = [r.backend for r in rows if not r.rel_err <= DEMO_TOLERANCE]
    if failed:
        print(f"FAILED: W' x' + b' differs from the module's output by more than {DEMO_TOLERANCE:g} "
              f"for {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"OK: every backend reproduces the module's output (relative error <= {DEMO_TOLERANCE:g}).")
    return 0
