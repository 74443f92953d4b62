"""`--flow-log FILE`: every connection record as one JSON object per line, the file rotated
at a size (FILE.1 ... FILE.N kept), as logrotate-free access logs are."""

from __future__ import annotations

import json
import logging
import logging.handlers

from accel.flows.record import FlowRecord

MAX_BYTES = 64 << 20
BACKUPS = 5


class FlowLog:
    def __init__(self, path: str, max_bytes: int = MAX_BYTES, backups: int = BACKUPS):
        self.path = path
        # Opened now: a path the agent cannot write fails at start, not at the first record.
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._log = logging.Logger(f"accel.flowlog.{path}")
        self._log.propagate = False
        self._log.addHandler(self._handler)

    def write(self, records: list[FlowRecord]) -> None:
        for r in records:
            self._log.info(json.dumps(r.as_dict(), separators=(",", ":")))

    def close(self) -> None:
        self._handler.close()
