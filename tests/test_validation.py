"""_validation's shared helpers for numbers: nan_max."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duat_kernels import _validation as v


def test_nan_max_keeps_a_nan_wherever_it_is():
    # Python's max skips a NaN after a number (NaN > x is false): a NaN layer error passed a tolerance check
    assert v.nan_max([1e-9, 3e-7, 2e-8]) == 3e-7
    assert v.nan_max([float("inf"), 1.0]) == float("inf")
    for values in ([1.0, float("nan")], [float("nan"), 1.0], [1.0, float("nan"), 2.0], [float("nan")]):
        assert v.nan_max(values) != v.nan_max(values)
    assert v.nan_max([], default=0.0) == 0.0
    with pytest.raises(ValueError):
        v.nan_max([])


def test_integer_refuses_bool_tensors():
    # a bool tensor's __index__ gives 0 or 1: torch.tensor(True) was taken as the int 1 (as bools are not)
    assert v.integer(torch.tensor(True)) is None and v.integer(True) is None
    assert v.integer(torch.tensor(3)) == 3 and v.integer(np.int8(3)) == 3
