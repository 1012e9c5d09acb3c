"""Durations as operators type them ("90s", "15m", "4h", "3d", "1h30m")."""

from __future__ import annotations

import math
import re

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number of seconds, or parts with units
    (s, m, h, d) such as "4h" or "1h30m"; ValueError otherwise."""
    t = text.strip().lower()
    try:
        value = float(t)
    except ValueError:
        parts = _PART.findall(t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 4h, 3d)") from None
        value = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return value


def format_duration(seconds: float) -> str:
    """Whole seconds as the largest units: 14400 → "4h", 5400 → "1h30m"."""
    left = max(round(seconds), 0)
    if left == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, left = divmod(left, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)
