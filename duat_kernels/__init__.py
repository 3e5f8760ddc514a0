"""duat-kernels: the DUAT operator W'_HVO of multi-head attention, materialised and analysed.

    W' = Σ_i A_i ⊗ OV_i   (token layout),   h' = W' x' + b'

with reference (PyTorch), C++ (CPU) and Triton (GPU) backends behind one API, a matrix-free
operator for long sequences (its math in duat_kernels.linalg, tools on it in duat_kernels.analysis)
and model adapters (duat_kernels.models).
"""

from duat_kernels._memory import DenseTooLargeError
from duat_kernels.backends import available_backends
from duat_kernels.cpp import cpu_capability
from duat_kernels.hvo import hvo_bias, hvo_matrix, ov_circuits
from duat_kernels.hvo_operator import HVOOperator
from duat_kernels import analysis  # the tools on the operator (save_dense, zarr); after HVOOperator, which they import
from duat_kernels import models  # noqa: E402  (imports transformers lazily, on first load)

__version__ = "0.1.0"
__all__ = ["hvo_matrix", "hvo_bias", "ov_circuits", "HVOOperator", "available_backends", "cpu_capability", "DenseTooLargeError",
           "analysis", "models"]
