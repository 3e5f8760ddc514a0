"""§ dynamic (§4.1): W' changes with the task prompt; a feed-forward layer's linear maps do not.

The passage is run alone and behind each task prompt. For the passage's own tokens P, the W' blocks
they share are Σ_i A_i[P, P] ⊗ OV_i; the relative Frobenius distance to the bare passage's is
||Σ_i ΔA_i[P, P] ⊗ OV_i||_F / ||Σ_i A_i[P, P] ⊗ OV_i||_F, exact from the block norms of the operator
with ΔA in place of A (W' is linear in A). The FFN's linear maps (I ⊗ W) are the same tensors under
every prompt: distance 0. Its linearised form W2 diag(D_n) W1 still moves with the input through D_n:
||W2 diag(δ) W1||_F² = δᵀ ((W2ᵀW2) ⊙ (W1W1ᵀ)) δ per token, reported beside it.
"""

from __future__ import annotations

import torch

from duat_kernels.analysis.claims.layer_terms import LayerTerms, collect
from duat_kernels.hvo_operator import HVOOperator

PROMPTS = ("Summarize the following text: ", "Translate into French: ", "Is the following statement true? ")


def prompted_inputs(tokenizer, passage: str, prompt: str) -> tuple[dict, list[int]]:
    """Token ids of the passage behind the prompt (inserted after any leading special tokens) and the
    positions of the passage's own tokens."""
    full = tokenizer(passage)["input_ids"]
    body = tokenizer(passage, add_special_tokens=False)["input_ids"]
    start = next((k for k in range(len(full) - len(body) + 1) if full[k:k + len(body)] == body), None)
    if start is None:
        raise ValueError(f"could not find the passage's tokens inside its own encoding {full!r}")
    extra = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    ids = full[:start] + extra + full[start:]
    positions = list(range(start + len(extra), start + len(extra) + len(body)))
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}, positions


def attention_distance(base: LayerTerms, other: LayerTerms, p_base: list[int], p_other: list[int]) -> float:
    """Relative Frobenius distance between the shared-token W' blocks of two runs of the same layer."""
    a, b = base.attention, other.attention
    attn_base = a.attn[0][:, p_base][:, :, p_base].double()
    diff = b.attn[0][:, p_other][:, :, p_other].double() - attn_base
    norm = lambda attn: HVOOperator(attn, a.w_v.double(), a.w_o.double(), num_kv_heads=a.num_kv_heads).frobenius_norm()
    return (norm(diff) / norm(attn_base)).item()


def first_token_attention(terms: LayerTerms, positions: list[int]) -> float:
    """Mean attention of the passage's tokens on the passage's first token (over heads and query tokens)."""
    attn = terms.attention.attn[0]
    return attn[:, positions][:, :, positions[0]].double().mean().item()


def ffn_gram(terms: LayerTerms) -> torch.Tensor:
    """(W2ᵀW2) ⊙ (W1W1ᵀ), (F, F): ||W2 diag(δ) W1||_F² = δᵀ G δ."""
    w_in, w_out = terms.ffn_matrices()
    return (w_out.T @ w_out) * (w_in @ w_in.T)


def linearised_ffn_distance(base: LayerTerms, other: LayerTerms, p_base: list[int], p_other: list[int],
                            gram: torch.Tensor) -> float:
    """Relative Frobenius distance between the shared tokens' linearised FFNs W2 diag(D_n) W1 (gram: ffn_gram)."""
    d_base, d_other = base.gate[p_base], other.gate[p_other]
    sq = lambda d: torch.einsum("nf,fg,ng->", d, gram, d)
    return (sq(d_other - d_base).clamp_min(0).sqrt() / sq(d_base).sqrt()).item()


def measure(model, tokenizer, passage: str, prompts=PROMPTS, base: list[LayerTerms] | None = None,
            progress: bool = True) -> dict:
    """The dynamic section: per layer and prompt, the distances of W' (and of the FFN) to the bare passage.
    base: the passage's own LayerTerms when already collected (from prompted_inputs(tokenizer, passage, ""));
    progress: a tqdm bar over the prompts."""
    from tqdm import tqdm

    base_inputs, p_base = prompted_inputs(tokenizer, passage, "")
    base = base if base is not None else collect(model, base_inputs)
    rows = {t.attention.index: {"layer": t.attention.index, "attention": {}, "ffn_linear_maps": {},
                                "ffn_linearised": {},
                                "first_token_attention": {"alone": first_token_attention(t, p_base), "prompted": {}}}
            for t in base}
    grams = [ffn_gram(t) for t in base]
    for prompt in tqdm(prompts, desc="dynamic", leave=False, disable=not progress):
        inputs, p_other = prompted_inputs(tokenizer, passage, prompt)
        for b, o, gram in zip(base, collect(model, inputs), grams):
            row = rows[b.attention.index]
            row["attention"][prompt] = attention_distance(b, o, p_base, p_other)
            same = [(x - y).norm().item() for x, y in zip(b.ffn_matrices(), o.ffn_matrices())]
            row["ffn_linear_maps"][prompt] = max(same)  # the same weight tensors: exactly 0
            row["first_token_attention"]["prompted"][prompt] = first_token_attention(o, p_other)
            row["ffn_linearised"][prompt] = linearised_ffn_distance(b, o, p_base, p_other, gram)
    return {"passage": passage, "prompts": list(prompts), "shared_tokens": len(p_base),
            "ffn_linear_maps_exactly_zero": all(v == 0.0 for r in rows.values() for v in r["ffn_linear_maps"].values()),
            "layers": list(rows.values())}
