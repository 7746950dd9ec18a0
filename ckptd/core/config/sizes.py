"""Sizes in configuration and on the command line: an integer (bytes) or a number with a unit
("512MiB", "8GiB", "1.5GB"). Pure: no I/O.

Invariants: a size is a non-negative int of bytes; anything else is an InvalidArgument naming the
key it was given for (a bool is not a size; an overflowing number is out of range, not inf).
"""

from __future__ import annotations

import re
from typing import Any, Final

from ckptd.core.errors import InvalidArgument

_UNITS: Final = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
                 "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(value: Any, key: str) -> int:
    """Parse an int or a "<number><unit>" string into bytes."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{key}: expected a size, got a bool")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise InvalidArgument(f"{key}: cannot parse size {value!r} (try 512MiB or 8GiB)")
        try:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        except OverflowError:  # "1000...0MiB" with hundreds of digits is infinite as a float
            raise InvalidArgument(f"{key}: size {value[:40]!r} is out of range") from None
    else:
        raise InvalidArgument(f"{key}: expected a size, got {type(value).__name__}")
    if n < 0:
        raise InvalidArgument(f"{key}: size must not be negative")
    return n
