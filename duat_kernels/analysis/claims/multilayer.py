"""§ multilayer (Eq. 11, App. C): the hidden state after layer L rebuilt from x_0 alone.

h_L = T_{L-1}(… T_0(x_0)) with each T_l the layer's frozen affine map (layer_terms). Split into the
part that x_0 carries through the product of the linear maps and the part the constant terms
(b', β, b1, b2) carry: h_L = Lin_L x_0 + c_L, Lin_L x_0 = linear replay of x_0, c_L = affine replay of 0.
"""

from __future__ import annotations

import torch

from duat_kernels._validation import nan_max
from duat_kernels.analysis.claims.layer_terms import LayerTerms, replay

# fp32 models must be rebuilt to this relative error (the bound).
TOLERANCE = 1e-4


def rebuild(terms: list[LayerTerms]) -> list[dict]:
    """One row per layer L: relative error of Lin_L x_0 + c_L against the model's h_L, and the shares
    ||Lin_L x_0|| / ||h_L|| and ||c_L|| / ||h_L||. Everything in float64 from the frozen terms."""
    x0 = terms[0].h_in
    linear, constant = x0, torch.zeros_like(x0)
    rows = []
    for t in terms:
        with torch.no_grad():
            linear = replay(t, linear, with_bias=False)
            constant = replay(t, constant, with_bias=True)
        target = t.h_out
        ref = target.norm().item()
        rows.append({"layer": t.attention.index,
                     "relative_error": ((linear + constant) - target).norm().item() / ref,
                     "one_layer_error": (replay(t, t.h_in) - target).norm().item() / ref,
                     "input_share": linear.norm().item() / ref, "constant_share": constant.norm().item() / ref})
    return rows


def summarise(rows: list[dict], tolerance: float = TOLERANCE) -> dict:
    largest = nan_max(r["relative_error"] for r in rows)
    return {"tolerance": tolerance, "max_relative_error": largest, "held": largest <= tolerance, "layers": rows}
