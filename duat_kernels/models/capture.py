"""Capture every selected attention layer of a model in one forward pass, with hooks.

Each layer gives A (the probabilities that multiply the values), the value and output weights and
biases, x (what the value projection reads) and the module's own attention output, so that
W' x' + b' can be checked against the model itself.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from duat_kernels._validation import check_flag, check_layout, check_not_given, integer
from duat_kernels.forward_signature import named_inputs
from duat_kernels.hvo import hvo_bias, hvo_matrix
from duat_kernels.hvo_operator import HVOOperator
from duat_kernels.models.architectures import (ARCHITECTURES, SHAPES, Architecture, describe_attention_modules,
                                               is_cross_attention_module,
                                               find_blocks, outermost_submodules, owning_config, resolve)
from duat_kernels.models.encoder_decoder import (_nested, check_cross_attention, cross_attention_blocks,
                                                 decoder_inputs_inside, holds_encoder_decoder,
                                                 uncovered_attention_modules, with_decoder_inputs)
from duat_kernels.models.shared_layers import ApplicationRecords, layer_plan


@dataclass
class AttentionLayer:
    """One attention layer on given inputs. Shapes: attn (B, h, N, N); x (B, N, M_in);
    output (B, N, M_out); w_v (h_kv·d, M_in), w_o (M_out, h·d); token_mask (B, N) or None (the query tokens).
    A cross-attention layer (kind "cross", attention_layers(include_cross=True)) has attn (B, h, N, N_k) of the
    N decoder tokens over the N_k encoder tokens, and x (B, N_k, M_in) the encoder states its value projection
    reads: W' is (N·M_out, N_k·M_in)."""

    index: int
    name: str
    attn: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    b_v: torch.Tensor | None
    b_o: torch.Tensor | None
    num_kv_heads: int
    num_heads: int  # h, from the module's configuration: checked against attn's head axis
    x: torch.Tensor
    output: torch.Tensor
    token_mask: torch.Tensor | None = field(default=None, repr=False)  # True where a real (unpadded) token
    application: int | None = None  # which call of a module shared across depth (ALBERT), else None
    kind: str = "self"  # "self", or "cross": the decoder's attention over the encoder's states

    def __repr__(self) -> str:
        batch, heads, tokens, keys = self.attn.shape
        shared = "" if self.application is None else f", application={self.application}"
        shared += "" if self.kind == "self" else f", kind={self.kind!r}, keys={keys}"
        return (f"AttentionLayer(index={self.index}, name={self.name!r}{shared}, batch={batch}, tokens={tokens}, "
                f"heads={heads}, kv_heads={self.num_kv_heads}, head_dim={self.w_o.shape[1] // heads}, M_in={self.w_v.shape[1]}, "
                f"M_out={self.w_o.shape[0]}, biases={'b_v' if self.b_v is not None else ''}"
                f"{'+' if self.b_v is not None and self.b_o is not None else ''}{'b_o' if self.b_o is not None else ''}"
                f"{'none' if self.b_v is None and self.b_o is None else ''}, padded={self.token_mask is not None})")

    def operator(self, layout: str = "token", heads: int | list[int] | None = None) -> HVOOperator:
        """The matrix-free W' (with b') of this layer, or of the given heads only."""
        return HVOOperator(self.attn, self.w_v, self.w_o, num_kv_heads=self.num_kv_heads, b_v=self.b_v, b_o=self.b_o,
                           layout=layout, num_heads=self.num_heads, heads=heads)

    def hvo_matrix(self, **kwargs) -> torch.Tensor:
        """Dense W' (B, N·M_out, N_k·M_in) (N_k = N but for cross-attention); kwargs (heads=, dtype=, backend=,
        ...) go to duat_kernels.hvo_matrix."""
        check_not_given("AttentionLayer.hvo_matrix", kwargs, num_kv_heads=self.num_kv_heads, num_heads=self.num_heads)
        return hvo_matrix(self.attn, self.w_v, self.w_o, num_kv_heads=self.num_kv_heads, num_heads=self.num_heads,
                          **kwargs)

    def hvo_bias(self, layout: str = "token") -> torch.Tensor:
        return hvo_bias(self.attn, self.w_o, self.b_v, self.b_o, num_kv_heads=self.num_kv_heads, layout=layout,
                        num_heads=self.num_heads)

    def reconstruct(self, w: torch.Tensor | None = None, layout: str = "token") -> torch.Tensor:
        """W' x' + b' as (B, N, M_out): with the given dense W' of this layout, else matrix-free."""
        check_layout(layout)
        (batch, tokens, m_out), (keys, m_in) = self.output.shape, self.x.shape[-2:]
        x = (self.x if layout == "token" else self.x.transpose(1, 2)).reshape(batch, -1)  # x' in the layout's order
        if w is None:
            flat = self.operator(layout).matvec(x)
        else:
            expected = (batch, tokens * m_out, keys * m_in)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != expected:
                got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                cols = "N·M_in" if keys == tokens else "N_k·M_in"
                raise ValueError(f"w must be this layer's dense {layout}-layout W' of shape (B, N·M_out, {cols}) = "
                                 f"{expected} (layer.hvo_matrix()), got {got}")
            flat = torch.einsum("brc,bc->br", w, x.to(w.dtype))
        flat = flat + self.hvo_bias(layout).to(flat.dtype)
        return flat.reshape(batch, tokens, m_out) if layout == "token" else \
            flat.reshape(batch, m_out, tokens).transpose(1, 2)

    def relative_error(self, w: torch.Tensor | None = None, layout: str = "token") -> float:
        """||W' x' + b' - output|| / ||output|| over the real (unpadded) query tokens; w (optional) is the dense
        W' in the given layout."""
        return masked_relative_error(self.reconstruct(w, layout), self.output, self.token_mask)


def masked_relative_error(actual: torch.Tensor, expected: torch.Tensor, token_mask: torch.Tensor | None) -> float:
    """||actual - expected|| / ||expected|| in float64 over the real query tokens: actual, expected (B, N, M);
    token_mask (B, N) True at real tokens, or None for all."""
    diff = actual.double() - expected.double()
    ref = expected.double()
    if token_mask is not None:
        diff, ref = diff[token_mask], ref[token_mask]
        if not bool(token_mask.any()):  # 0 / 0 was NaN
            raise ValueError("relative_error: every query token of this batch is padding (token_mask is all "
                             "False), so there is no output to compare")
    error, size = diff.norm(), ref.norm()
    if error == 0 and size == 0:  # an output of exact zeros (every token a zero embedding), reproduced exactly
        return 0.0
    return (error / size).item()


def attention_blocks(model: torch.nn.Module,
                     include_cross: bool = False) -> list[tuple[str, torch.nn.Module, Architecture | None]]:
    """(name, block, Architecture) of every self-attention layer in module order; Architecture is None
    for torch.nn.MultiheadAttention. Cross-attention blocks are left out (encoder_decoder.cross_attention_blocks),
    or with include_cross=True listed after all of them, in module order (those with separate value and output
    projections: find_blocks(cross=True); the nn.MultiheadAttention of a cross-attention: is_cross_attention_module).
    Raises ValueError naming what was found when nothing fits."""
    blocks = find_blocks(model)
    if blocks:
        return blocks + (find_blocks(model, cross=True) if include_cross else [])
    mha = [(name, m, None) for name, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    blocks = [block for block in mha if not is_cross_attention_module(model, block[0])]
    cross = [block for block in mha if is_cross_attention_module(model, block[0])]
    if blocks:
        return blocks + (cross if include_cross else [])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    shapes = ", ".join(f"{a.value}+{a.out_proj}" for a in SHAPES)
    raise ValueError(
        f"no adapter for model_type={model_type!r} ({type(model).__name__}): "
        f"found {describe_attention_modules(model)}. "
        f"Supported: value/output projections named {shapes}; fused query/key/value for "
        f"{', '.join(sorted(ARCHITECTURES))}; torch.nn.MultiheadAttention. Add one with "
        "duat_kernels.models.register_architecture(model_type, value=..., out_proj=..., value_weights=...)")


@contextmanager
def eager_attention(model: torch.nn.Module, switch: bool):
    """Make the model return attention probabilities (eager attention) for the duration."""
    configs = _outer_configs(model)
    others = sorted({impl for _, impl in _implementations(model) if impl != "eager"})
    if not others:
        with _output_attentions(configs):
            yield
        return
    if not switch:
        raise RuntimeError(f"the model uses attn_implementation={others[0]!r}, which does not return attention "
                           "probabilities; load it with attn_implementation='eager' or pass switch_to_eager=True")
    with attn_implementation(model, "eager"), _output_attentions(configs):
        yield


@contextmanager
def without_mha_fast_path():
    """torch.backends.mha's fast path off for the duration: under no_grad, nn.TransformerEncoder given a
    src_key_padding_mask hands its layers nested tensors (its padded tokens dropped), which the hooks cannot read."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _outer_configs(model: torch.nn.Module) -> list:
    """[model.config], or for a plain module without a config (a wrapper) the configs of its outermost sub-modules
    that have one."""
    if getattr(model, "config", None) is not None:
        return [model.config]
    return [m.config for _, m in outermost_submodules(model, lambda m: getattr(m, "config", None) is not None)]


def _implementations(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(sub-model, its attn_implementation) for the model and every Hugging Face model inside it."""
    return [(m, m.config._attn_implementation) for m in model.modules() if hasattr(m, "set_attn_implementation")
            and isinstance(getattr(getattr(m, "config", None), "_attn_implementation", None), str)]


@contextmanager
def attn_implementation(model: torch.nn.Module, impl: str):
    """Run the model with attn_implementation=impl; afterwards, exception or not, every (sub-)model has its own
    implementation back (a composite model's encoder and decoder may differ)."""
    saved = _implementations(model)  # outer models first: setting one sets the models inside it
    try:
        for module, _ in saved:
            if module.config._attn_implementation != impl:
                module.set_attn_implementation(impl)
        yield
    finally:
        for module, before in saved:  # each inner model then takes its own back
            if module.config._attn_implementation != before:
                module.set_attn_implementation(before)


@contextmanager
def _output_attentions(configs: list):
    """config.output_attentions = True in each of configs for the duration (some blocks, e.g. DeBERTa's and
    FSMT's, return probabilities only then)."""
    configs = [config for config in configs if hasattr(config, "output_attentions")]
    before = [config.output_attentions for config in configs]
    for config in configs:
        config.output_attentions = True
    try:
        yield
    finally:
        for config, value in zip(configs, before):
            config.output_attentions = value


def _warn_uncovered(model: torch.nn.Module) -> None:
    """A UserWarning naming the self-attention modules of model that attention_layers leaves out, if any."""
    if uncovered := uncovered_attention_modules(model):
        warnings.warn(f"attention_layers: {type(model).__name__} has self-attention modules the capture cannot read "
                      f"({len(uncovered)}: {', '.join(uncovered)}); only the other attention layers are returned "
                      "(register the family's value and output projections with "
                      "duat_kernels.models.register_architecture)", UserWarning, stacklevel=3)


def unread_cross_attention(model: torch.nn.Module, blocks: list | None = None) -> list[str]:
    """The cross-attention modules (encoder_decoder.cross_attention_blocks) that attention_layers(include_cross=True)
    cannot read: none of its blocks (attention_blocks(model, True) unless given), nor inside or around one (GPT-2's
    crossattention: keys and values from one c_attn)."""
    read = [name for name, _, _ in (attention_blocks(model, True) if blocks is None else blocks)]
    return [name for name in cross_attention_blocks(model) if not _nested(name, read)]


def cross_attention_names(model: torch.nn.Module, blocks: list) -> set[str]:
    """The names of the cross-attention modules among blocks (attention_blocks)."""
    return {name for name, _, _ in blocks if is_cross_attention_module(model, name)}


def _warn_unread_cross_attention(model: torch.nn.Module, blocks: list) -> None:
    """include_cross=True: a UserWarning naming the cross-attention modules it cannot read (unread_cross_attention)."""
    if unread := unread_cross_attention(model, blocks):
        warnings.warn(f"attention_layers: include_cross=True: {type(model).__name__} has cross-attention modules the "
                      f"capture cannot read ({len(unread)}: {', '.join(unread)}): no separate value and output "
                      "projections (GPT-2's c_attn computes keys and values in one projection); only the other "
                      "attention layers are returned", UserWarning, stacklevel=3)


def attention_layers(model: torch.nn.Module, *args, layers: list[int] | None = None, switch_to_eager: bool = True,
                     capture: str = "attn", include_cross: bool = False, **inputs) -> list[AttentionLayer]:
    """Run model(*args, **inputs) once and return the selected attention layers, in order.

    Args:
        model: a Hugging Face model whose attention blocks have separate value and output
            projections (found by name: Llama, Mistral, Qwen, Gemma, OLMo, Phi, OPT, GPT-J, BERT,
            RoBERTa, ELECTRA, DistilBERT, DeBERTa-v2, ViT, ...), a fused family registered in
            ARCHITECTURES (GPT-2, GPT-NeoX/Pythia, BLOOM, Falcon, Phi-3, GPT-BigCode) or with
            `register_architecture`, FSMT (fairseq's tokens-first layout, declared there too), any module
            containing torch.nn.MultiheadAttention, or a TransformerLens TransformerBridge (then pass tokens:
            see duat_kernels.models.lens), or an nnsight NNsight / LanguageModel (its wrapped module is run).
        layers: indices of the layers to keep (negative counts from the end); default all. Only
            these are kept in memory. A module applied at several depths (ALBERT) gives one layer per
            application, in the order the model runs them (`AttentionLayer.application`).
        switch_to_eager: if the model uses sdpa/flash attention, switch it to eager attention for
            the capture (and back); if False, raise an error instead.
        capture: "attn" records A (eager attention); "qk" records q and k after rotary embeddings
            with sdpa attention (A is never stored; the pass stops after the last selected layer;
            see duat_kernels.models.qk_capture; refused for FSMT, whose attention runs its own code).
        include_cross: also capture the cross-attention layers of an encoder-decoder model (kind "cross": A is
            (B, h, N_dec, N_enc), x the encoder states their value projection reads), numbered after all the
            self-attention layers, in module order; those keep their indices whichever the option. Off by
            default: the list of a model is then what it was before cross-attention was supported. With
            capture="qk" they come as q (decoder), k and key_mask (encoder) (qk_capture.QKAttentionLayer); FSMT's
            (tokens first) and nn.MultiheadAttention's are refused there, as their self-attention is.
        *args, **inputs: the model's inputs (e.g. input_ids, attention_mask). An encoder-decoder model
            given no decoder inputs gets decoder_input_ids = input_ids shifted right by its own function
            (and decoder_attention_mask = attention_mask shifted the same way): see
            duat_kernels.models.encoder_decoder; it runs with use_cache=False unless use_cache is given. Its
            cross-attention layers are captured with include_cross=True only. Inside a plain module (a wrapper without
            a config), such a model gets the same from the arguments the wrapper passes it
            (encoder_decoder.decoder_inputs_inside).

    Warns (UserWarning) when an encoder-decoder model has self-attention modules the capture cannot read (LED's
    and BigBirdPegasus's encoder attention: see encoder_decoder.uncovered_attention_modules), naming them: the
    layers returned are then the others only; and with include_cross=True, when it has cross-attention modules the
    capture cannot read (GPT-2's: unread_cross_attention).
    """
    if capture not in ("attn", "qk"):
        raise ValueError(f"capture must be 'attn' or 'qk', got {capture!r}")
    check_flag("include_cross", include_cross)
    check_flag("switch_to_eager", switch_to_eager)  # "no" was truthy: sdpa was switched to eager
    from duat_kernels.models import lens

    if lens.is_bridge(model):  # TransformerLens 4.x: hook_pattern, W_V, W_O, b_V, b_O
        if include_cross:
            raise ValueError("include_cross=True is not available for a TransformerLens bridge; use the Hugging Face "
                             "model itself")
        if capture != "attn":
            raise ValueError("capture='qk' is not available for a TransformerLens bridge (its hook_pattern gives A); "
                             "use capture='attn', or capture='qk' on the Hugging Face model itself")
        return lens.bridge_attention_layers(model, *args, layers=layers, **inputs)
    if type(model).__module__.startswith("nnsight.") and isinstance(getattr(model, "_module", None), torch.nn.Module):
        model = model._module  # an nnsight NNsight / LanguageModel wraps the torch module it runs
    inputs = with_decoder_inputs(model, named_inputs(model, args, inputs), inputs)
    named = named_inputs(model, args, inputs)
    _check_has_tokens(named)
    _check_no_cached_keys(named)
    _warn_uncovered(model)
    blocks = attention_blocks(model, include_cross)
    if include_cross:
        _warn_unread_cross_attention(model, blocks)
    if capture == "qk":
        from duat_kernels.models.qk_capture import attention_layers_qk
        return attention_layers_qk(model, blocks, *args, layers=layers, **inputs)
    cross = cross_attention_names(model, blocks)
    plan = layer_plan(model, blocks)
    selected = select_layers(layers, len(plan))
    applications = ApplicationRecords(blocks, plan, selected)
    handles = applications.count_hooks()  # first: the other hooks read the call count
    weights: dict[int, dict] = {}
    try:
        for i in applications.selected_blocks():
            weights[i] = {}
            handles += _hooks(model, blocks[i], weights[i], lambda i=i: applications.current(i), blocks[i][0] in cross)
        with eager_attention(model, switch_to_eager), decoder_inputs_inside(model) as inner_inputs, torch.no_grad(), \
                without_mha_fast_path():
            model(*args, **inputs)
    finally:
        for h in handles:
            h.remove()
    applications.check_calls()
    named = inner_inputs or named  # a wrapped encoder-decoder model's own inputs: its masks
    result = []
    for index, rec in applications.records.items():
        i, call = applications.application(index)
        name = blocks[i][0]
        if "attn" not in rec:
            raise RuntimeError(f"attention layer {index} ({name}) was not called by the forward pass; "
                               "select only the layers the model runs (layers=[...])")
        rec = {**weights[i], **rec}
        if name in cross:
            rec.pop("given_encoder_states", None)
            check_cross_attention(name, rec["attn"], rec["x"], rec["output"])
        else:
            check_not_called_with_encoder_states(name, rec)
            _check_self_attention(name, rec["attn"], rec["x"])
        rec.setdefault("num_kv_heads", _kv_heads(name, rec))
        rec.setdefault("num_heads", rec["attn"].shape[1])
        token_mask = _token_mask(model, name, rec["attn"].shape[0], rec["attn"].shape[-2], named)  # query tokens
        result.append(AttentionLayer(index=index, name=name, token_mask=token_mask, application=call,
                                     kind="cross" if name in cross else "self", **rec))
    return result


def attention_layer_count(model: torch.nn.Module, include_cross: bool = False) -> int:
    """How many attention layers attention_layers(model, ..., include_cross=include_cross) can select: one per block,
    one per application of a block shared across depth (ALBERT)."""
    return len(attention_layer_names(model, include_cross))


def attention_layer_names(model: torch.nn.Module, include_cross: bool = False) -> list[str]:
    """The module name of each attention layer attention_layers(model, ..., include_cross=include_cross) can select,
    by layer index (a block shared across depth, ALBERT's, once per application)."""
    blocks = attention_blocks(model, include_cross)
    return [blocks[i][0] for i, _ in layer_plan(model, blocks)]


def _check_has_tokens(named: dict) -> None:
    """An empty batch or a sequence of no tokens has no attention to capture: transformers failed inside the
    forward pass with a raw reshape error ("cannot reshape tensor of 0 elements")."""
    for key in ("input_ids", "inputs_embeds"):
        t = named.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == 0:
            raise ValueError(f"{key} of shape {tuple(t.shape)} holds no sequences: pass a batch of at least one")
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == 0:
            raise ValueError(f"{key} of shape {tuple(t.shape)} holds no tokens: pass at least one token per sequence")


def _check_no_cached_keys(named: dict) -> None:
    """A filled cache (past_key_values, or transformers 5's cache) gives keys whose x the capture never sees:
    A is (N, N_cached + N) and W' of the layer cannot be formed from this pass."""
    for key in ("past_key_values", "cache"):
        cache = named.get(key)
        if cache is None:
            continue
        cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else len(cache) and cache[0][0].shape[-2]
        if cached:
            raise ValueError(f"{key} holds {int(cached)} cached tokens, whose keys and values the layers attend to "
                             "but whose x W' x' + b' needs is not in this pass: pass the whole sequence without a "
                             "filled cache")


def select_layers(layers, count: int) -> list[int]:
    """The sorted distinct indices in [0, count) of `layers` (ints, negative from the end; None: all)."""
    if layers is None:
        return list(range(count))
    if isinstance(layers, (str, bytes, torch.Tensor)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be a list of int layer indices, got {type(layers).__name__} {layers!r}")
    chosen = list(layers)
    for i in chosen:
        if integer(i) is None:
            raise TypeError(f"layers must be a list of int layer indices, got {type(i).__name__} {i!r} in {chosen!r}")
        if not -count <= integer(i) < count:
            raise IndexError(f"layer {i} is out of range: the model has {count} attention layers")
    return sorted({integer(i) % count for i in chosen})


def _token_mask(model, name: str, batch: int, tokens: int, inputs: dict, strict: bool = False) -> torch.Tensor | None:
    """(B, N) True at real tokens: attention_mask, or decoder_attention_mask for the decoder of an
    encoder-decoder model; None when no mask of the layer's shape was given (strict: when none was given,
    and a mask of another shape is refused)."""
    key = "decoder_attention_mask" if _in_decoder(model, name) else "attention_mask"
    mask = inputs.get(key)
    if isinstance(mask, torch.Tensor) and mask.shape == (batch, tokens):
        return mask.bool()
    if strict and mask is not None:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: {key} has shape {shape}, not the layer's (B, N) = ({batch}, {tokens}) (cached "
                         "keys, past_key_values?); capture='qk' would lose it: pass the layer's key mask or use "
                         "capture='attn'")
    return None


ENCODER_STATES = ("key_value_states", "encoder_hidden_states")  # what a Hugging Face cross-attention block is given


def encoder_states_hook(current):
    """A forward pre-hook (with_kwargs) marking the ongoing application's record (current(), None when not
    selected) when the block is given the encoder's states: cross-attention under a name CROSS_ATTENTION_NAMES
    does not know."""
    def hook(_m, _args, kwargs):
        if (rec := current()) is not None and any(kwargs.get(k) is not None for k in ENCODER_STATES):
            rec["given_encoder_states"] = True
    return hook


def check_not_called_with_encoder_states(name: str, rec: dict) -> None:
    """Refuse (and drop the mark of) a layer that ran as cross-attention: when N_dec = N_enc its A is square and
    W' x' + b' over the encoder's x reproduces the output, so it would pass for a self-attention layer."""
    if rec.pop("given_encoder_states", False):
        raise ValueError(f"{name} was given the encoder's states ({' or '.join(ENCODER_STATES)}): it is "
                         "cross-attention, whose A is N_dec x N_enc over the encoder's tokens, not a self-attention "
                         "layer; leave it out with layers=[...]")


def _check_self_attention(name: str, attn: torch.Tensor, x: torch.Tensor) -> None:
    """W' maps the tokens x to the outputs through A (N x N over those tokens): A over other keys (a memory
    of another length, an extra bias or zero key) has no such W'."""
    tokens = x.shape[-2]
    if attn.shape[-2:] != (tokens, tokens) and x.dim() == 3 and tuple(x.shape[:2]) == (attn.shape[-1], attn.shape[0]):
        raise ValueError(f"{name}: its value projection reads x of shape {tuple(x.shape)}, tokens first (N, B, M: "
                         f"fairseq's time-major layout), for attention probabilities of shape {tuple(attn.shape)}; "
                         "declare the layout with duat_kernels.models.register_architecture(model_type, value=..., "
                         "out_proj=..., tokens_first=True)")
    if attn.shape[-2:] != (tokens, tokens):
        raise ValueError(f"{name}: attention probabilities of shape {tuple(attn.shape)} are not N x N over the "
                         f"{tokens} tokens its value projection reads (cross-attention over a memory, or extra keys "
                         "such as add_bias_kv / add_zero_attn): W' covers self-attention only; leave this layer out "
                         "with layers=[...]")


def _in_decoder(model, name: str) -> bool:
    """True for a layer of the decoder of an encoder-decoder model (its own mask and head count)."""
    return holds_encoder_decoder(model) and "decoder" in name.split(".")


def config_heads(model, name: str) -> int | None:
    """h of the layer from the model's config (the decoder's own count in an encoder-decoder model: BART's
    decoder_attention_heads); None when the config has none."""
    config = owning_config(model, name)
    heads = getattr(config, "decoder_attention_heads", None) if _in_decoder(model, name) else None
    heads = heads if isinstance(heads, int) else getattr(config, "num_attention_heads", None)
    return heads if isinstance(heads, int) else None


def _kv_heads(name: str, rec: dict) -> int:
    """h_kv from the captured shapes: d = (h·d) / h from w_o and A, h_kv = (h_kv·d) / d from w_v."""
    heads, inner, kv_rows = rec["attn"].shape[1], rec["w_o"].shape[1], rec["w_v"].shape[0]
    if inner % heads or kv_rows % (inner // heads) or heads % (kv_rows // (inner // heads)):
        raise RuntimeError(f"{name}: {heads} heads in the attention probabilities do not fit the output projection's "
                           f"{inner} inputs and the value projection's {kv_rows} rows; register the family's value "
                           "split with duat_kernels.models.register_architecture")
    return kv_rows // (inner // heads)


def _probabilities(out, square: bool = True) -> torch.Tensor | None:
    """The (B, h, N, N) probabilities among a block's outputs: the last 4-D square tensor after the
    output ((output, weights) for most HF blocks; T5 returns (output, position_bias, weights)); square=False
    (cross-attention): the last 4-D tensor, (B, h, N_dec, N_enc)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return next((o for o in reversed(outs[1:]) if isinstance(o, torch.Tensor) and o.dim() == 4
                 and (o.shape[-1] == o.shape[-2] or not square)), None)


def _hooks(model, block: tuple[str, torch.nn.Module, Architecture | None], static: dict, current,
           cross: bool = False) -> list:
    """Hooks that put the block's weights into `static` and each selected application's A, x and output into
    current() (the dict of the application under way, None when it is not selected); cross: the block is
    cross-attention (its A is not square)."""
    name, module, arch = block
    if arch is None:
        return _mha_hooks(module, static, current)
    config = owning_config(model, name)
    value, out_proj = resolve(model, name, arch.value), resolve(model, name, arch.out_proj)
    if config_heads(model, name) is not None:  # checked against A's head axis later
        static["num_heads"] = config_heads(model, name)
    static["w_v"], static["b_v"] = arch.value_weights(value, config)
    static["w_o"], static["b_o"] = arch.out_weights(out_proj, config)
    batch_major = batch_major_view(not arch.tokens_first)

    def on_block(_m, _args, out):
        rec = current()
        if rec is None:
            return
        attn = _probabilities(out, square=not cross)
        if attn is None and getattr(config, "_attn_implementation", None) == "eager":
            shapes = [tuple(o.shape) for o in (out if isinstance(out, (tuple, list)) else (out,))
                      if isinstance(o, torch.Tensor)]
            raise ValueError(f"{name} runs eager attention but returned no (B, h, N, N) attention probabilities "
                             f"(its outputs: {shapes}): attention over local blocks or a sparse pattern (LongT5, "
                             "BigBird), not over all N tokens, has no W' here; leave the layer out with layers=[...]")
        if attn is None:
            raise RuntimeError(f"{name} returned no attention probabilities (attn_implementation="
                               f"{config._attn_implementation!r}); load the model with attn_implementation='eager'")
        rec["attn"] = attn.detach()

    def on_value(_m, args, kwargs):
        if (rec := current()) is not None:
            rec["x"] = batch_major(args[0] if args else kwargs["input"]).detach()

    def on_out(_m, _args, out):
        if (rec := current()) is not None:
            rec["output"] = batch_major(out).detach()

    return [module.register_forward_hook(on_block), value.register_forward_pre_hook(on_value, with_kwargs=True),
            out_proj.register_forward_hook(on_out),
            module.register_forward_pre_hook(encoder_states_hook(current), with_kwargs=True)]


def batch_major_view(batch_first: bool):
    """t -> t (batch_first) or t (N, B, ...) -> (B, N, ...), a view (tokens first: fairseq's layout, FSMT's, and
    nn.MultiheadAttention's default)."""
    return (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))


def _mha_hooks(mha: torch.nn.MultiheadAttention, static: dict, current) -> list:
    """nn.MultiheadAttention: ask for per-head probabilities, take the value input and the output."""
    e = mha.embed_dim
    static["num_heads"] = static["num_kv_heads"] = mha.num_heads
    static["w_v"] = (mha.in_proj_weight[2 * e:] if mha._qkv_same_embed_dim else mha.v_proj_weight).detach()
    static["b_v"] = None if mha.in_proj_bias is None else mha.in_proj_bias[2 * e:].detach()
    static["w_o"] = mha.out_proj.weight.detach()
    static["b_o"] = None if mha.out_proj.bias is None else mha.out_proj.bias.detach()
    batch_major = batch_major_view(mha.batch_first)

    def before(_m, args, kwargs):
        if (rec := current()) is None:
            return None
        value = args[2] if len(args) > 2 else kwargs["value"]
        rec["x"] = batch_major(value if value.dim() == 3 else value.unsqueeze(1 - int(mha.batch_first))).detach()
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def after(_m, _args, out):
        if (rec := current()) is None:
            return
        attn_out, weights = out
        rec["output"] = batch_major(attn_out if attn_out.dim() == 3 else attn_out.unsqueeze(1 - int(mha.batch_first)))
        rec["attn"] = weights if weights.dim() == 4 else weights.unsqueeze(0)

    return [mha.register_forward_pre_hook(before, with_kwargs=True), mha.register_forward_hook(after)]
