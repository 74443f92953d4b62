"""The runtime's flows part: reads the ring every POLL_S into the store (history,
subscribers, per-service totals) and the flow log, and names each record's service from the
table in force (it is a Part: each table applied reaches it)."""

from __future__ import annotations

import logging
import threading

from accel.flows.log import FlowLog
from accel.flows.reader import FlowReader, set_enabled
from accel.flows.store import HISTORY, FlowStore
from accel.model import IPAddress, ServiceTable

log = logging.getLogger(__name__)

POLL_S = 0.1  # the ring holds ~6,000 events per MiB: 60,000 connections/s before a drop


class FlowsPart:
    name = "flows"

    def __init__(self, pin_dir: str, flow_log: str | None = None, history: int = HISTORY):
        self.pin_dir = pin_dir
        self._names: dict[tuple[IPAddress, int], str] = {}
        self.log = FlowLog(flow_log) if flow_log else None
        self.reader = FlowReader(pin_dir, self.name_of)
        self.store = FlowStore(self.reader.decode, history)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flows", daemon=True)

    def name_of(self, vip: IPAddress, port: int) -> str:
        return self._names.get((vip, port), "")

    def check(self, table: ServiceTable) -> None:
        pass

    def apply(self, table: ServiceTable) -> None:
        # Replaced whole: a reader thread sees the old or the new dict, never half of one.
        self._names = {(s.vip, s.port): s.name for s in table.services}
        self.reader.decode.forget_names()

    def start(self) -> FlowsPart:
        set_enabled(self.pin_dir, True)
        self._thread.start()
        return self

    def poll(self) -> int:
        rows = self.reader.poll()
        if rows:
            self.store.add(rows)
            if self.log is not None:
                self.log.write([self.reader.decode.record(r) for r in rows])
        return len(rows)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                while self.poll() > 0:  # drain a busy ring before sleeping again
                    pass
            except Exception as e:  # never let a bad read stop the agent
                log.warning("flows: %s", e)

    def stats(self) -> dict[str, int]:
        return {**self.reader.stats(), "read": self.store.received,
                "watch_dropped": self.store.watch_dropped,
                "undecodable": self.reader.undecodable}

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.poll()  # what the last connections left
        self.reader.close()
        if self.log is not None:
            self.log.close()
