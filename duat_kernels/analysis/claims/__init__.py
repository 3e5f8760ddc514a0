"""The DUAT paper's claims (arXiv 2407.00958) as measurements on a real model: one module per section.

    density (§4.2), dynamic (§4.1), pruning (§4.3), lora (§4.4), multilayer (Eq. 11, App. C),
    contributions (norm-based, ALTI rollout); layer_terms freezes a model's layers on one input;
    report and plots write claims.md, claims.json and PNGs; cli is `duat claims`.

    results = duat_kernels.analysis.claims.measure_all(model, tokenizer, text)
"""

from duat_kernels.analysis.claims.run import SECTIONS, measure_all

__all__ = ["measure_all", "SECTIONS"]
