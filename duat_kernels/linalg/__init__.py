"""The math HVOOperator calls: block norms from the Gram factor, exact and sampled statistics,
spectra, norm contributions. Imports nothing above the operator (duat_kernels.analysis holds the
tools built on it)."""

from duat_kernels.linalg.norm_contributions import contributions
from duat_kernels.linalg.norms import block_norms, gram_factor
from duat_kernels.linalg.spectral import as_linear_operator, singular_values
from duat_kernels.linalg.stats import EntryEstimate, fraction_above, frobenius_norm, sample_entries, trace

__all__ = ["contributions", "block_norms", "gram_factor", "frobenius_norm", "trace", "sample_entries", "fraction_above",
           "EntryEstimate", "as_linear_operator", "singular_values"]
