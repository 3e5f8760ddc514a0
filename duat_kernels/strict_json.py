"""The JSON text of every file duat writes (reports, page data, progress records, caches).

Python's json writes NaN, inf and -inf as the bare words NaN, Infinity and -Infinity, which are not
JSON: JavaScript's JSON.parse, jq and other strict parsers refuse the whole file. Here a non-finite
float is written as null (as JavaScript's JSON.stringify writes it), and json.dumps runs with
allow_nan=False, so a non-finite value that escapes the conversion raises instead of writing bad JSON.
A reader of these files sees null where a measurement was NaN or infinite.
"""

from __future__ import annotations

import json
import math
import numbers


def finite_or_null(value):
    """value with every non-finite float (NaN, inf, -inf; NumPy floats of any width too) inside its dicts,
    lists and tuples replaced by None; NumPy numbers become Python ones and tuples lists, as json writes them."""
    if isinstance(value, numbers.Integral) and not isinstance(value, int):  # NumPy integers: json refuses them
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, int):  # float, NumPy float16/32/64
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def dumps(value, **kwargs) -> str:
    """json.dumps(value, **kwargs) with non-finite floats as null, refusing (ValueError) any it missed."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
