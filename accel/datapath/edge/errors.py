"""The edge's errors: what a caller of EdgeDatapath catches."""

from __future__ import annotations


class EdgeError(RuntimeError):
    """The edge could not be set up as asked; the message says what to change."""


class EdgeCapacityError(EdgeError, ValueError):
    """The table does not fit the maps (too many VIPs or backends); nothing was changed."""
