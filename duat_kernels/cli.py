"""Command line: `duat [inspect|demo|scale|claims|corpus|markov] [options]` (also `python -m duat_kernels`); inspect is the default.

A user error (a bad option, a missing file, a size that does not fit) is one line on stderr and exit
status 2, never a traceback; DUAT_TRACEBACK=1 shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from duat_kernels._files import check_output_file, check_plot_format
from duat_kernels._validation import check_threads
from duat_kernels.analysis.claims import cli as claims_cli
from duat_kernels.corpus import cli as corpus_cli
from duat_kernels.demo import format_report, run_demo
from duat_kernels.markov import cli as markov_cli
from duat_kernels.models import inspect_cli

# W' x' + b' must reproduce the modules in float32 to this relative error.
DEMO_TOLERANCE = 1e-5

# Exceptions that are the user's to fix (bad values, files, memory); anything else is reported as
# an internal error, still in one line.
USER_ERRORS = (ValueError, TypeError, IndexError, OSError, ImportError, MemoryError, RuntimeError)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage block is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int_argument(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def thread_count(text: str) -> int:
    try:
        return check_threads("--threads", positive_int(text))
    except ValueError as exc:  # "--threads must be at most ..." after argparse's "argument --threads: "
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--threads ")) from None


def nonnegative_int(text: str) -> int:
    value = int_argument(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def seed_argument(text: str) -> int:
    value = nonnegative_int(text)
    if value >= 1 << 64:  # torch.manual_seed's range ("Overflow when unpacking long long")
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text}")
    return value


def int_argument(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from duat_kernels import __version__

    parser = OneLineParser(prog="duat", description="Materialise and analyse the DUAT operator W'_HVO.")
    parser.add_argument("--version", action="version", version=f"duat-kernels {__version__}")
    sub = parser.add_subparsers(dest="command")
    insp = sub.add_parser("inspect", help="W' of every attention layer of a real model on a text (the default)")
    inspect_cli.add_arguments(insp)
    insp.add_argument("--long", action="store_true", help="capture q/k instead of A (long texts; also automatic "
                      "past 1500 words): norms on a grid (--json, --plot, --html; --cross: N_dec x N_enc), spectral "
                      "norm, no dense W'")
    demo = sub.add_parser("demo", help="W' of a seeded random attention layer with every backend")
    demo.add_argument("--tokens", type=positive_int, default=24, help="sequence length N (default 24)")
    demo.add_argument("--embed-dim", type=positive_int, default=192, help="model width M (default 192)")
    demo.add_argument("--heads", type=positive_int, default=6, help="number of heads h (default 6)")
    demo.add_argument("--layout", choices=["token", "feature"], default="token")
    demo.add_argument("--seed", type=seed_argument, default=0)
    demo.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions, best one reported")
    demo.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: torch's setting)")
    scale = sub.add_parser("scale", help="time and peak memory of the matrix-free analyses as N grows")
    scale.add_argument("--n", type=positive_int, nargs="+", default=[64, 256, 1024, 4096, 16384],
                       help="sequence lengths, in any order, each measured once (default 64 256 1024 4096 16384)")
    scale.add_argument("--m", type=positive_int, default=256, help="model width M (default 256)")
    scale.add_argument("--heads", type=positive_int, default=4, help="heads h (default 4)")
    scale.add_argument("--spectral-max-n", type=nonnegative_int, default=None,
                       help="largest N for spectral_norm, which costs tens of matvecs (default: every N)")
    scale.add_argument("--plot", metavar="PNG", help="write a log-log plot of time against N")
    scale.add_argument("--seed", type=seed_argument, default=0)
    scale.add_argument("--from-qk", action="store_true",
                       help="recompute A from random causal q/k (never stored; block norms on a 256x256 grid)")
    claims_cli.add_arguments(sub.add_parser("claims", help="the DUAT paper's claims measured on a real model"))
    corpus_cli.add_arguments(sub.add_parser("corpus", help="W' analyses of many texts, on a Dask cluster or here"))
    markov_cli.add_arguments(sub.add_parser("markov", help="a causal LM as a Markov chain on T^K states: "
                                                           "stationary distribution and mixing per temperature"))
    return parser


def check_scale_args(args) -> None:
    if min(args.n) < 2:
        raise ValueError(f"every --n must be >= 2, got {min(args.n)}")
    if args.m % args.heads:
        raise ValueError(f"--m {args.m} must be divisible by --heads {args.heads}")
    if args.plot is not None:
        check_output_file("--plot", args.plot)
        check_plot_format("--plot", args.plot)
    from duat_kernels.analysis.scaling import sweep_bytes, sweep_memory_formula

    n, m, from_qk = max(args.n), args.m, bool(getattr(args, "from_qk", False))
    _check_memory(f"--n {n} --m {m} needs about {{needed}} of memory ({sweep_memory_formula(from_qk)}) but {{free}} "
                  "is available; use a smaller --n or --m", sweep_bytes(n, m, args.heads, from_qk))


def check_demo_args(args) -> None:
    if args.embed_dim % args.heads:
        raise ValueError(f"--embed-dim {args.embed_dim} must be divisible by --heads {args.heads}")
    # W' twice (the result and the out= buffer of the timing) plus the reference backend's Kronecker
    # products and running sum, all (N·M)² float32
    side = args.tokens * args.embed_dim
    _check_memory(f"--tokens {args.tokens} --embed-dim {args.embed_dim}: W' is {side} x {side} float32 and the demo "
                  "needs about {needed} but {free} is available; use smaller sizes (or duat scale for long sequences)",
                  5 * side * side * 4 + args.heads * args.tokens ** 2 * 4)


def _check_memory(message: str, needed: int) -> None:
    """A ValueError with message (its {needed} and {free} filled in) when needed bytes exceed free memory."""
    from duat_kernels._memory import available_memory, format_bytes

    free = available_memory(torch.device("cpu"))
    if needed > free:
        raise ValueError(message.format(needed=format_bytes(needed), free=format_bytes(free)))


def run_scale(args) -> int:
    from duat_kernels.analysis import scaling

    check_scale_args(args)
    rows = scaling.scaling_sweep(sorted(set(args.n)), args.m, args.heads, args.spectral_max_n, args.seed,
                                 from_qk=args.from_qk)
    print(scaling.format_table(rows, args.m, args.heads, from_qk=args.from_qk))
    if args.plot:
        scaling.plot(rows, args.plot, args.m, args.heads)
        print(f"plot written to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["inspect", *argv]
    args = build_parser().parse_args(argv)
    commands = {"scale": run_scale, "inspect": inspect_cli.run, "demo": run_demo_command, "claims": claims_cli.run,
                "corpus": corpus_cli.run, "markov": markov_cli.run}
    try:
        return commands[args.command](args)
    except Exception as exc:  # noqa: BLE001 (every error becomes one line; DUAT_TRACEBACK=1 for the traceback)
        if os.environ.get("DUAT_TRACEBACK") == "1":
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, USER_ERRORS):
            print(f"duat {args.command}: {message}", file=sys.stderr)
            return 2
        print(f"duat {args.command}: internal error: {type(exc).__name__}: {message} (DUAT_TRACEBACK=1 shows where; "
              "please report it)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"duat {args.command}: interrupted", file=sys.stderr)
        return 130


def run_demo_command(args) -> int:
    check_demo_args(args)
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
