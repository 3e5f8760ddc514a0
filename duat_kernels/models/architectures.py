"""Where the attention pieces of a model live: detected from the module shapes, or registered.

An attention block is the module that returns (output, probabilities). Paths are relative to it:
`value` is the value projection (its input is x, after any pre-norm), `out_proj` the output
projection (its output is the attention output before the residual, biases included); "../"
steps up to the block's parent. Families with separate value and output projections are found
from their module names (SHAPES); fused query/key/value projections need a declared split of
the value rows, so they are registered per model_type (ARCHITECTURES, `register_architecture`), as are
attention layers that read x tokens first, (N, B, M) (fairseq's layout: FSMT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Weights = tuple[torch.Tensor, torch.Tensor | None]  # (weight in nn.Linear convention (out, in), bias)


def linear(module: torch.nn.Module, _config) -> Weights:
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


def conv1d(module: torch.nn.Module, _config) -> Weights:
    """GPT-2's Conv1D stores weight as (in, out)."""
    return module.weight.detach().T, module.bias.detach()


def head_sizes(config) -> tuple[int, int, int]:
    """(h, h_kv, d) from a Hugging Face config."""
    h = config.num_attention_heads
    h_kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or h
    d = getattr(config, "head_dim", None) or config.hidden_size // h
    return h, h_kv, d


def _rows(module: torch.nn.Module, rows: torch.Tensor | slice, weight: torch.Tensor | None = None) -> Weights:
    weight = module.weight.detach() if weight is None else weight
    bias = None if module.bias is None else module.bias.detach()[rows]
    return weight[rows], bias


def conv1d_packed_value(module: torch.nn.Module, config) -> Weights:
    """GPT-2's c_attn packs [query | key | value] along the output axis (Conv1D: weight is (in, out))."""
    e = config.hidden_size
    return _rows(module, slice(2 * e, 3 * e), module.weight.detach().T)


def packed_value(module: torch.nn.Module, config) -> Weights:
    """[query (h·d) | key (h_kv·d) | value (h_kv·d)] along the output axis (Phi-3 qkv_proj, GPT-BigCode c_attn,
    MPT and ModernBERT Wqkv)."""
    h, h_kv, d = head_sizes(config)
    if getattr(config, "multi_query", False):  # GPT-BigCode: one key/value head
        h_kv = 1
    return _rows(module, slice(h * d + h_kv * d, h * d + 2 * h_kv * d))


def interleaved_value(module: torch.nn.Module, config) -> Weights:
    """Per head [query | key | value] (GPT-NeoX/Pythia, BLOOM, Falcon without multi-query):
    the output is viewed as (h, 3, d), so head j's value rows are (3j + 2)·d ... (3j + 3)·d."""
    h, _, d = head_sizes(config)
    rows = (torch.arange(h)[:, None] * 3 * d + 2 * d + torch.arange(d)[None, :]).reshape(-1)
    return _rows(module, rows)


def falcon_value(module: torch.nn.Module, config) -> Weights:
    """Falcon: grouped (new_decoder_architecture: per kv group [g queries | key | value]),
    multi-query ([h queries | key | value]) or per-head interleaved."""
    h, _, d = head_sizes(config)
    if config.new_decoder_architecture:
        h_kv = config.num_kv_heads
        per_group = h // h_kv + 2
        rows = (torch.arange(h_kv)[:, None] * per_group * d + (per_group - 1) * d + torch.arange(d)).reshape(-1)
        return _rows(module, rows)
    if config.multi_query:
        return _rows(module, slice((h + 1) * d, (h + 2) * d))
    return interleaved_value(module, config)


def codegen_value(module: torch.nn.Module, config) -> Weights:
    """CodeGen: the output is viewed as 4 chunks of [query | value | key], each e/4 wide (its mp_num = 4)."""
    chunk = config.hidden_size // 4
    rows = (torch.arange(4)[:, None] * 3 * chunk + chunk + torch.arange(chunk)).reshape(-1)
    return _rows(module, rows)


@dataclass(frozen=True)
class Architecture:
    value: str  # path of the value projection (or the fused query/key/value projection)
    out_proj: str  # path of the output projection
    value_weights: Callable[..., Weights] = linear  # (module, config) -> value rows (h_kv·d, M_in) and bias
    out_weights: Callable[..., Weights] = linear  # (module, config) -> (M_out, h·d) and bias
    tokens_first: bool = False  # x and the output are (N, B, M), fairseq's time-major layout (FSMT)


# Separate value and output projections: found by name in any model, whatever its model_type.
SHAPES: tuple[Architecture, ...] = (
    Architecture("v_proj", "o_proj"),  # Llama, Mistral, Qwen2/3, Gemma 1-3, OLMo 2, StarCoder2, ViT, ...
    Architecture("v_proj", "out_proj"),  # OPT, GPT-J, BART-style self-attention
    Architecture("v_proj", "dense"),  # Phi
    Architecture("v_lin", "out_lin"),  # DistilBERT
    Architecture("value", "../output.dense"),  # BERT, RoBERTa, ELECTRA, ViT (older), ...
    Architecture("value_proj", "../output.dense"),  # DeBERTa-v2
    Architecture("value", "dense"),  # ALBERT-style blocks that hold their output projection
    Architecture("v", "o"),  # T5, mT5, UMT5
)

# Fused query/key/value projections (the split of the value rows) and tokens-first layouts, declared per model_type.
ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture("c_attn", "c_proj", conv1d_packed_value, conv1d),
    "gpt_bigcode": Architecture("c_attn", "c_proj", packed_value),
    "phi3": Architecture("qkv_proj", "o_proj", packed_value),
    "gpt_neox": Architecture("query_key_value", "dense", interleaved_value),
    "bloom": Architecture("query_key_value", "dense", interleaved_value),
    "falcon": Architecture("query_key_value", "dense", falcon_value),
    "persimmon": Architecture("query_key_value", "dense", interleaved_value),
    "mpt": Architecture("Wqkv", "out_proj", packed_value),
    "codegen": Architecture("qkv_proj", "out_proj", codegen_value),
    "modernbert": Architecture("Wqkv", "Wo", packed_value),
    "fsmt": Architecture("v_proj", "out_proj", tokens_first=True),  # fairseq's (N, B, M) attention
}

# A is not N x N there; cross_attention: NLLB-MoE, SeamlessM4T, Dia, Perceiver
CROSS_ATTENTION_NAMES = ("encoder_attn", "crossattention", "cross_attn", "cross_attention", "encdecattention")


def is_cross_attention(name: str) -> bool:
    """True for a module at or inside a cross-attention module: BART's encoder_attn, T5's EncDecAttention, and the
    block of a BERT decoder's crossattention, crossattention.self (whose own name says nothing)."""
    return any(key in part.lower() for part in name.split(".") for key in CROSS_ATTENTION_NAMES)


def is_cross_attention_module(model: torch.nn.Module, name: str) -> bool:
    """True for module `name` of model under a cross-attention name (is_cross_attention) or being the multihead_attn
    of a torch.nn.TransformerDecoderLayer: its cross-attention over the memory (queries from the decoder, keys and
    values from the memory), whose name says nothing."""
    parent, _, attribute = name.rpartition(".")
    return is_cross_attention(name) or (attribute == "multihead_attn"
                                        and isinstance(model.get_submodule(parent), torch.nn.TransformerDecoderLayer))


def register_architecture(model_type: str, value: str, out_proj: str, value_weights: Callable[..., Weights] = linear,
                          out_weights: Callable[..., Weights] = linear, tokens_first: bool = False) -> Architecture:
    """Tell `attention_layers` where a family's value and output projections are.

    Args:
        model_type: the Hugging Face `config.model_type` this applies to.
        value: path of the value (or fused query/key/value) projection relative to the attention
            block, the module that returns (output, probabilities); "../" steps up one level.
        out_proj: path of the output projection relative to the block (e.g. "o_proj", "../output.dense").
        value_weights: (module, config) -> (weight (h_kv·d, M_in), bias (h_kv·d,) or None), the value
            rows in nn.Linear convention; e.g. `packed_value` or `interleaved_value` for fused layers.
        out_weights: (module, config) -> (weight (M_out, h·d), bias (M_out,) or None).
        tokens_first: True when the value projection reads x and the output projection gives the output as
            (N, B, M), tokens first (fairseq's time-major layout, as FSMT's); the capture makes them (B, N, M).

    Returns:
        The Architecture now used for every model with this model_type.
    """
    for name, arg in (("model_type", model_type), ("value", value), ("out_proj", out_proj)):
        if not isinstance(arg, str) or not arg:
            raise TypeError(f"{name} must be a non-empty str, got {arg!r}")
    for name, fn in (("value_weights", value_weights), ("out_weights", out_weights)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable (module, config) -> (weight, bias), got {fn!r}")
    if not isinstance(tokens_first, bool):
        raise TypeError(f"tokens_first must be a bool, got {tokens_first!r}")
    ARCHITECTURES[model_type] = Architecture(value, out_proj, value_weights, out_weights, tokens_first)
    return ARCHITECTURES[model_type]


def resolve(root: torch.nn.Module, block_name: str, relative: str) -> torch.nn.Module:
    """The module at `relative` from the block: "../x" steps up one level, "a.b" steps down."""
    parts = block_name.split(".") if block_name else []
    for step in relative.split("/"):
        if step == "..":
            parts = parts[:-1]
        else:
            parts += step.split(".")
    return root.get_submodule(".".join(parts))


def _weighted(root: torch.nn.Module, block_name: str, relative: str) -> bool:
    try:
        module = resolve(root, block_name, relative)
    except AttributeError:
        return False
    return isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def owning_config(root: torch.nn.Module, name: str):
    """The config of the innermost module on the path to `name` that has one (a sub-model's own config inside a
    composite model: the GPT-2 decoder of an EncoderDecoderModel), else root's (None if it has none)."""
    config, module = getattr(root, "config", None), root
    for part in name.split(".") if name else []:
        module = module._modules[part]
        own = getattr(module, "config", None)
        if isinstance(getattr(own, "model_type", None), str):
            config = own
    return config


def outermost_submodules(root: torch.nn.Module, keep) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module of root (root included, as "") for which keep(module) is true and that is
    inside no other such module, in module order."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in root.named_modules():
        if keep(module) and not any(outer == "" or name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return found


def find_blocks(model: torch.nn.Module, cross: bool = False) -> list[tuple[str, torch.nn.Module, Architecture]]:
    """Every self-attention block of a model with its Architecture, in module order; [] if none fits. Fused
    families are looked up by the model_type of the (sub-)model that holds the block. cross=True: the
    cross-attention blocks instead, with separate value and output projections only (a registered fused split
    describes the family's self-attention: GPT-2's cross-attention c_attn holds keys and values, not
    [query | key | value])."""
    blocks = []
    for name, module in model.named_modules():
        if is_cross_attention(name) != cross:
            continue
        model_type = getattr(owning_config(model, name), "model_type", None)
        registered = ARCHITECTURES.get(model_type)
        if cross and registered is not None and registered.value_weights is not linear:
            registered = None
        candidates = (registered,) if registered is not None else SHAPES
        arch = next((a for a in candidates if _weighted(model, name, a.value) and _weighted(model, name, a.out_proj)),
                    None)
        if arch is not None:
            blocks.append((name, module, arch))
    return blocks


def describe_attention_modules(model: torch.nn.Module, limit: int = 3) -> str:
    """A few attention-like modules and their children, for the error when no shape fits."""
    found = [f"{name or '<root>'} ({type(m).__name__}: {', '.join(n for n, _ in m.named_children()) or 'no children'})"
             for name, m in model.named_modules() if "att" in type(m).__name__.lower()]
    if not found:
        return "no module whose class name contains 'Attention'"
    return "; ".join(found[:limit]) + (f"; ... ({len(found)} in all)" if len(found) > limit else "")
