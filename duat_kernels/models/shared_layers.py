"""Attention blocks applied at several depths (ALBERT): one attention layer per application.

ALBERT holds num_hidden_groups groups of inner_group_num layers and runs them num_hidden_layers times
(group int(l / (num_hidden_layers / num_hidden_groups)) at depth l), so one module computes several
layers, each with its own input, A and output. The capture counts the calls of every block during the
forward pass and keeps each selected application as its own AttentionLayer (index = depth in the order
the model runs them, `application` = which call of the shared module). A block called more often than
its family says (weights shared in a model this module does not know) is refused: its layers cannot be
told apart before the pass, so `layers=[...]` could not select them.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from duat_kernels.models.architectures import owning_config

_ALBERT_BLOCK = re.compile(r"albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.")


def layer_plan(model: torch.nn.Module, blocks: list[tuple[str, torch.nn.Module, object]]) -> list[tuple[int, int]]:
    """(block index, application) of each attention layer, in the order the forward pass runs them: (i, 0) for each
    block i in module order, except for ALBERT, whose blocks are listed once per application (the depth order)."""
    plan: list[tuple[int, int]] = []
    expanded: set[str] = set()
    for i, (name, _, _) in enumerate(blocks):
        match = _ALBERT_BLOCK.search(name + ".")
        config = owning_config(model, name)
        if match is None or getattr(config, "model_type", None) != "albert":
            plan.append((i, 0))
            continue
        prefix = name[:match.start()]
        if prefix in expanded:
            continue
        expanded.add(prefix)
        by_position = {}
        for j, (other, _, _) in enumerate(blocks):
            found = _ALBERT_BLOCK.search(other + ".")
            if found is not None and other[:found.start()] == prefix:
                by_position[int(found.group(1)), int(found.group(2))] = j
        calls: Counter = Counter()
        depth, groups = config.num_hidden_layers, config.num_hidden_groups
        for layer in range(depth):
            group = int(layer / (depth / groups))  # as AlbertTransformer.forward picks the group
            for inner in range(config.inner_group_num):
                j = by_position[group, inner]
                plan.append((j, calls[j]))
                calls[j] += 1
    return plan


class ApplicationRecords:
    """During one forward pass: counts every block's calls, and gives the record (a dict) of the ongoing
    application of block i when that application is one of the selected layers."""

    def __init__(self, blocks: list, plan: list[tuple[int, int]], selected: list[int]):
        self.blocks, self.plan = blocks, plan
        self.calls = [0] * len(blocks)
        self.planned = Counter(i for i, _ in plan)
        self.records: dict[int, dict] = {a: {} for a in selected}  # by layer index
        self._layer_of = {plan[a]: a for a in selected}

    def count_hooks(self) -> list:
        """Forward pre-hooks counting every block's calls; register them before any other hook of the blocks."""
        def counter(i):
            def hook(_m, _args):
                self.calls[i] += 1
            return hook
        return [module.register_forward_pre_hook(counter(i)) for i, (_, module, _) in enumerate(self.blocks)]

    def selected_blocks(self) -> list[int]:
        return sorted({self.plan[a][0] for a in self.records})

    def current(self, i: int) -> dict | None:
        """The record of block i's ongoing (latest) application, None when it is not selected."""
        layer = self._layer_of.get((i, self.calls[i] - 1))
        return None if layer is None else self.records[layer]

    def is_last(self, i: int, layer: int) -> bool:
        """True while block i runs the application that is layer `layer`."""
        return self.plan[layer] == (i, self.calls[i] - 1)

    def check_calls(self) -> None:
        for i, (name, _, _) in enumerate(self.blocks):
            if self.calls[i] > self.planned[i]:
                raise ValueError(f"{name} was called more than once in one forward pass ({self.calls[i]} times; "
                                 "weights shared across layers): its layers cannot be told apart before the pass; "
                                 "this model is not supported (ALBERT is: each application is a layer)")

    def application(self, layer: int) -> tuple[int, int | None]:
        """(block index, which call of the block) of a layer; the call is None for a block that runs once."""
        i, j = self.plan[layer]
        return i, (j if self.planned[i] > 1 else None)
