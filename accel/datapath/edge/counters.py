"""The edge's counters: global ones (enum edge_counter in accel/bpf/lib/edge.h, per CPU) and
per VIP ones (edge_vip_stats), read from the pinned maps."""

from __future__ import annotations

import ctypes
import ipaddress
import re
import socket
from collections.abc import Callable
from pathlib import Path

from accel.datapath.edge.encoding import PROTO_NAMES
from accel.datapath.edge.programs import EDGE_H
from accel.datapath.edge.vips import VIP_LIVE
from accel.kernel.maps import Map

VIP_STAT_FIELDS = (
    "packets", "bytes", "new_flows", "drop_deny", "drop_syn", "drop_no_backend",
    "conn_full", "reply_packets", "reply_bytes", "refused_limit",
)


def counter_names(header: Path = EDGE_H) -> list[tuple[str, str]]:
    """(name, meaning) of each global counter, in enum order, from edge.h."""
    text = header.read_text()
    body = text[text.index("enum edge_counter") :]
    body = body[: body.index("};")]
    out = []
    for m in re.finditer(r"^\s*E_(\w+)(?:\s*=\s*\d+)?,\s*/\*\s*(.*?)\s*\*/", body, re.M):
        out.append((m.group(1).lower(), m.group(2)))
    return out


def read_counters(table: Callable[[str], Map], names: dict | None = None) -> dict:
    """Counters from the edge's maps (`table(name)`: the agent's, or a reader's over the
    pins)."""
    glob = {}
    t = table("edge_counters")
    for i, (name, _) in enumerate(counter_names()):
        glob[name] = int(sum(t[ctypes.c_uint32(i)]))
    vips = []
    stats = table("edge_vip_stats")
    for _, v in table("edge_vips").items():
        if v.state != VIP_LIVE:
            continue
        k = v.key
        addr = ipaddress.IPv6Address(bytes(ctypes.string_at(ctypes.addressof(k.addr), 16)))
        addr = addr.ipv4_mapped or addr
        key = (addr, socket.ntohs(k.port), PROTO_NAMES.get(k.proto, str(k.proto)))
        per_cpu = stats[ctypes.c_uint32(v.id)]
        row = {"service": (names or {}).get(key, ""), "vip": str(key[0]), "port": key[1],
               "protocol": key[2]}
        for f in VIP_STAT_FIELDS:
            row[f] = int(sum(getattr(c, f) for c in per_cpu))
        vips.append(row)
    vips.sort(key=lambda r: (r["service"], r["vip"], r["port"]))
    return {"global": glob, "vips": vips}
