"""_memory: the byte counts in the messages of DenseTooLargeError."""

from __future__ import annotations

import pytest

from duat_kernels._memory import format_bytes


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 30, "5.0 GiB"), (3 << 50, "3.0 PiB"),
    (6548574.9 * (1 << 50), "6.55e+06 PiB"),  # was '6548574.9 PiB'
    (10 ** 56, "8.88e+40 PiB"),  # was a 41-digit number of PiB
])
def test_format_bytes_stays_short(n, text):
    assert format_bytes(n) == text
