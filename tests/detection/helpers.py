"""Detection runs after the commit, in a background thread on the embedded default:
tests wait for it before looking at its verdict."""

from __future__ import annotations

from tasks.detection import drain_in_process


def settled(timeout: float = 30.0) -> None:
    """Wait until the background detection handed over so far has finished."""
    assert drain_in_process(timeout), f"background detection still busy after {timeout}s"
