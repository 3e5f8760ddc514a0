"""Tools built on HVOOperator: out-of-core materialisation (save_dense), W' as a Dask array and a
checksummed zarr store, scaling sweeps (duat scale) and the claims report (duat claims). The math
the operator itself calls lives in duat_kernels.linalg."""

from duat_kernels.analysis.dask_tiles import to_dask
from duat_kernels.analysis.out_of_core import save_dense
from duat_kernels.analysis.zarr_store import save_zarr, verify_zarr

__all__ = ["save_dense", "to_dask", "save_zarr", "verify_zarr"]
