"""`duat corpus`: every text of a JSON Lines file through a model, on a Dask cluster or here."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# W' x' + b' must reproduce each layer's float32 output to this relative error (as `duat inspect`).
TOLERANCE = 1e-5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="minilm (default), smollm2, or a local folder / .gguf file")
    parser.add_argument("--texts", required=True, metavar="FILE.jsonl",
                        help='one text per line: {"text": "...", "id": "..."} ("id" optional) or a JSON string')
    parser.add_argument("--out", required=True, metavar="DIR", help="results.parquet, summary.md and per-text parts")
    parser.add_argument("--layer", type=int, nargs="+", default=None, help="layer indices (default: all)")
    parser.add_argument("--grid", type=int, default=64,
                        help="block norms of all N x N blocks up to N = GRID tokens, else of a GRID x GRID grid "
                             "of super-blocks (default 64)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per text (default 1; parallelism comes from the workers)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler (tcp://host:8786)")
    where.add_argument("--workers", type=int, default=None,
                       help="start a local Dask cluster of K worker processes (default: one per CPU core)")
    where.add_argument("--sync", action="store_true", help="no Dask: analyse the texts one by one in this process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (texts, and transformers' "
                                                                   "while a model loads here or in --workers)")


@contextmanager
def dask_client(args):
    """None for --sync, else a Client of the given scheduler or of a new LocalCluster."""
    if args.sync:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ImportError("--scheduler and --workers need dask.distributed: pip install 'duat-kernels[dask]' "
                          "(or run with --sync)") from exc
    if args.scheduler:
        with Client(args.scheduler) as client:
            yield client
        return
    workers = args.workers or os.cpu_count() or 1
    # --no-progress: transformers' "Loading weights" bar of each worker (huggingface_hub's setting, read when
    # transformers is imported there); a --scheduler's workers write elsewhere and are left as they are
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"} if args.no_progress else {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=env) as cluster, Client(cluster) as client:
        yield client


def run(args) -> int:
    from duat_kernels.corpus.analysis import CorpusSettings
    from duat_kernels.corpus.runner import max_rel_error, read_texts, run_corpus, summary_table
    from duat_kernels._files import check_output_folder
    from duat_kernels._validation import check_threads
    from duat_kernels.models.zoo import transformers_progress_bars

    if args.workers is not None and args.workers < 1 or args.grid < 1 or args.threads < 1:
        raise ValueError(f"--workers, --grid and --threads must be positive, got "
                         f"{args.workers}, {args.grid}, {args.threads}")
    check_threads("--threads", args.threads)  # CorpusSettings' own check named it "threads", after the texts were read
    if not Path(args.texts).is_file():
        raise ValueError(f"--texts {args.texts}: no such file")
    check_output_folder("--out", args.out)  # before the Dask cluster starts
    # a user error (ValueError) is one line and exit status 2 (cli.main), as in the other commands
    texts = read_texts(args.texts)
    settings = CorpusSettings(model=args.model, layers=None if args.layer is None else tuple(args.layer),
                              grid=args.grid, threads=args.threads)
    with dask_client(args) as client, transformers_progress_bars(not args.no_progress):
        results, failures = run_corpus(texts, args.out, settings, client, progress=not args.no_progress)
    summary = summary_table(results, f"{args.model}: {len(texts)} texts")
    (Path(args.out) / "summary.md").write_text(summary + "\n")
    print(summary)
    print(f"\nresults written to {results} and {Path(args.out) / 'summary.md'}")
    for message in failures:
        print(f"FAILED: {message}", file=sys.stderr)
    worst = max_rel_error(results)
    if not worst <= TOLERANCE:
        print(f"FAILED: W' x' + b' differs from a layer's output by {worst:.2e} > {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 1 if failures else 0
