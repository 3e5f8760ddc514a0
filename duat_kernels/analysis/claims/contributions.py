"""§ contributions: token-to-token contributions of each attention layer and their rollout.

||W'_nm x_m|| is the norm-based contribution of Kobayashi et al. (2020): block (n, m) of W' applied
to input token m, per head ||A_i[n, m] OV_i x_m|| and summed; the bias b'_n is a term of its own.
ALTI-style (Ferrando et al. 2022): each layer's attention block writes y_n = Σ_m T_n(x_m) (+ its
constant), with T_n(x_m) = L_n(W'_nm x_m + δ_nm x_n) (the residual goes to its own token; L_n the frozen
post-LayerNorm for BERT, identity for pre-norm Llama, whose W' acts on RMS(h)); the contribution of m
to n is max(0, ||y_n||₁ − ||y_n − T_n(x_m)||₁), normalised over m, and rolled out by multiplying the
layers' matrices (the FFN acts token by token and mixes nothing).
"""

from __future__ import annotations

import torch

from duat_kernels.analysis.claims.layer_terms import LayerTerms
from duat_kernels.linalg.norm_contributions import projected_values

PER_HEAD_MAX_TOKENS = 64  # the JSON keeps every head's (N, N) map up to this N (h·N² numbers per layer)
ROLLOUT_MAX_TOKENS = 256  # the (N, N, M) transformed vectors stay under ~300 MB (float64, M = 576)


def pair_vectors(t: LayerTerms) -> torch.Tensor:
    """W'_nm x_m for all (n, m): (N, N, M_out), float64, from the projected values u_i[m] = OV_i x_m."""
    a = t.attention
    u = projected_values(a.x[:1].double(), a.w_v, a.w_o, a.attn.shape[1], a.num_kv_heads)[0]  # (h, N, M_out)
    return torch.einsum("inm,imc->nmc", a.attn[0].double(), u)


def transformed_vectors(t: LayerTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_n(x_m) as (N, N, M), the constant part of y_n as (N, M)) for the layer's attention block."""
    pairs = pair_vectors(t)
    n = pairs.shape[0]
    eye = torch.arange(n)
    bias = t.operator().bias().reshape(n, -1)
    if t.style == "post_ln":  # L_n(W'_nm x_m + δ_nm x_n), L_n per output token n
        pairs[eye, eye] += t.h_in
        scale, gamma, beta = t.norm_attn
        lin = lambda v, s: gamma * ((v - v.mean(-1, keepdim=True)) * s)
        return lin(pairs, scale[:, None]), lin(bias, scale) + beta
    pairs[eye, eye] += t.h_in
    return pairs, bias


def alti_matrix(t: LayerTerms) -> torch.Tensor:
    """The layer's row-normalised ALTI contribution matrix (N, N)."""
    vectors, _ = transformed_vectors(t)
    y = vectors.sum(1, keepdim=True)  # (N, 1, M)
    c = (y.abs().sum(-1) - (y - vectors).abs().sum(-1)).clamp_min(0)
    return c / c.sum(1, keepdim=True)


def measure(terms: list[LayerTerms]) -> dict:
    """The contributions section: per layer the summed (N, N) map, each head's (h, N, N) map (up to
    PER_HEAD_MAX_TOKENS tokens) and share, the bias norms ||b'_n||, and the ALTI rollout (N, N)
    (skipped beyond ROLLOUT_MAX_TOKENS tokens)."""
    rows = []
    n = terms[0].h_in.shape[0]
    rollout = torch.eye(n, dtype=torch.float64) if n <= ROLLOUT_MAX_TOKENS else None
    for t in terms:
        op, x = t.operator(), t.attention.x[0].double()
        summed = op.contributions(x)
        per_head = op.contributions(x, per_head=True)
        bias = op.bias().reshape(n, -1).norm(dim=-1)
        output = (op.matvec(x.reshape(-1)) + op.bias()).reshape(n, -1).norm(dim=-1)
        row = {"layer": t.attention.index, "summed": summed.tolist(), "bias_norm": bias.tolist(),
               "output_norm": output.tolist(),
               "head_share": (per_head.sum((1, 2)) / per_head.sum()).tolist(),
               "self_share": (summed.diagonal().sum() / summed.sum()).item(),
               "bias_to_token_ratio": (bias / summed.sum(1)).mean().item()}
        if n <= PER_HEAD_MAX_TOKENS:
            row["per_head"] = per_head.tolist()
        if rollout is not None:
            alti = alti_matrix(t)
            rollout = alti @ rollout
            row["alti"] = alti.tolist()
        rows.append(row)
    return {"tokens": n, "layers": rows, "rollout": None if rollout is None else rollout.tolist(),
            "rollout_skipped": None if rollout is not None else f"N = {n} > {ROLLOUT_MAX_TOKENS} tokens"}
