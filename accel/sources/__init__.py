"""Where a ServiceTable comes from: a mesh.yaml file, Docker, or (in the agent) xDS.

A source gives the current table and calls back with each new valid table.
The controller serves whatever its source yields; the agent applies it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from accel.model import ServiceTable

OnChange = Callable[[ServiceTable], None]


class TableSource(Protocol):
    def current(self) -> ServiceTable:
        """The latest valid table (raises ValidationError if there never was one)."""
        ...

    def watch(self, on_change: OnChange) -> None:
        """Start watching (a daemon thread); call on_change with every new valid table."""
        ...

    def close(self) -> None: ...
