"""Every layer of a transformer as the affine map it is on one input (Eq. 11, App. C of the paper).

On a fixed input, each nonlinearity is replaced by what it did there:
* attention by W' x' + b' (A frozen, the DUAT operator);
* a LayerNorm by z ↦ γ ⊙ (z − mean z) / σ + β with σ = sqrt(var z + eps) of the actual z,
  an RMSNorm by z ↦ γ ⊙ z / rms with rms = sqrt(mean z² + eps) of the actual z;
* a GELU FFN by W2 D (W1 a + b1) + b2 with D = act(u) / u at the actual u = W1 a + b1,
  a SwiGLU FFN by W_down diag(act(gate(y))) up(y) (the gate, frozen, scales the up projection).
Replaying these maps reproduces the hidden states; dropping every constant term (b', β, b1, b2)
leaves the linear part, so h_L = (linear maps)(x_0) + (affine maps)(0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from duat_kernels.hvo_operator import HVOOperator
from duat_kernels.models import AttentionLayer, attention_layers


@dataclass(frozen=True)
class Family:
    """Where the non-attention parts of one layer live (paths relative to the layer module)."""

    layer: str  # regex of the layer module's name; group 1 is the index
    style: str  # "post_ln" (BERT: LN(x + attn), LN(a + ffn)) or "pre_rms" (Llama: x + attn(RMS x), ...)
    norm_attn: str
    norm_ffn: str
    ffn_in: str  # W1 (BERT) or the up projection (Llama)
    ffn_gate: str | None  # the gate projection of a gated FFN
    ffn_out: str
    act: str
    value_out: tuple[str, str]  # value and output projections (LoRA targets)
    query_key: tuple[str, str]


_BERT = Family(r"(?:^|\.)encoder\.layer\.(\d+)$", "post_ln", "attention.output.LayerNorm", "output.LayerNorm",
               "intermediate.dense", None, "output.dense", "intermediate.intermediate_act_fn",
               ("attention.self.value", "attention.output.dense"), ("attention.self.query", "attention.self.key"))
_LLAMA = Family(r"(?:^|\.)layers\.(\d+)$", "pre_rms", "input_layernorm", "post_attention_layernorm", "mlp.up_proj",
                "mlp.gate_proj", "mlp.down_proj", "mlp.act_fn", ("self_attn.v_proj", "self_attn.o_proj"),
                ("self_attn.q_proj", "self_attn.k_proj"))
FAMILIES: dict[str, Family] = {"bert": _BERT, "roberta": _BERT, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}


def family_of(model: torch.nn.Module) -> Family:
    """The Family of a Hugging Face model; ValueError naming the supported model types otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} has no layer recipe for the claims (layer norms, FFN); "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


@dataclass
class LayerTerms:
    """One layer frozen on one input (batch 1). Shapes: h_in, h_out (N, M); norm scales (N, 1);
    gate (N, F) the FFN's diagonal scaling; weights in nn.Linear convention; all float64."""

    attention: AttentionLayer
    style: str
    h_in: torch.Tensor
    h_out: torch.Tensor
    norm_attn: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (scale, γ, β)
    norm_ffn: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
    gate: torch.Tensor
    ffn_in: tuple[torch.Tensor, torch.Tensor | None]
    ffn_out: tuple[torch.Tensor, torch.Tensor | None]

    def operator(self) -> HVOOperator:
        """W' (with b') of this layer's attention in float64."""
        a = self.attention
        f64 = (lambda t: None if t is None else t.double())
        return HVOOperator(a.attn[0].double(), a.w_v.double(), a.w_o.double(), num_kv_heads=a.num_kv_heads,
                           b_v=f64(a.b_v), b_o=f64(a.b_o))

    def ffn_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1, W2): the FFN's two token-wise linear maps (F, M) and (M, F) (up and down for gated FFNs)."""
        return self.ffn_in[0], self.ffn_out[0]


def _norm(z: torch.Tensor, terms, centred: bool, with_bias: bool) -> torch.Tensor:
    scale, gamma, beta = terms
    if centred:
        z = z - z.mean(-1, keepdim=True)  # linear in z
    y = gamma * (z * scale)
    return y + beta if with_bias and beta is not None else y


def _linear(x: torch.Tensor, weights, with_bias: bool) -> torch.Tensor:
    w, b = weights
    y = x @ w.T
    return y + b if with_bias and b is not None else y


def attention_map(t: LayerTerms, x: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """W' x' (+ b') for x (N, M_in) -> (N, M_out), matrix-free."""
    op = t.operator()
    out = op.matvec(x.reshape(-1))
    if with_bias:
        out = out + op.bias()
    return out.reshape(x.shape[0], -1)


def ffn_map(t: LayerTerms, y: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """The FFN with its activation frozen as the diagonal scaling `gate`: W2 (D ⊙ (W1 y + b1)) + b2."""
    return _linear(t.gate * _linear(y, t.ffn_in, with_bias), t.ffn_out, with_bias)


def replay(t: LayerTerms, h: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """The layer as its frozen affine map (with_bias=True) or its linear part, h (N, M) -> (N, M)."""
    if t.style == "post_ln":
        a = _norm(attention_map(t, h, with_bias) + h, t.norm_attn, True, with_bias)
        return _norm(ffn_map(t, a, with_bias) + a, t.norm_ffn, True, with_bias)
    r = h + attention_map(t, _norm(h, t.norm_attn, False, with_bias), with_bias)
    return r + ffn_map(t, _norm(r, t.norm_ffn, False, with_bias), with_bias)


def _norm_terms(module: torch.nn.Module, z: torch.Tensor, centred: bool):
    z = z.double()
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon")
    var = z.var(-1, unbiased=False, keepdim=True) if centred else z.square().mean(-1, keepdim=True)
    beta = getattr(module, "bias", None)
    return (var + eps).rsqrt(), module.weight.detach().double(), None if beta is None else beta.detach().double()


def _weights(module: torch.nn.Module):
    return module.weight.detach().double(), None if module.bias is None else module.bias.detach().double()


def collect(model: torch.nn.Module, inputs: dict) -> list[LayerTerms]:
    """Run the model once on inputs (batch 1) and freeze every layer: a list of LayerTerms, in order."""
    fam = family_of(model)
    pattern = re.compile(fam.layer)
    layers = sorted(((int(pattern.search(n).group(1)), m) for n, m in model.named_modules() if pattern.search(n)),
                    key=lambda p: p[0])
    ids = inputs.get("input_ids")
    if ids is not None and ids.shape[0] != 1:
        raise ValueError(f"collect needs one sequence (batch 1), got input_ids of shape {tuple(ids.shape)}")
    recs: list[dict] = [{} for _ in layers]
    handles = []

    def keep(rec, key, which):
        def hook(_m, args, out=None):
            value = args[0] if which == "in" else (out[0] if isinstance(out, tuple) else out)
            rec[key] = value.detach()[0]
        return hook

    try:
        for (_, layer), rec in zip(layers, recs):
            handles.append(layer.register_forward_pre_hook(keep(rec, "h_in", "in")))
            handles.append(layer.register_forward_hook(keep(rec, "h_out", "out")))
            handles.append(layer.get_submodule(fam.norm_attn).register_forward_pre_hook(keep(rec, "z_attn", "in")))
            handles.append(layer.get_submodule(fam.norm_ffn).register_forward_pre_hook(keep(rec, "z_ffn", "in")))
            handles.append(layer.get_submodule(fam.act).register_forward_pre_hook(keep(rec, "u", "in")))
        captured = attention_layers(model, **inputs)
    finally:
        for h in handles:
            h.remove()
    centred = fam.style == "post_ln"
    result = []
    for (_, layer), rec, att in zip(layers, recs, captured):
        u = rec["u"].double()
        act = layer.get_submodule(fam.act)
        if fam.ffn_gate is None:  # D = act(u) / u; where u = 0 the slope at 0 (act(u)/u -> act'(0))
            zero = torch.zeros(1, dtype=u.dtype, requires_grad=True)
            slope = torch.autograd.grad(act(zero).sum(), zero)[0]
            gate = torch.where(u != 0, act(u) / torch.where(u != 0, u, 1.0), slope)
        else:
            gate = act(u)
        result.append(LayerTerms(
            attention=att, style=fam.style, h_in=rec["h_in"].double(), h_out=rec["h_out"].double(),
            norm_attn=_norm_terms(layer.get_submodule(fam.norm_attn), rec["z_attn"], centred),
            norm_ffn=_norm_terms(layer.get_submodule(fam.norm_ffn), rec["z_ffn"], centred),
            gate=gate.detach(), ffn_in=_weights(layer.get_submodule(fam.ffn_in)),
            ffn_out=_weights(layer.get_submodule(fam.ffn_out))))
    return result
