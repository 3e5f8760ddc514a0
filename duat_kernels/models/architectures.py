"""Where the attention pieces of each architecture live: one small table entry per family.

Paths are relative to one attention block (the module that returns (output, probabilities)):
`value` is the value projection (its input is x, after any pre-norm), `out_proj` the output
projection (its output is the attention output before the residual, biases included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Weights = tuple[torch.Tensor, torch.Tensor | None]  # (weight in nn.Linear convention, bias)


def linear(module: torch.nn.Module, _config) -> Weights:
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


def conv1d(module: torch.nn.Module, _config) -> Weights:
    """GPT-2's Conv1D stores weight as (in, out)."""
    return module.weight.detach().T, module.bias.detach()


def conv1d_packed_value(module: torch.nn.Module, config) -> Weights:
    """GPT-2's c_attn packs [query | key | value] along the output axis."""
    e = config.hidden_size
    return module.weight.detach()[:, 2 * e:3 * e].T, module.bias.detach()[2 * e:3 * e]


@dataclass(frozen=True)
class Architecture:
    attention: str  # regex of the attention block's module name; group 1 is the layer index
    value: str
    out_proj: str
    value_weights: Callable[..., Weights] = linear
    out_weights: Callable[..., Weights] = linear


_BERT = Architecture(r"(?:^|\.)layer\.(\d+)\.attention\.self$", "value", "../output.dense")
_LLAMA = Architecture(r"(?:^|\.)layers\.(\d+)\.self_attn$", "v_proj", "o_proj")
_GPT2 = Architecture(r"(?:^|\.)h\.(\d+)\.attn$", "c_attn", "c_proj", conv1d_packed_value, conv1d)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT, "roberta": _BERT,  # BERT-family encoders (MiniLM is a BERT)
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,  # Llama-family decoders with GQA (SmolLM2 is a Llama)
    "gpt2": _GPT2,
}


def resolve(root: torch.nn.Module, block_name: str, relative: str) -> torch.nn.Module:
    """The module at `relative` from the block: "../x" steps up one level, "a.b" steps down."""
    parts = block_name.split(".") if block_name else []
    for step in relative.split("/"):
        if step == "..":
            parts = parts[:-1]
        else:
            parts += step.split(".")
    return root.get_submodule(".".join(parts))
