"""A table source fed by its caller: benchmarks and tests push tables to a controller."""

from __future__ import annotations

from accel.model import ServiceTable
from accel.sources import OnChange


class MemorySource:
    """TableSource whose table is whatever was pushed last (empty to begin with)."""

    def __init__(self, table: ServiceTable | None = None):
        self._table = table if table is not None else ServiceTable()
        self._on_change: OnChange | None = None

    def current(self) -> ServiceTable:
        return self._table

    def watch(self, on_change: OnChange) -> None:
        self._on_change = on_change

    def close(self) -> None:
        self._on_change = None

    def push(self, table: ServiceTable) -> None:
        self._table = table
        if self._on_change is not None:
            self._on_change(table)
