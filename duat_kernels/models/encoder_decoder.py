"""Encoder-decoder models (T5, BART, mBART, Pegasus, Marian, FSMT, EncoderDecoderModel): the decoder's inputs when
none are given, and the cross-attention layers that W' does not cover.

Without decoder inputs the decoder reads the text itself, shifted right by the model's own function
(teacher forcing with the text as labels, what BART does by itself): decoder token 0 is the decoder
start token (T5, BART, ...) or the text's last real token (mBART's language code, FSMT's end of sentence:
their shift puts it first) and decoder token n is input token n - 1, so encoder and decoder layers both have
N tokens. A plain module holding such a model (a wrapper with no config of its own) gets the same, from the
arguments its forward passes on (decoder_inputs_inside).
Cross-attention multiplies values of the encoder's tokens by the decoder's queries: its A is
N_dec x N_enc, and W' = Σ_i A_i ⊗ OV_i is an N_dec x N_enc grid of blocks, (N_dec·M_out) x (N_enc·M_in), whose
x' is the encoder states the value projection reads. Those layers are named by `cross_attention_blocks` and
captured only when asked (attention_layers(include_cross=True), `duat inspect --cross`): by default they are
left out, so that the layer lists and indices of the self-attention layers are what they always were.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from duat_kernels.forward_signature import forward_takes, named_inputs
from duat_kernels.models.architectures import (SHAPES, _weighted, find_blocks, is_cross_attention,
                                               outermost_submodules)
from duat_kernels.models.token_labels import (encodes_targets_apart, input_tokens, target_reading_note,
                                              target_tokens)


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def wrapped_encoder_decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The encoder-decoder model inside a plain module with no config of its own (a wrapper): its one outermost
    sub-module whose config says is_encoder_decoder; None for a model with a config, or with no such sub-module,
    or with several."""
    if getattr(model, "config", None) is not None:
        return None
    found = outermost_submodules(model, is_encoder_decoder)
    return found[0][1] if len(found) == 1 else None


def holds_encoder_decoder(model: torch.nn.Module) -> bool:
    """Whether model is an encoder-decoder model or a plain module wrapping one (wrapped_encoder_decoder)."""
    return is_encoder_decoder(model) or wrapped_encoder_decoder(model) is not None


def cross_attention_blocks(model: torch.nn.Module) -> list[str]:
    """Names of the cross-attention blocks that the capture leaves out, in the model's order: those with value and
    output projections found by SHAPES, outermost first, then any other module under a cross-attention name whose
    class name says Attention, neither inside nor around one of those (GPT-2's crossattention, fused c_attn and
    q_attn); [] for a model without any."""
    found = []
    for name, _ in model.named_modules():
        if not is_cross_attention(name) or any(name.startswith(outer + ".") for outer in found):
            continue
        if any(_weighted(model, name, a.value) and _weighted(model, name, a.out_proj) for a in SHAPES):
            found.append(name)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for name, module in model.named_modules():
        if is_cross_attention(name) and "attention" in type(module).__name__.lower() and not _nested(name, found):
            found.append(name)
    return sorted(found, key=order.__getitem__)


def cross_attention_note(skipped: list[str], unreadable: list[str] = ()) -> str:
    """The line(s) duat inspect prints under its table about the cross-attention layers it left out: skipped, of which
    unreadable are those that --cross cannot read either (capture.unread_cross_attention: GPT-2's)."""
    lines = []
    if readable := [name for name in skipped if name not in unreadable]:
        lines.append(f"cross-attention layers not inspected ({len(readable)}: {', '.join(readable)}): their A is "
                     "N_dec x N_enc over the encoder's tokens; inspect them with --cross.")
    if unread := [name for name in skipped if name in unreadable]:
        lines.append(f"cross-attention layers not inspected ({len(unread)}: {', '.join(unread)}): no separate value "
                     "and output projections found (GPT-2's c_attn computes keys and values in one projection).")
    return "\n".join(lines)


def check_cross_attention(name: str, attn: torch.Tensor, x: torch.Tensor, output: torch.Tensor) -> None:
    """A captured cross-attention layer must have A (B, h, N_dec, N_enc) over the N_enc tokens x (B, N_enc, M_in)
    that its value projection read, for the N_dec outputs (B, N_dec, M_out): then W' x' + b' is the layer's output.
    Anything else (extra keys, a cache of keys whose x was not in this pass) is refused, naming the shapes."""
    if x.dim() != 3 or output.dim() != 3 or attn.shape[0] != x.shape[0] or attn.shape[-1] != x.shape[-2] \
            or attn.shape[-2] != output.shape[-2]:
        raise ValueError(f"{name}: cross-attention probabilities of shape {tuple(attn.shape)} are not "
                         f"(B, h, N_dec, N_enc) over the encoder states of shape {tuple(x.shape)} (B, N_enc, M) that "
                         f"its value projection read, for outputs of shape {tuple(output.shape)} (B, N_dec, M); "
                         "leave this layer out with layers=[...] or include_cross=False")


def uncovered_attention_modules(model: torch.nn.Module) -> list[str]:
    """Names (outermost first) of the self-attention modules of an encoder-decoder model that the capture cannot
    read: modules whose class name says Attention, neither inside nor around a captured block or a cross-attention
    block (LED's Longformer encoder attention, BigBirdPegasus's encoder attention: their value and output
    projections are in other places); [] for other models."""
    if not holds_encoder_decoder(model):
        return []
    known = [name for name, _, _ in find_blocks(model)] + cross_attention_blocks(model)
    found: list[str] = []
    for name, module in model.named_modules():
        if "attention" not in type(module).__name__.lower() or any(name.startswith(f + ".") for f in found):
            continue
        if not _nested(name, known):
            found.append(name)
    return found


def _nested(name: str, others: list[str]) -> bool:
    """Whether module `name` is one of `others`, inside one, or around one."""
    return any(name == o or name.startswith(o + ".") or o.startswith(name + ".") for o in others)


def uncovered_note(uncovered: list[str]) -> str:
    """The line duat inspect prints about the self-attention modules it cannot read."""
    return (f"self-attention modules not inspected ({len(uncovered)}: {', '.join(uncovered)}): no value and output "
            "projections found where this package looks for them (register the family's with "
            "duat_kernels.models.register_architecture).")


def _shift_function(model: torch.nn.Module) -> Callable | None:
    """The shift_tokens_right of the model's own module (BART, mBART, Pegasus, Marian, FSMT, EncoderDecoderModel);
    None when it has none."""
    return getattr(sys.modules.get(type(model).__module__), "shift_tokens_right", None)


def shifted_decoder_ids(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """decoder_input_ids (B, N) = input_ids (B, N) shifted right by the model's own function (T5's _shift_right,
    the shift_tokens_right of BART, mBART, Pegasus, Marian, FSMT, EncoderDecoderModel), as for labels = input_ids."""
    if callable(getattr(model, "_shift_right", None)):
        return model._shift_right(input_ids)
    shift = _shift_function(model)
    if shift is None:
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model without a shift_tokens_right of its "
                         "own: pass decoder_input_ids (B, N_dec) for its decoder")
    config = model.config
    values = dict(input_ids=input_ids, pad_token_id=config.pad_token_id,
                  decoder_start_token_id=getattr(config, "decoder_start_token_id", None))
    params = inspect.signature(shift).parameters
    missing = [key for key in params if key in values and values[key] is None]
    if missing:
        raise ValueError(f"{type(model).__name__} has no {' or '.join(missing)} in its config, which the decoder "
                         f"inputs (the text shifted right) need: set model.config.{missing[0]}, or pass "
                         "decoder_input_ids (B, N_dec)")
    return shift(**{key: values[key] for key in params if key in values})


def shift_starts_with_start_token(model: torch.nn.Module) -> bool:
    """Whether the model's shift writes its decoder start token at position 0 (T5's _shift_right, BART's,
    Pegasus's, Marian's, EncoderDecoderModel's shift_tokens_right), rather than moving the text's last real token
    there (mBART's and FSMT's shift_tokens_right, which take no decoder_start_token_id)."""
    if callable(getattr(model, "_shift_right", None)):
        return True
    shift = _shift_function(model)
    return shift is not None and "decoder_start_token_id" in inspect.signature(shift).parameters


def decoder_inputs_note(model: torch.nn.Module, tokenizer, input_ids: torch.Tensor,
                        target_ids: torch.Tensor | None = None) -> str | None:
    """The line duat inspect prints about what the decoder layers of an encoder-decoder model read (None for other
    models): the text input_ids (B, N) shifted right when given no decoder inputs, or, given target_ids (B, N_dec)
    (target_decoder_ids: a target text shifted right), the target; naming decoder token 0 of the first sequence as
    the decoder input ids hold it, and saying where it comes from (the decoder start token, or the last real token
    that mBART's and FSMT's shift puts first)."""
    if not is_encoder_decoder(model):
        return None
    what = "the text" if target_ids is None else "the target"
    shifted = shifted_decoder_ids(model, input_ids)[0] if target_ids is None else target_ids[0]
    token = repr(decoder_tokens(model, tokenizer, input_ids, target_ids)[0])
    first = f"the decoder start token {token}" if shift_starts_with_start_token(model) else \
        f"{token}, {what}'s last token, which {type(model).__name__}'s shift puts first instead of a start token"
    note = (f"encoder-decoder model: the decoder layers read {what} shifted right (decoder token 0 is {first}; "
            f"token n {what}'s token n-1: teacher forcing with {what} as labels).")
    if target_ids is not None and encodes_targets_apart(tokenizer):  # ids and labels of the target vocabulary
        return note
    target = target_reading_note(type(model).__name__, tokenizer, shifted)  # FSMT: source ids, target embedding
    return note if target is None else f"{note} {target}"


def target_decoder_ids(model: torch.nn.Module, tokenizer, target: str) -> torch.Tensor:
    """decoder_input_ids (1, N_dec) of an encoder-decoder model for the target text (teacher forcing): the target
    encoded as labels (tokenizer(text_target=...): its target side) and shifted right by the model's
    prepare_decoder_input_ids_from_labels, else by its own shift function (shifted_decoder_ids)."""
    labels = tokenizer(text_target=[target], return_tensors="pt")["input_ids"]
    if labels.shape[1] == 0:
        raise ValueError(f"the target {target!r} has no tokens: give a target text the tokenizer encodes")
    from_labels = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(from_labels):
        return from_labels(labels=labels.clone())  # FSMT's shift writes into its argument
    return shifted_decoder_ids(model, labels)


# inputs the decoder's own inputs come from: labels are shifted right into decoder_input_ids by the model itself
# (T5ForConditionalGeneration, BartForConditionalGeneration, EncoderDecoderModel, ...; for FSMT, whose decoder
# reads the input ids shifted whatever the labels, the capture shifts them: see with_decoder_inputs)
DECODER_SOURCES = ("decoder_input_ids", "decoder_inputs_embeds", "labels")


def decoder_tokens(model: torch.nn.Module, tokenizer, input_ids: torch.Tensor,
                   target_ids: torch.Tensor | None = None) -> list[str] | None:
    """The tokens (strings) the decoder of an encoder-decoder model reads (None for other models): given
    target_ids (B, N_dec) (target_decoder_ids), those of their first sequence, named from the vocabulary that
    encoded the target (token_labels.target_tokens); else, given no decoder inputs, those of the first sequence of
    input_ids (B, N) shifted right (decoder token 0: the start token, or the text's last real token for mBART and
    FSMT), named as the text's tokens (token_labels.input_tokens: FSMT's decoder looks these source-vocabulary ids
    up in its target embedding, which decoder_inputs_note says)."""
    if not is_encoder_decoder(model):
        return None
    if target_ids is not None:
        return target_tokens(tokenizer, target_ids[0])
    return input_tokens(tokenizer, shifted_decoder_ids(model, input_ids)[0])


def with_decoder_inputs(model: torch.nn.Module, named: dict, inputs: dict) -> dict:
    """inputs plus decoder_input_ids (the input ids shifted right) and, with an attention_mask (B, N),
    decoder_attention_mask (the mask shifted the same way, decoder token 0 real) when the model is an
    encoder-decoder model and `named` (all its inputs by name) has no decoder inputs (nor labels: then
    decoder_input_ids = the labels shifted by the model's prepare_decoder_input_ids_from_labels, what the models do
    themselves except FSMT, whose decoder read the input ids); and use_cache=False for such a model (see
    without_cache); other models' inputs unchanged.
    Such a model given no input_ids either (Whisper's input_features, inputs_embeds) is a ValueError: pass
    decoder_input_ids."""
    if not is_encoder_decoder(model):
        return inputs
    inputs = without_cache(model, named, inputs)
    labels, from_labels = named.get("labels"), getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if all(named.get(k) is None for k in DECODER_SOURCES[:2]) and labels is not None and callable(from_labels):
        return {**inputs, "decoder_input_ids": from_labels(labels=labels.clone())}  # FSMT's shift writes into it
    if any(named.get(k) is not None for k in DECODER_SOURCES):
        return inputs
    ids = named.get("input_ids")
    if ids is None:  # Whisper's input_features, inputs_embeds: no text to shift; the models' own errors misled
        given = ", ".join(sorted(k for k, t in named.items() if isinstance(t, torch.Tensor))) or "no tensors"
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model given no input_ids to shift right into "
                         f"its decoder's inputs (got {given}): pass decoder_input_ids (B, N_dec) for its decoder")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        return inputs  # the model's own error (empty input: refused by the capture)
    added = {"decoder_input_ids": shifted_decoder_ids(model, ids)}
    mask = named.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape and named.get("decoder_attention_mask") is None:
        added["decoder_attention_mask"] = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return {**inputs, **added}


def without_cache(model: torch.nn.Module, named: dict, inputs: dict) -> dict:
    """inputs plus use_cache=False when the model's forward takes use_cache and `named` (all its inputs by name)
    does not set it: the capture runs one whole teacher-forced pass, which reads no cache, and FSMT's decoder
    applies its causal and padding masks only without one (given decoder_input_ids and use_cache, its config's
    default, every decoder token attends to every other)."""
    takes = forward_takes(model, "use_cache")
    return {**inputs, "use_cache": False} if takes and named.get("use_cache") is None else inputs


@contextmanager
def decoder_inputs_inside(model: torch.nn.Module) -> Iterator[dict]:
    """For a plain module holding an encoder-decoder model (wrapped_encoder_decoder): while active, each call of
    that inner model gets what with_decoder_inputs gives the model itself (decoder_input_ids = its input_ids
    shifted right, decoder_attention_mask, use_cache=False), from the arguments the wrapper's forward actually
    passes it, under whatever names the wrapper takes them; the dict yielded then holds the inner model's inputs by
    name, additions included (for the layers' token masks). Yields an empty dict, and changes nothing, for other
    models. An inner model given no input_ids and no decoder inputs is a ValueError naming the wrapper."""
    inner, seen = wrapped_encoder_decoder(model), {}
    if inner is None:
        yield seen
        return

    def add_decoder_inputs(_module, args, kwargs):
        named = named_inputs(inner, args, kwargs)
        positional = named.keys() - kwargs.keys()
        try:
            added = with_decoder_inputs(inner, named, {})
        except ValueError as exc:
            raise ValueError(f"{exc}; {type(inner).__name__} is inside {type(model).__name__}: give them to "
                             f"{type(model).__name__}, whose forward must pass them on as decoder_input_ids") from None
        seen.clear()
        seen.update(named, **added)
        if not added:
            return None
        if any(key in positional for key in added):  # a decoder input given positionally as None
            return (), {**named, **added}
        return args, {**kwargs, **added}

    handle = inner.register_forward_pre_hook(add_decoder_inputs, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
