"""Durations for people, one format for the command line and the Slicer panel (torch-free, imports nothing)."""

from __future__ import annotations

from typing import Optional


def format_seconds(seconds: Optional[float]) -> str:
    """A duration for people: "40 s", "2 min 05 s", "1 h 05 min" ("unknown" for None or NaN; negatives as 0 s)."""
    if seconds is None or seconds != seconds:
        return "unknown"
    whole = max(0, int(round(seconds)))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {(whole % 3600) // 60:02d} min"
