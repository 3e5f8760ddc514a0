"""`duat claims --model minilm|smollm2|FOLDER [--text ...] --out DIR`: the paper's claims, measured."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from duat_kernels._files import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from duat_kernels.analysis.claims.run import SECTIONS

    parser.add_argument("--model", default="minilm", help="minilm (default), smollm2, or a local folder / .gguf file")
    parser.add_argument("--text", default=None, help="the passage (default: a built-in sentence)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="writes DIR/claims.md, DIR/claims.json and DIR/<section>.png; a rerun replaces them and deletes "
                             "the files an earlier duat claims run wrote there (listed in DIR/.duat-outputs.json) "
                             "that it does not write again; other files stay")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="which sections to measure (default: all)")
    parser.add_argument("--lora-rank", type=int, default=4, help="rank r of the LoRA adapters, 1 to the model width (default 4)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (density, dynamic, and "
                                                                   "transformers' while the model loads)")


def run(args) -> int:
    from duat_kernels.analysis.claims import lora, plots, report
    from duat_kernels.analysis.claims.layer_terms import family_of
    from duat_kernels.analysis.claims.multilayer import TOLERANCE
    from duat_kernels.analysis.claims.run import measure_all
    from duat_kernels.models import DEFAULT_TEXT, load
    from duat_kernels.models.zoo import transformers_progress_bars

    if args.lora_rank < 1:  # user errors are ValueErrors: one line, exit status 2 (cli.main)
        raise ValueError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.text is not None and not args.text.strip():
        raise ValueError("--text is empty; give some text, or leave --text out for the built-in sentence")
    check_output_folder("--out", args.out)
    with transformers_progress_bars(not args.no_progress):
        model, tokenizer = load(args.model)
        family_of(model)
        lora.check_rank("--lora-rank", args.lora_rank, model.config.hidden_size)  # the width of every supported family
        text = DEFAULT_TEXT if args.text is None else args.text
        results, facts = measure_all(model, tokenizer, text, args.sections, args.lora_rank,
                                     progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "model_type": model.config.model_type, "text": text, "command": _command(args), **facts}
    written = [] if args.no_plots else plots.write_all(out, results, facts["token_strings"], args.model)
    report.write(out, results, meta, written)
    print((out / "claims.md").read_text())
    print(f"written to {out}/ (claims.md, claims.json{'' if args.no_plots else ', PNGs'})")
    ml = results.get("multilayer")
    if ml is not None and not ml["held"]:
        print(f"FAILED: the multilayer reconstruction error {ml['max_relative_error']:.2e} exceeds {TOLERANCE:g}",
              file=sys.stderr)
        return 1
    return 0


def _command(args) -> str:
    """The command line that reproduces this report, each argument quoted for a POSIX shell (shlex)."""
    import shlex

    from duat_kernels.analysis.claims.run import SECTIONS

    words = ["duat", "claims", "--model", args.model]
    if args.text:
        words += ["--text", args.text]
    if list(args.sections) != list(SECTIONS):
        words += ["--sections", *args.sections]
    if args.lora_rank != 4:
        words += ["--lora-rank", str(args.lora_rank)]
    return shlex.join(words + ["--out", args.out])
