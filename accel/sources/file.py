"""mesh.yaml as a table source, reloaded when the file changes.

A bad edit is logged and ignored: the last good table stays in force.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from accel import config
from accel.model import ServiceTable, ValidationError
from accel.sources import OnChange

log = logging.getLogger(__name__)


class FileSource:
    def __init__(self, path: str | Path, poll_interval: float = 0.2):
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._table = config.load(self.path)  # the first load must be good: raise otherwise
        self._stamp = self._stat()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> ServiceTable:
        return self._table

    def watch(self, on_change: OnChange) -> None:
        def loop() -> None:
            while not self._stop.wait(self.poll_interval):
                stamp = self._stat()
                if stamp is None or stamp == self._stamp:
                    continue
                self._stamp = stamp
                try:
                    table = config.load(self.path)
                except ValidationError as e:
                    self.last_error = str(e)
                    log.error("%s: %s (keeping the last good configuration)", self.path, e)
                    continue
                self.last_error = None
                if table.canonical() == self._table.canonical():
                    continue
                self._table = table
                try:
                    on_change(table)
                except Exception:  # the watcher must outlive a failing consumer
                    log.exception("applying %s failed", self.path)

        self._thread = threading.Thread(target=loop, name="file-source", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
