"""Capture q and k (after rotary embeddings) instead of A: `attention_layers(..., capture="qk")`.

The model runs with sdpa attention (no eager switch): for the duration of one forward pass the
"sdpa" entry of transformers' AttentionInterface is wrapped so that the selected layers record
the query and key states it receives, with the scaling, soft-cap and sliding window the layer
passes; the masks come from the layer (is_causal) and the inputs' key mask. The forward pass stops
right after the output projection of the last selected layer. `layer.operator()` then gives
HVOOperator.from_qk, which never stores A (h, N, N).

Models that sdpa cannot run (transformers' _supports_sdpa is False: Gemma 2, whose logit soft-capping
sdpa lacks) keep their own eager attention, recorded through the "eager" entry instead; their
forward pass forms one layer's A at a time, as the model itself does, and nothing keeps it. Layers that
read x tokens first (FSMT's fairseq attention) compute A in their own code and are refused.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from duat_kernels.forward_signature import named_inputs
from duat_kernels.heads import head_indices, select_heads
from duat_kernels.hvo_operator import HVOOperator
from duat_kernels.models.architectures import owning_config, resolve
from duat_kernels.models.capture import (AttentionLayer, _token_mask, attn_implementation,
                                         check_not_called_with_encoder_states, cross_attention_names,
                                         encoder_states_hook, select_layers)
from duat_kernels.models.encoder_decoder import check_cross_attention
from duat_kernels.models.shared_layers import ApplicationRecords, layer_plan


@dataclass
class QKAttentionLayer(AttentionLayer):
    """An attention layer captured as q (B, h, N, d), k (B, h_kv, N, d) and its masks; attn is None.
    A cross-attention layer (kind "cross", include_cross=True) has k (B, h_kv, N_k, d) of the N_k encoder tokens,
    key_mask (B, N_k) True at the real (unpadded) encoder tokens or None, and token_mask its decoder tokens."""

    q: torch.Tensor | None = field(default=None, repr=False)
    k: torch.Tensor | None = field(default=None, repr=False)
    causal: bool = False
    scale: float | None = None
    softcap: float | None = None
    sliding_window: int | None = None
    key_mask: torch.Tensor | None = field(default=None, repr=False)  # cross-attention: the encoder's real tokens

    @property
    def attended_keys(self) -> torch.Tensor | None:
        """(B, N_k) True at the keys the queries may attend (padding excluded), or None for all: the token mask of a
        self-attention layer, the encoder's key mask of a cross-attention layer."""
        return self.token_mask if self.kind == "self" else self.key_mask

    def __repr__(self) -> str:
        batch, heads, tokens, d = self.q.shape
        shared = "" if self.application is None else f", application={self.application}"
        shared += "" if self.kind == "self" else f", kind={self.kind!r}, keys={self.k.shape[-2]}"
        return (f"QKAttentionLayer(index={self.index}, name={self.name!r}{shared}, batch={batch}, tokens={tokens}, "
                f"heads={heads}, "
                f"kv_heads={self.num_kv_heads}, head_dim={d}, M_in={self.w_v.shape[1]}, M_out={self.w_o.shape[0]}, "
                f"causal={self.causal}, padded={self.token_mask is not None})")

    def operator(self, layout: str = "token", heads: int | list[int] | None = None) -> HVOOperator:
        """The matrix-free W' (with b') of this layer, or of the given heads only, A recomputed from q and
        k tile by tile."""
        q, k, w_v, w_o, b_v = self.q, self.k, self.w_v, self.w_o, self.b_v
        if heads is not None:  # each chosen query head with its own copy of its kv head, as select_heads does
            group = q.shape[-3] // k.shape[-3]
            kv = torch.tensor(head_indices(heads, q.shape[-3]), device=k.device) // group
            q, w_v, w_o, b_v, _ = select_heads(q, w_v, w_o, b_v, heads, k.shape[-3])
            k = k.index_select(-3, kv)
        return HVOOperator.from_qk(q, k, w_v, w_o, causal=self.causal, attention_mask=self.attended_keys,
                                   scale=self.scale, b_v=b_v, b_o=self.b_o, layout=layout, softcap=self.softcap,
                                   sliding_window=self.sliding_window)

    def attention(self) -> torch.Tensor:
        """A (B, h, N, N_k) (N_k = N but for cross-attention), computed (refused when it would not fit)."""
        return self.operator().attn

    def hvo_matrix(self, heads: int | list[int] | None = None, layout: str = "token", **kwargs) -> torch.Tensor:
        """Dense W' (B, N·M_out, N_k·M_in) in the layout, of the given heads only if any; kwargs (dtype=, backend=,
        ...) go to HVOOperator.to_dense."""
        return self.operator(layout, heads=heads).to_dense(**kwargs)

    def hvo_bias(self, layout: str = "token") -> torch.Tensor:
        return self.operator(layout).bias()


class _StopForward(Exception):
    """Raised after the last selected layer: the rest of the model is not run."""


class QkCaptureUnsupported(RuntimeError):
    """A layer that capture='qk' (HVOOperator.from_qk) cannot reproduce; capture='attn' can."""


def _runs_eager(model: torch.nn.Module) -> bool:
    """True for models whose attention sdpa cannot compute (transformers' _supports_sdpa is False:
    Gemma 2 and its kin, whose logit soft-capping sdpa lacks; GPT-OSS, whose attention sinks it lacks)."""
    return not getattr(model, "_supports_sdpa", True)


def _eager_function(module: torch.nn.Module):
    """The eager attention function of the module's own modeling file (soft-capping, sinks, ... included)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise QkCaptureUnsupported(f"{type(module).__name__} cannot run with sdpa and its module "
                                   f"{type(module).__module__} has no eager_attention_forward; capture='qk' cannot "
                                   "record it (use capture='attn')")
    return fn


@contextmanager
def _attention_recorder(model: torch.nn.Module, records: dict, cross: frozenset = frozenset()):
    """Run the model with sdpa attention (its own eager attention where sdpa cannot run it), recording
    q, k and options of the modules in `records` (by id: a function giving the record of the module's ongoing
    application, None when it is not selected); the modules in `cross` (by id) are cross-attention: not causal, their
    key mask read from the mask they pass (_key_padding)."""
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    target = "eager" if _runs_eager(model) else "sdpa"
    wrapped = mapping.get(target)  # "eager" is normally no entry: modules fall back to their own function

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        rec = records[id(module)]() if id(module) in records else None
        if rec is not None:
            if kwargs.get("s_aux") is not None:  # GPT-OSS: a sink logit per head takes part of each row's mass
                raise QkCaptureUnsupported(f"{type(module).__name__} has attention sinks (s_aux), which "
                                           "HVOOperator.from_qk does not model; use capture='attn'")
            bias = kwargs.get("position_bias")
            if isinstance(bias, torch.Tensor) and bool(bias.any()):  # T5: learned relative position bias
                raise QkCaptureUnsupported(f"{type(module).__name__} adds a position bias to the attention logits "
                                           "(position_bias), which HVOOperator.from_qk does not model; use "
                                           "capture='attn'")
            dropout = kwargs.get("dropout", args[0] if args else 0.0)
            if isinstance(dropout, (int, float)) and dropout > 0:  # training mode: A is dropped out at random
                raise QkCaptureUnsupported(f"{type(module).__name__} applies attention dropout (p={dropout}) in "
                                           "training mode, which HVOOperator.from_qk does not model; call "
                                           "model.eval(), or use capture='attn' (A as dropped out)")
            if target == "sdpa" and kwargs.get("softcap") is not None:
                raise QkCaptureUnsupported(f"{type(module).__name__} passes softcap={kwargs['softcap']} to sdpa, "
                                           "which has no soft-capping; capture='qk' cannot reproduce the layer (use "
                                           "capture='attn')")
            rec["q"], rec["k"] = query.detach(), key.detach()
            rec["scale"] = kwargs.get("scaling", args[1] if len(args) > 1 else None)
            rec["softcap"] = kwargs.get("softcap", args[2] if len(args) > 2 else None)
            rec["sliding_window"] = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
            if id(module) in cross:  # decoder queries over all the real encoder tokens
                rec["causal"] = False
                rec["key_mask"] = _key_padding(type(module).__name__, attention_mask, query.shape[0])
            else:
                is_causal = kwargs.get("is_causal")
                rec["causal"] = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal) \
                    or _masks_later_keys(attention_mask)
        if target == "eager":
            return (wrapped or _eager_function(module))(module, query, key, value, attention_mask, *args, **kwargs)
        return wrapped(module, query, key, value, attention_mask, *args, **kwargs)

    mapping[target] = recording
    try:
        with attn_implementation(model, target):
            yield
    finally:
        if wrapped is None:
            del mapping[target]
        else:
            mapping[target] = wrapped


def _masks_later_keys(mask) -> bool:
    """True when a 4-D mask (B, 1 or h, N_q, N_k; bool, True = attend, or additive) forbids every query the keys
    after it, in each row that allows some key but not all: a causal mask built by the model for a module
    whose is_causal is False (BigBirdPegasus's decoder, which runs eager: its causality is in the mask only).
    Rows that allow no key or every key (padding, or rows sdpa's mask unmasks) say nothing."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2] < 2:
        return False
    queries, keys = mask.shape[-2:]
    rows = max(1, (1 << 24) // max(1, mask.shape[0] * mask.shape[1] * keys))  # ~16 M entries at a time
    seen = False
    for start in range(0, queries, rows):  # row blocks: a long padded batch's mask is large already
        part = mask[..., start:start + rows, :]
        blocked = _blocked(part)
        later = torch.ones(part.shape[-2], keys, dtype=torch.bool, device=mask.device).triu(keys - queries + 1 + start)
        informative = blocked.any(-1, keepdim=True) & ~blocked.all(-1, keepdim=True)
        if not bool((blocked | ~later | ~informative).all()):
            return False
        seen = seen or bool(informative.any())
    return seen


def _blocked(mask: torch.Tensor) -> torch.Tensor:
    """True where a mask (bool, True = attend, or additive: -inf or the dtype's minimum) forbids the key."""
    return ~mask if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min / 2


def _key_padding(module_name: str, mask, batch: int) -> torch.Tensor | None:
    """The (B, N_k) key mask (True = attend) of a cross-attention layer, from the mask it passes its attention
    function: None (every key), or (B or 1, 1 or h, N_q, N_k). A mask that is not one key mask for every query and
    head of a sequence is refused: HVOOperator.from_qk takes a key mask only."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise QkCaptureUnsupported(f"{module_name}: cross-attention mask of {_shape(mask)} is not (B, 1, N_q, N_k); "
                                   "capture='qk' cannot read its key mask (use capture='attn')")
    blocked = _blocked(mask)
    if not bool((blocked == blocked[:, :1, :1]).all()):
        raise QkCaptureUnsupported(f"{module_name}: its cross-attention mask of shape {tuple(mask.shape)} forbids "
                                   "different keys to different queries or heads, which HVOOperator.from_qk (a key "
                                   "mask only) does not model; use capture='attn'")
    return (~blocked[:, 0, 0]).expand(batch, -1)


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"type {type(t).__name__}"


def attention_layers_qk(model: torch.nn.Module, blocks: list, *args, layers: list[int] | None = None,
                        **inputs) -> list[QKAttentionLayer]:
    """attention_layers(..., capture="qk"): the selected layers as q/k captures, in order (see the module doc).
    blocks: attention_blocks(model, include_cross); with include_cross also the cross-attention layers (kind "cross":
    q of the decoder, k and key_mask of the encoder), numbered after the self-attention layers as with
    capture="attn"."""
    if not blocks:
        raise ValueError(f"found no attention layers in {type(model).__name__}")
    if any(arch is None for _, _, arch in blocks) or not hasattr(model, "config"):
        raise ValueError("capture='qk' needs a Hugging Face model (transformers' attention functions); "
                         "modules built from torch.nn.MultiheadAttention give A: use capture='attn'")
    plan = layer_plan(model, blocks)
    selected = select_layers(layers, len(plan))
    _check_batch_first(model, [blocks[plan[a][0]] for a in selected])
    cross = cross_attention_names(model, blocks)
    named = named_inputs(model, args, inputs)
    for key in ("attention_mask", "decoder_attention_mask"):
        mask = named.get(key)
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"capture='qk' takes {key} as a (B, N) mask of the real tokens, got {shape}; "
                             "HVOOperator.from_qk cannot model another mask: use capture='attn'")
    applications = ApplicationRecords(blocks, plan, selected)
    handles = applications.count_hooks()  # first: the other hooks read the call count
    weights: dict[int, dict] = {}
    # per selected block: the record of its ongoing application (None when that application is not selected)
    currents = {i: (lambda i=i: applications.current(i)) for i in applications.selected_blocks()}
    # the pass stops once every selected layer has its output (cross-attention runs between the decoder's layers)
    done = (lambda: all("output" in rec for rec in applications.records.values()))
    for i, current in currents.items():
        name, module, arch = blocks[i]
        value, out_proj = resolve(model, name, arch.value), resolve(model, name, arch.out_proj)
        config = owning_config(model, name)
        (w_v, b_v), (w_o, b_o) = arch.value_weights(value, config), arch.out_weights(out_proj, config)
        weights[i] = dict(w_v=w_v, b_v=b_v, w_o=w_o, b_o=b_o)
        handles.append(value.register_forward_pre_hook(_store_input(current), with_kwargs=True))
        handles.append(module.register_forward_pre_hook(encoder_states_hook(current), with_kwargs=True))
        handles.append(out_proj.register_forward_hook(_store_output(current, done)))
    by_module = {id(blocks[i][1]): current for i, current in currents.items()}
    cross_ids = frozenset(id(module) for name, module, _ in blocks if name in cross)
    try:
        with _attention_recorder(model, by_module, cross_ids), torch.no_grad():
            model(*args, **inputs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    applications.check_calls()
    result = []
    for index, rec in applications.records.items():
        i, call = applications.application(index)
        if "q" not in rec or "output" not in rec:
            raise QkCaptureUnsupported(f"attention layer {index} ({blocks[i][0]}) was not called through "
                                       "transformers' attention functions; capture='qk' cannot record it (use "
                                       "capture='attn')")
        rec = {**weights[i], **rec}
        batch, heads, tokens, _ = rec["q"].shape  # the decoder of an encoder-decoder model has its own mask
        if blocks[i][0] in cross:  # A's shape (B, h, N_dec, N_enc) as a view of one element
            rec.pop("given_encoder_states", None)
            check_cross_attention(blocks[i][0], rec["q"].new_empty(()).expand(batch, heads, tokens, rec["k"].shape[-2]),
                                  rec["x"], rec["output"])
        else:
            check_not_called_with_encoder_states(blocks[i][0], rec)
        rec["num_heads"], rec["num_kv_heads"] = heads, rec["k"].shape[1]  # as the layer ran
        token_mask = _token_mask(model, blocks[i][0], batch, tokens, named, strict=True)
        result.append(QKAttentionLayer(index=index, name=blocks[i][0], attn=None, token_mask=token_mask,
                                       application=call, kind="cross" if blocks[i][0] in cross else "self", **rec))
    return result


def _check_batch_first(model: torch.nn.Module, blocks: list) -> None:
    """Refuse tokens-first layers (fairseq's (N, B, M) layout, FSMT's): they compute A in their own code, not
    through transformers' attention functions, which is where capture='qk' records q and k."""
    if names := [name for name, _, arch in blocks if arch.tokens_first]:
        raise QkCaptureUnsupported(f"capture='qk' cannot record {type(model).__name__}: its attention layers ("
                                   f"{names[0]}{', ...' if len(names) > 1 else ''}) read x tokens first (N, B, M: "
                                   "fairseq's layout) and compute A in their own code, not through transformers' "
                                   "attention functions, where capture='qk' records q and k; use capture='attn'")


def _store_input(current):
    def hook(_m, args, kwargs):
        if (rec := current()) is not None:
            rec["x"] = (args[0] if args else kwargs["input"]).detach()
    return hook


def _store_output(current, done):
    def hook(_m, _args, out):
        if (rec := current()) is not None:
            rec["output"] = out.detach()
        if done():
            raise _StopForward
    return hook
