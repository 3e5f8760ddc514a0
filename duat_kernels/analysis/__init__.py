"""Analysis of W' without materialising it: block norms, exact and sampled statistics, spectra,
out-of-core materialisation and scaling sweeps."""

from duat_kernels.analysis.dask_tiles import to_dask
from duat_kernels.analysis.norm_contributions import contributions
from duat_kernels.analysis.norms import block_norms, gram_factor
from duat_kernels.analysis.out_of_core import save_dense
from duat_kernels.analysis.spectral import as_linear_operator, singular_values
from duat_kernels.analysis.stats import EntryEstimate, fraction_above, frobenius_norm, sample_entries, trace
from duat_kernels.analysis.zarr_store import save_zarr, verify_zarr

__all__ = ["contributions", "block_norms", "gram_factor", "frobenius_norm", "trace", "sample_entries", "fraction_above", "EntryEstimate",
           "as_linear_operator", "singular_values", "save_dense",
           "to_dask", "save_zarr", "verify_zarr"]
