"""The agent's end of the flow ring: the pinned ring (accel/kernel/ringbuf.py) read by
polling, each event decoded to a FlowRecord, and the kernel's own counts of what it wrote
and dropped (accel_flow_stats). No bcc: bpf(2) and mmap only."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from accel.flows.record import Decoder, Row, event_type
from accel.kernel.maps import Map, _btf
from accel.kernel.ringbuf import RingBuffer
from accel.model import IPAddress

RING = "accel_flows"
STATS = "accel_flow_stats"
CONFIG = "accel_flow_config"

Names = Callable[[IPAddress, int], str]


def set_enabled(pin_dir: str, on: bool) -> None:
    """Flow events on or off at run time (lib/flows.h: off, new sockets get no flow state)."""
    with Map.open(os.path.join(pin_dir, CONFIG)) as m:
        v = m.Leaf()
        v.enabled = int(on)
        m[ctypes.c_uint32(0)] = v


def kernel_stats(pin_dir: str) -> dict[str, int]:
    """Events the programs wrote to the ring and dropped (ring full), summed over CPUs."""
    with Map.open(os.path.join(pin_dir, STATS)) as m:
        cpus = m.get(ctypes.c_uint32(0)) or []
        return {"events": int(sum(c.events for c in cpus)),
                "dropped": int(sum(c.dropped for c in cpus))}


class FlowReader:
    def __init__(self, pin_dir: str, names: Names):
        self.pin_dir = pin_dir
        self.ring = RingBuffer.open(os.path.join(pin_dir, RING))
        with Map.open(os.path.join(pin_dir, STATS)) as stats:
            # sockops.c created the maps: its BTF holds struct flow_event.
            layout = event_type(_btf(stats.info.btf_id))
        self.decode = Decoder(layout, names)
        self.undecodable = 0

    def poll(self) -> list[Row]:
        """The events committed since the last poll, as rows (decode.record makes one a
        FlowRecord)."""
        out = []
        row = self.decode.row
        for raw in self.ring.read():
            try:
                out.append(row(raw))
            except Exception:  # struct.error: a record shorter than the layout
                self.undecodable += 1
        return out

    def stats(self) -> dict[str, int]:
        return kernel_stats(self.pin_dir)

    def close(self) -> None:
        self.ring.close()
