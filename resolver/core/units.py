"""Quantities as people read them: one formatting for every report, the learn comments and the page."""

from __future__ import annotations


def human_bytes(n: int | None) -> str:
    """12345 -> '12.3 KB', 13_000_000 -> '13 MB' (decimal units, like [report] upload_warn_mb)."""
    if n is None:
        return "-"
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
