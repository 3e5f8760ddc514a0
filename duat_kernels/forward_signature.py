"""What a model's forward takes, read from its signature (the capture's encoder-decoder pass and duat markov's
causality check both pass use_cache=False only to a forward that takes it), and a call's arguments by name."""

from __future__ import annotations

import inspect


def forward_takes(model, name: str) -> bool:
    """Whether model.forward has a parameter called `name` (a catch-all **kwargs does not count); False when the
    forward's signature cannot be read (a builtin)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def named_inputs(model, args: tuple, inputs: dict) -> dict:
    """The model's inputs by name, those passed positionally (model(ids, mask)) included; `inputs` alone when the
    arguments do not bind to the forward's signature (the call then fails by itself)."""
    if not args:
        return inputs
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **inputs)
    except (TypeError, ValueError):
        return inputs
    return {**bound.arguments, **inputs}
