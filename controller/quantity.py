"""Kubernetes memory quantities ("512Mi", "2Gi", "1.5G", "1000000") as integers and back.

The OOM retry multiplies the last attempt's memory limit and caps it; doing that arithmetic
on bytes and printing the result in the largest exact binary unit keeps the value that lands
on the row (and in the next Job spec) readable: 2Gi x 2 is "4Gi", not "4294967296".
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

_SUFFIX = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(k|M|G|T|Ki|Mi|Gi|Ti)?$")


def parse_bytes(quantity: str) -> int:
    """Bytes in a memory quantity, rounded up; ValueError names the bad value."""
    match = _QUANTITY.match(quantity.strip())
    if not match:
        raise ValueError(f"{quantity!r} is not a memory quantity such as 512Mi or 2Gi")
    try:
        number = Decimal(match[1])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{quantity!r} is not a number") from None
    return math.ceil(number * _SUFFIX[match[2] or ""])


def format_bytes(value: int) -> str:
    """The shortest exact binary quantity for `value` bytes ("4Gi", "1536Mi", "1000")."""
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        unit = _SUFFIX[suffix]
        if value >= unit and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


def scale_memory(quantity: str, factor: float, cap: str) -> str:
    """`quantity` x `factor`, rounded up to whole MiB, never above `cap`."""
    scaled = math.ceil(parse_bytes(quantity) * factor / 2**20) * 2**20
    return format_bytes(min(scaled, parse_bytes(cap)))
