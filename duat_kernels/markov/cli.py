"""`duat markov`: a causal LM as a Markov chain on T^K states; π, spectral gap and mixing time per temperature."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from duat_kernels._files import check_output_folder
from duat_kernels._validation import check_threads
from duat_kernels.markov.chain import LanguageModelChain, check_temperature, temperature_label
from duat_kernels.markov.logits import check_context
from duat_kernels.markov.operator import state_count

RESIDUAL_WARNING = 1e-8  # ||πP − π||₁ above this is reported on stderr


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or a local causal-LM folder / .gguf file")
    parser.add_argument("--tokens", nargs="+", default=["0123456789"],
                        help="the symbols V: one argument = one symbol per character (default 0123456789), "
                             "several arguments = one symbol each; each must be a single token")
    parser.add_argument("--context", type=int, default=3, help="context length K: T^K states (default 3)")
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="temperatures τ (default 1)")
    parser.add_argument("--out", default="markov",
                        help="output folder (default ./markov); a rerun into it replaces the files an earlier duat "
                             "markov run wrote there (listed in OUT/.duat-outputs.json) and deletes those it does "
                             "not write again (other temperatures, PNGs); other files stay")
    parser.add_argument("--batch-size", type=int, default=100, help="contexts per forward pass, rounded down to a "
                                                                    "multiple of T, at least T (default 100)")
    parser.add_argument("--cache", default=None, help="logits cache folder (default OUT/cache); reruns and other "
                                                      "temperatures reuse it, an interrupted run resumes")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend the model's BOS token")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logits, temperatures, and "
                                                                   "transformers' while the model loads)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (default: torch's setting; 1 is faster on a busy machine)")


def _symbols(tokens: list[str]) -> list[str]:
    return list(tokens[0]) if len(tokens) == 1 else list(tokens)


def run(args: argparse.Namespace) -> int:
    from duat_kernels.markov import report
    from duat_kernels.models import load
    from duat_kernels.models.zoo import transformers_progress_bars

    try:
        check_context(args.context)
        for tau in args.temperature:
            check_temperature(tau)
        if len(set(args.temperature)) != len(args.temperature):  # the report keys results by temperature
            given = " ".join(temperature_label(t) for t in args.temperature)
            raise ValueError(f"--temperature lists a temperature twice: {given}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.threads is not None:
            torch.set_num_threads(check_threads("--threads", args.threads))
        symbols = _symbols(args.tokens)
        if len(symbols) < 2 or len(set(symbols)) != len(symbols):
            raise ValueError(f"--tokens must give at least 2 distinct symbols, got {symbols}")
        state_count(len(symbols), check_context(args.context))  # before the model loads
        if args.model == "minilm":  # the built-in encoder: known before loading it (and transformers' load report)
            raise ValueError("--model minilm is an encoder (all-MiniLM-L6-v2, BERT), not a causal language model: its "
                             "logits are no next-token distribution; use a decoder-only model such as smollm2")
        check_output_folder("--out", args.out)
        if args.cache is not None:  # --cache '' is refused as empty, as --out '' is (it was taken as OUT/cache)
            check_output_folder("--cache", args.cache)
        with transformers_progress_bars(not args.no_progress):
            model, tokenizer = load(args.model, causal_lm=True)
            out = Path(args.out)
            start = time.perf_counter()
            chain = LanguageModelChain.from_model(
                model, symbols, args.context, tokenizer=tokenizer, temperatures=args.temperature,
                bos_id=None if args.no_bos else "auto", batch_size=args.batch_size,
                cache_dir=Path(args.cache) if args.cache is not None else out / "cache", progress=not args.no_progress)
            logits_seconds = time.perf_counter() - start
            results = report.analyse(chain, progress=not args.no_progress)
            meta = dict(model=args.model, model_type=getattr(model.config, "model_type", None),
                        logits_seconds=logits_seconds)
            paths = report.write_report(chain, results, out, meta, plots=not args.no_plot)
    except ValueError as exc:
        print(f"duat markov: {exc}", file=sys.stderr)
        return 2
    print(report.format_table(results))
    for r in results:
        if not r["residual"] <= RESIDUAL_WARNING:
            tau = temperature_label(r["temperature"])
            print(f"duat markov: warning: at τ={tau} ||πP − π||₁ = {r['residual']:.1e} > "
                  f"{RESIDUAL_WARNING:g}", file=sys.stderr)
    print(f"\n{len(paths)} files written to {out}: {', '.join(p.name for p in paths)}")
    return 0
