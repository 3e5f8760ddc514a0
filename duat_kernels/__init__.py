"""duat-kernels: the DUAT operator W'_HVO of multi-head attention, materialised and analysed.

    W' = Σ_i A_i ⊗ OV_i   (token layout),   h' = W' x' + b'

with reference (PyTorch) and C++ (CPU) backends behind one API. See DESIGN.md and README.md.
"""

from duat_kernels._validation import DenseTooLargeError
from duat_kernels.backends import available_backends
from duat_kernels.hvo import hvo_bias, hvo_matrix, ov_circuits
from duat_kernels.hvo_operator import HVOOperator
from duat_kernels import models  # noqa: E402  (imports transformers lazily, on first load)

__version__ = "0.1.0"
__all__ = ["hvo_matrix", "hvo_bias", "ov_circuits", "HVOOperator", "available_backends", "DenseTooLargeError"]
