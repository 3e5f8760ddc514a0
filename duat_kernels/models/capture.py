"""Capture every selected attention layer of a model in one forward pass, with hooks.

Each layer gives A (the probabilities that multiply the values), the value and output weights and
biases, x (what the value projection reads) and the module's own attention output, so that
W' x' + b' can be checked against the model itself.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from duat_kernels.hvo import hvo_bias, hvo_matrix
from duat_kernels.hvo_operator import HVOOperator
from duat_kernels.models.architectures import ARCHITECTURES, Architecture, resolve


@dataclass
class AttentionLayer:
    """One attention layer on given inputs. Shapes: attn (B, h, N, N); x (B, N, M_in);
    output (B, N, M_out); w_v (h_kv·d, M_in), w_o (M_out, h·d); token_mask (B, N) or None."""

    index: int
    name: str
    attn: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    b_v: torch.Tensor | None
    b_o: torch.Tensor | None
    num_kv_heads: int
    x: torch.Tensor
    output: torch.Tensor
    token_mask: torch.Tensor | None = field(default=None, repr=False)  # True where a real (unpadded) token

    def operator(self, layout: str = "token") -> HVOOperator:
        """The matrix-free W' (with b') of this layer."""
        return HVOOperator(self.attn, self.w_v, self.w_o, num_kv_heads=self.num_kv_heads, b_v=self.b_v, b_o=self.b_o,
                           layout=layout)

    def hvo_matrix(self, **kwargs) -> torch.Tensor:
        """Dense W' (B, N·M_out, N·M_in); kwargs go to duat_kernels.hvo_matrix."""
        return hvo_matrix(self.attn, self.w_v, self.w_o, num_kv_heads=self.num_kv_heads, **kwargs)

    def hvo_bias(self, layout: str = "token") -> torch.Tensor:
        return hvo_bias(self.attn, self.w_o, self.b_v, self.b_o, num_kv_heads=self.num_kv_heads, layout=layout)

    def reconstruct(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """W' x' + b' as (B, N, M_out): with the given dense token-layout W', else matrix-free."""
        if w is None:
            flat = self.operator().matvec(self.x.reshape(self.x.shape[0], -1))
        else:
            flat = torch.einsum("brc,bc->br", w, self.x.reshape(self.x.shape[0], -1).to(w.dtype))
        return (flat + self.hvo_bias().to(flat.dtype)).reshape(self.output.shape)

    def relative_error(self, w: torch.Tensor | None = None) -> float:
        """||W' x' + b' - output|| / ||output|| over the real (unpadded) query tokens."""
        diff = self.reconstruct(w).double() - self.output.double()
        ref = self.output.double()
        if self.token_mask is not None:
            diff, ref = diff[self.token_mask], ref[self.token_mask]
        return (diff.norm() / ref.norm()).item()


def find_architecture(model: torch.nn.Module) -> Architecture | None:
    """The table entry for a Hugging Face model, None for models built from nn.MultiheadAttention."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()):
        return None
    raise ValueError(f"no adapter for model_type={model_type!r} ({type(model).__name__}); supported: "
                     f"{', '.join(sorted(ARCHITECTURES))} and modules built from torch.nn.MultiheadAttention. "
                     "Adding one is an entry in duat_kernels/models/architectures.py")


def attention_blocks(model: torch.nn.Module, arch: Architecture | None) -> list[tuple[str, torch.nn.Module]]:
    if arch is None:
        return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    pattern = re.compile(arch.attention)
    blocks = [(name, m) for name, m in model.named_modules() if pattern.search(name)]
    return sorted(blocks, key=lambda b: int(pattern.search(b[0]).group(1)))


@contextmanager
def eager_attention(model: torch.nn.Module, switch: bool):
    """Make the model return attention probabilities (eager attention) for the duration."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in (None, "eager"):
        yield
        return
    if not switch:
        raise RuntimeError(f"the model uses attn_implementation={impl!r}, which does not return attention "
                           "probabilities; load it with attn_implementation='eager' or pass switch_to_eager=True")
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(impl)


def attention_layers(model: torch.nn.Module, *args, layers: list[int] | None = None, switch_to_eager: bool = True,
                     capture: str = "attn", **inputs) -> list[AttentionLayer]:
    """Run model(*args, **inputs) once and return the selected attention layers, in order.

    Args:
        model: a Hugging Face model (BERT, RoBERTa, MiniLM, GPT-2, Llama, Mistral, Qwen2, SmolLM2) or
            any module containing torch.nn.MultiheadAttention (or one itself).
        layers: indices of the layers to keep (negative counts from the end); default all. Only
            these are hooked and kept in memory.
        switch_to_eager: if the model uses sdpa/flash attention, switch it to eager attention for
            the capture (and back); if False, raise an error instead.
        capture: "attn" records A (eager attention); "qk" records q and k after rotary embeddings
            with sdpa attention (A is never stored; the pass stops after the last selected layer;
            see duat_kernels.models.qk_capture).
        *args, **inputs: the model's inputs (e.g. input_ids, attention_mask).
    """
    if capture not in ("attn", "qk"):
        raise ValueError(f"capture must be 'attn' or 'qk', got {capture!r}")
    if capture == "qk":
        from duat_kernels.models.qk_capture import attention_layers_qk
        return attention_layers_qk(model, *args, layers=layers, **inputs)
    arch = find_architecture(model)
    blocks = attention_blocks(model, arch)
    if not blocks:
        raise ValueError(f"found no attention layers in {type(model).__name__}")
    chosen = range(len(blocks)) if layers is None else layers
    for i in chosen:
        if not -len(blocks) <= i < len(blocks):
            raise IndexError(f"layer {i} is out of range: the model has {len(blocks)} attention layers")
    selected = sorted({i % len(blocks) for i in chosen})
    records: dict[int, dict] = {i: {} for i in selected}
    handles = []
    try:
        for i in selected:
            handles += _hooks(model, arch, blocks[i], records[i])
        with eager_attention(model, switch_to_eager), torch.no_grad():
            model(*args, **inputs)
    finally:
        for h in handles:
            h.remove()
    mask = inputs.get("attention_mask")
    token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    result = []
    for i in selected:
        rec = records[i]
        if "attn" not in rec:
            raise RuntimeError(f"attention layer {i} ({blocks[i][0]}) was not called by the forward pass; "
                               "select only the layers the model runs (layers=[...])")
        result.append(AttentionLayer(index=i, name=blocks[i][0], token_mask=token_mask, **rec))
    return result


def _hooks(model, arch: Architecture | None, block: tuple[str, torch.nn.Module], rec: dict) -> list:
    name, module = block
    if arch is None:
        return _mha_hooks(module, rec)
    config = model.config
    value, out_proj = resolve(model, name, arch.value), resolve(model, name, arch.out_proj)
    heads = config.num_attention_heads
    rec["num_kv_heads"] = getattr(config, "num_key_value_heads", None) or heads
    rec["w_v"], rec["b_v"] = arch.value_weights(value, config)
    rec["w_o"], rec["b_o"] = arch.out_weights(out_proj, config)

    def on_block(_m, _args, out):
        if out[1] is None:
            raise RuntimeError(f"{name} returned no attention probabilities (attn_implementation="
                               f"{config._attn_implementation!r}); load the model with attn_implementation='eager'")
        rec["attn"] = out[1].detach()

    def on_value(_m, args, kwargs):
        rec["x"] = (args[0] if args else kwargs["input"]).detach()

    def on_out(_m, _args, out):
        rec["output"] = out.detach()

    return [module.register_forward_hook(on_block), value.register_forward_pre_hook(on_value, with_kwargs=True),
            out_proj.register_forward_hook(on_out)]


def _mha_hooks(mha: torch.nn.MultiheadAttention, rec: dict) -> list:
    """nn.MultiheadAttention: ask for per-head probabilities, take the value input and the output."""
    e = mha.embed_dim
    rec["num_kv_heads"] = mha.num_heads
    rec["w_v"] = (mha.in_proj_weight[2 * e:] if mha._qkv_same_embed_dim else mha.v_proj_weight).detach()
    rec["b_v"] = None if mha.in_proj_bias is None else mha.in_proj_bias[2 * e:].detach()
    rec["w_o"] = mha.out_proj.weight.detach()
    rec["b_o"] = None if mha.out_proj.bias is None else mha.out_proj.bias.detach()
    batch_major = (lambda t: t) if mha.batch_first else (lambda t: t.transpose(0, 1))

    def before(_m, args, kwargs):
        value = args[2] if len(args) > 2 else kwargs["value"]
        rec["x"] = batch_major(value if value.dim() == 3 else value.unsqueeze(1 - int(mha.batch_first))).detach()
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def after(_m, _args, out):
        attn_out, weights = out
        rec["output"] = batch_major(attn_out if attn_out.dim() == 3 else attn_out.unsqueeze(1 - int(mha.batch_first)))
        rec["attn"] = weights if weights.dim() == 4 else weights.unsqueeze(0)

    return [mha.register_forward_pre_hook(before, with_kwargs=True), mha.register_forward_hook(after)]
