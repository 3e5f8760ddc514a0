"""§ lora (§4.4, Eq. 16-17): a LoRA adapter as a change of W'.

With rank-r adapters ΔWv = B_v A_v, ΔWo = B_o A_o (peft, nonzero B) and the attention A fixed,
    W'(merged) − W'(base) = Σ_i A_i ⊗ ΔOV_i,   ΔOV_i = ΔWo_i Wv_i + Wo_i ΔWv_i + ΔWo_i ΔWv_i,
each term of rank <= r, so rank ΔOV_i <= 2r. When q and k are adapted too, A changes as well and
    W'(merged) − W'(base) = Σ_i (A'_i − A_i) ⊗ OV_i  +  Σ_i A'_i ⊗ ΔOV_i     (attention part + weight part),
whose Frobenius norms are exact from ||Σ_i X_i ⊗ Y_i||² = Σ_ij ⟨X_i, X_j⟩⟨Y_i, Y_j⟩.
"""

from __future__ import annotations

import copy
import re
import warnings

import torch

from duat_kernels._validation import nan_max
from duat_kernels.analysis.claims.layer_terms import family_of
from duat_kernels.hvo_operator import HVOOperator
from duat_kernels.models import attention_layers
from duat_kernels.reference import head_factors

PEFT_EXTRA = "pip install 'duat-kernels[claims]'"
RANK = 4
RELATIVE_SIZE = 0.1  # each adapter's ||B A·s||_F is scaled to this fraction of the adapted weight's norm
PROBES = 3


def check_rank(name: str, rank: int, width: int) -> None:
    """Refuse a rank above the model width M: each ΔOV_i is M x M, so rank ΔOV_i <= 2r would hold whatever
    the adapters are, and the section would check nothing. ValueError naming name, the rank and the width."""
    if rank > width:
        raise ValueError(f"{name} {rank} is above the model width {width}: give a rank from 1 to {width}")


def ov_stack(w_v: torch.Tensor, w_o: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """OV_i = Wo_i Wv_{i//g}, (h, M_out, M_in), float64."""
    wo, wv = head_factors(w_v.double(), w_o.double(), heads, kv_heads)
    return wo @ wv


def delta_ov(w_v, w_o, d_v, d_o, heads: int, kv_heads: int) -> torch.Tensor:
    """ΔOV_i = ΔWo_i Wv_i + Wo_i ΔWv_i + ΔWo_i ΔWv_i from the adapters' ΔW (h, M_out, M_in), float64."""
    wo, wv = head_factors(w_v.double(), w_o.double(), heads, kv_heads)
    dwo, dwv = head_factors(d_v.double(), d_o.double(), heads, kv_heads)
    return dwo @ wv + wo @ dwv + dwo @ dwv


def delta_ov_rank(w_v, w_o, d_v, d_o, heads: int, kv_heads: int) -> list[int]:
    """rank ΔOV_i per head without an M x M SVD: ΔOV_i = L_i R_i with L_i = [ΔWo_i, Wo_i] (M_out, 2d),
    R_i = [Wv_i + ΔWv_i; ΔWv_i] (2d, M_in); with L = Q_L R_L and Rᵀ = Q_R R_R, rank ΔOV_i = rank(R_L R_Rᵀ)
    (2d x 2d), counted with matrix_rank's default tolerance for the full size (eps · max(M_out, M_in))."""
    wo, wv = head_factors(w_v.double(), w_o.double(), heads, kv_heads)
    dwo, dwv = head_factors(d_v.double(), d_o.double(), heads, kv_heads)
    left, right = torch.cat([dwo, wo], dim=2), torch.cat([wv + dwv, dwv], dim=1)
    core = torch.linalg.qr(left)[1] @ torch.linalg.qr(right.transpose(1, 2))[1].transpose(1, 2)
    rtol = torch.finfo(torch.float64).eps * max(wo.shape[1], wv.shape[2])
    return [int(r) for r in torch.linalg.matrix_rank(core, rtol=rtol)]


def kron_sum_inner(x: torch.Tensor, y: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> float:
    """⟨Σ_i x_i ⊗ y_i, Σ_j x2_j ⊗ y2_j⟩_F for x, x2 (h, N, N) and y, y2 (h, M_out, M_in)."""
    return ((x.flatten(1) @ x2.flatten(1).T) * (y.flatten(1) @ y2.flatten(1).T)).sum().item()


def apply_kron_sum(attn: torch.Tensor, ov: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(Σ_i A_i ⊗ OV_i) z' for z (N, M_in) -> (N, M_out), straight from the definition."""
    projected = torch.einsum("ica,ma->imc", ov, z)  # OV_i z_m
    return torch.einsum("inm,imc->nc", attn, projected)


def adapt(model: torch.nn.Module, modules: tuple[str, ...], rank: int = RANK, seed: int = 0):
    """(merged model, {(layer, module suffix): ΔW}) for a peft LoRA of `rank` on the given module suffixes of a
    copy of model, B nonzero, each ΔW scaled to RELATIVE_SIZE of its weight."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError(f"the lora section needs peft: {PEFT_EXTRA}") from exc
    torch.manual_seed(seed)
    pattern = r".*\.(?:" + "|".join(re.escape(m) for m in modules) + r")$"
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern, init_lora_weights=False, lora_dropout=0.0)
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5 (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    layer_re = re.compile(family_of(model).layer.rstrip("$") + r"\.(.+)$")
    deltas = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "lora_B") and "default" in module.lora_B:
                scale = RELATIVE_SIZE * module.base_layer.weight.norm() / module.get_delta_weight("default").norm()
                module.lora_B["default"].weight.mul_(scale)
                match = layer_re.search(name)  # ΔW = s·B A in float64, so that its rank is exact
                delta = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
                deltas[(int(match.group(1)), match.group(2))] = delta * module.scaling["default"]
    return peft_model.merge_and_unload().eval(), deltas


def compare(base, merged, deltas, modules: tuple[str, str], rank: int, seed: int = 0) -> list[dict]:
    """Per layer: the identity check, the ranks of ΔOV_i and the attention/weight split of ΔW'."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, m in zip(base, merged):
        h, kv = b.attn.shape[1], b.num_kv_heads
        a, a2 = b.attn[0].double(), m.attn[0].double()
        zeros_v, zeros_o = torch.zeros_like(b.w_v), torch.zeros_like(b.w_o)
        d_v = deltas.get((b.index, modules[0]), zeros_v)
        d_o = deltas.get((b.index, modules[1]), zeros_o)
        dov = delta_ov(b.w_v, b.w_o, d_v, d_o, h, kv)
        ov = ov_stack(b.w_v, b.w_o, h, kv)
        op_merged = HVOOperator(a2, m.w_v.double(), m.w_o.double(), num_kv_heads=kv)
        op_base_weights = HVOOperator(a2, b.w_v.double(), b.w_o.double(), num_kv_heads=kv)
        errs = []
        for _ in range(PROBES):  # (W'(merged) − W'(base weights)) z against Σ_i A_i ⊗ ΔOV_i z, same A
            z = torch.randn(a.shape[-1], b.w_v.shape[1], generator=g, dtype=torch.float64)
            lhs = (op_merged.matvec(z.reshape(-1)) - op_base_weights.matvec(z.reshape(-1))).reshape(a.shape[-1], -1)
            rhs = apply_kron_sum(a2, dov, z)
            errs.append(((lhs - rhs).norm() / rhs.norm()).item())
        err = nan_max(errs)
        ranks = delta_ov_rank(b.w_v, b.w_o, d_v, d_o, h, kv)
        da = a2 - a
        pp, qq, pq = kron_sum_inner(da, ov, da, ov), kron_sum_inner(a2, dov, a2, dov), kron_sum_inner(da, ov, a2, dov)
        total = max(pp + qq + 2 * pq, 0.0) ** 0.5
        base_norm = kron_sum_inner(a, ov, a, ov) ** 0.5
        rows.append({"layer": b.index, "identity_relative_error": err, "rank_delta_ov": ranks, "rank_bound": 2 * rank,
                     "max_attention_change": da.abs().max().item(),
                     "relative_change": total / base_norm,
                     "attention_part": pp ** 0.5 / total if total else 0.0,
                     "weight_part": qq ** 0.5 / total if total else 0.0})
    return rows


def measure(model, inputs: dict, rank: int = RANK, seed: int = 0) -> dict:
    """The lora section: a value/output adapter and a query/key/value/output adapter of the same rank."""
    fam = family_of(model)
    base = attention_layers(model, **inputs)
    check_rank("rank", rank, base[0].x.shape[-1])
    result = {"rank": rank, "relative_size": RELATIVE_SIZE, "probes": PROBES}
    for key, modules in (("value_output", fam.value_out), ("query_key_value_output", fam.query_key + fam.value_out)):
        merged_model, deltas = adapt(model, modules, rank, seed)
        merged = attention_layers(merged_model, **inputs)
        rows = compare(base, merged, deltas, fam.value_out, rank, seed)
        result[key] = {"modules": list(modules), "layers": rows,
                       "max_identity_error": nan_max(r["identity_relative_error"] for r in rows),
                       "rank_bound_held": all(max(r["rank_delta_ov"]) <= 2 * rank for r in rows)}
        del merged_model
    return result
