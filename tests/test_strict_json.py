"""strict_json: JSON text that strict parsers accept, non-finite floats written as null."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from duat_kernels import strict_json


def _strict(constant):
    raise ValueError(f"not JSON: bare {constant}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float64("nan"), np.float64("-inf")],
                         ids=["nan", "inf", "-inf", "np-nan", "np-inf"])
def test_non_finite_floats_are_null_at_any_depth(bad):
    value = {"a": bad, "b": [1.5, bad, (bad, 2)], "c": {"d": [[bad]]}, "e": "NaN", "f": None, "g": True, "h": 3}
    text = strict_json.dumps(value, indent=1)
    assert json.loads(text, parse_constant=_strict) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": [[None]]},
                                                        "e": "NaN", "f": None, "g": True, "h": 3}
    assert not math.isfinite(bad)  # the input is left as it was
    assert value["a"] is bad


@pytest.mark.parametrize("value", [0.1, -1e308, 5e-324, 1 / 3, np.float64(2.5)])
def test_finite_floats_round_trip_exactly(value):
    assert json.loads(strict_json.dumps({"x": [value]}))["x"][0] == value


def test_a_non_finite_number_it_cannot_see_raises():
    # what json's default= hook returns is not walked: allow_nan=False refuses it instead of writing NaN
    with pytest.raises(ValueError, match="not JSON compliant"):
        strict_json.dumps({"x": object()}, default=lambda o: float("nan"))


def test_numpy_numbers_of_any_width():
    # NumPy float32/float16 and integers failed in json.dumps ("Object of type float32 is not JSON serializable")
    import numpy as np

    value = {"a": np.float32(1.5), "b": np.float32("nan"), "c": np.float16("inf"), "d": np.int64(3), "e": [np.int32(-1)]}
    assert strict_json.dumps(value) == '{"a": 1.5, "b": null, "c": null, "d": 3, "e": [-1]}'
