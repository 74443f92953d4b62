"""struct flow_event -> FlowRecord, a typed record with the service's name and plain
addresses. The layout comes from the maps' BTF, the enum names from lib/flows.h: the C
header stays the one definition of both."""

from __future__ import annotations

import ctypes
import ipaddress
import re
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from typing import Any

from accel.kernel.btf import BTF, STRUCT
from accel.kernel.loader import bpf_dir

KINDS = ("open", "close", "refused", "report")


@cache
def _enums() -> dict[str, dict[int, str]]:
    """enum flow_* of lib/flows.h: FLOW_R_NO_BACKEND = 1 -> {"reason": {1: "no_backend"}}."""
    text = (bpf_dir() / "lib" / "flows.h").read_text()
    out: dict[str, dict[int, str]] = {}
    for enum, prefix in (("flow_kind", "FLOW_"), ("flow_path", "FLOW_PATH_"),
                         ("flow_verdict", "FLOW_"), ("flow_reason", "FLOW_R_")):
        body = re.search(r"enum " + enum + r"\s*\{(.*?)\};", text, re.S)
        if not body:
            raise RuntimeError(f"enum {enum} not found in accel/bpf/lib/flows.h")
        out[enum.removeprefix("flow_")] = {
            int(v): n.removeprefix(prefix).lower()
            for n, v in re.findall(r"^\s*(FLOW_[A-Z0-9_]+)\s*=\s*(\d+)\s*,", body.group(1), re.M)}
    out["reason"][0] = ""
    return out


def event_type(btf: BTF) -> type:
    """The ctypes class of the ring's records (struct flow_event) in a BTF blob of the socket
    programs: the type of `leaf` in the ring's table struct (lib/flows.h ACCEL_RINGBUF)."""
    for t in btf.types:
        if t is not None and t.kind == STRUCT and t.name == "accel_flows_table_t":
            for name, tid, _bitoff, _bits in t.extra:
                if name == "leaf":
                    return btf.ctype(tid)
    raise RuntimeError("struct flow_event not in the socket programs' BTF (an older build?)")


@lru_cache(maxsize=65536)
def _addr(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    a = ipaddress.IPv6Address(raw)
    return a.ipv4_mapped or a


@lru_cache(maxsize=65536)
def _host(raw: bytes) -> str:
    """16 bytes of lib/common.h's address form -> "1.2.3.4" or "[::1]" (cached: a mesh has
    few addresses, and the reader decodes thousands of events a second)."""
    a = _addr(raw)
    return str(a) if a.version == 4 else f"[{a}]"


@lru_cache(maxsize=65536)
def namespace_of(service: str) -> str:
    """The namespace a controller's service name carries: `ns/host` (Istio ambient) or
    `name.ns.svc...` (Kubernetes hostnames); "" otherwise."""
    if "/" in service:
        return service.split("/", 1)[0]
    parts = service.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[1]
    return ""


@dataclass(slots=True)
class FlowRecord:
    """One event of one connection, as the client saw it."""

    event: str  # open | close | refused | report
    id: int  # the client socket's cookie: the connection's events share it
    time_start: float  # unix seconds
    time_end: float
    service: str
    namespace: str
    vip: str  # ip:port
    src: str  # the client, ip:port
    dst: str  # the endpoint, ip:port ("" when refused)
    bytes_sent: int
    bytes_received: int
    bytes_redirected: int
    path: str  # redirected | tcp
    verdict: str  # forwarded | dropped
    reason: str
    srtt_us: int
    retransmits: int
    client_netns: int
    server_netns: int
    service_index: int

    @property
    def duration(self) -> float:
        return max(0.0, self.time_end - self.time_start)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def boot_offset() -> float:
    """Unix time minus CLOCK_BOOTTIME, to place the kernel's timestamps."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


# struct flow_event's fields in order, padding left out (lib/flows.h).
EVENT_FIELDS = ("time_start", "time_end", "cookie", "client_netns", "server_netns",
                "bytes_sent", "bytes_received", "bytes_redirected", "client", "server", "vip",
                "client_port", "server_port", "vip_port", "kind", "path", "svc_index",
                "srtt_us", "retransmits", "verdict", "reason")


def _unpacker(layout: type) -> tuple[struct.Struct, tuple[str, ...]]:
    """A struct.Struct reading `layout` (a ctypes class from BTF) field by field, at the
    offsets BTF gave: unpacking a tuple is several times faster than ctypes attributes."""
    fmt, names, pos = "<", [], 0
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    for name, ctype in layout._fields_:
        if name == "pad" or name.startswith("_"):
            continue
        off, size = getattr(layout, name).offset, ctypes.sizeof(ctype)
        if off > pos:
            fmt += f"{off - pos}x"
        # Integers by their size; addresses (struct addr16) as their 16 bytes.
        simple = issubclass(ctype, ctypes._SimpleCData) and size in codes
        fmt += codes[size] if simple else f"{size}s"
        names.append(name)
        pos = off + size
    fmt += f"{ctypes.sizeof(layout) - pos}x"
    return struct.Struct(fmt), tuple(names)


Row = tuple  # one event as unpacked, in EVENT_FIELDS order: what the agent keeps
(T_START, T_END, COOKIE, _CLIENT_NETNS, _SERVER_NETNS, SENT, RECEIVED, _REDIRECTED, _CLIENT,
 SERVER, VIP, _CLIENT_PORT, SERVER_PORT, VIP_PORT, KIND, _PATH, SVC_INDEX, _SRTT, _RETRANS,
 _VERDICT, REASON) = range(len(EVENT_FIELDS))


class Decoder:
    """struct flow_event bytes -> a Row (cheap: what the agent does for every event) ->
    a FlowRecord (on demand: for a reader, the flow log). `names(vip, port)` gives the
    service of a VIP:port in the table in force."""

    def __init__(self, layout: type, names: Callable[[Any, int], str]):
        self.struct, fields = _unpacker(layout)
        if fields != EVENT_FIELDS:  # the order the rows are read in
            raise RuntimeError(f"struct flow_event has fields {fields}, expected {EVENT_FIELDS}")
        self.names = names
        e = _enums()
        self.kind, self.path, self.verdict, self.reason = (
            e["kind"], e["path"], e["verdict"], e["reason"])
        self.kinds = {v: k for k, v in self.kind.items()}  # "open" -> its number
        self.offset = boot_offset()
        self._services: dict[tuple[bytes, int], tuple[str, str]] = {}

    def row(self, raw: bytes) -> Row:
        return self.struct.unpack_from(raw)

    def forget_names(self) -> None:
        """The table changed: services are named afresh."""
        self._services = {}

    def service(self, row: Row) -> tuple[str, str]:
        """(service, namespace) of a row, cached by VIP:port."""
        key = (row[VIP], row[VIP_PORT])
        found = self._services.get(key)
        if found is None:
            index = row[SVC_INDEX]
            name = self.names(_addr(key[0]), key[1]) or (
                str(index) if index != 0xFFFFFFFF else "")
            found = self._services[key] = (name, namespace_of(name))
        return found

    def unix(self, boot_ns: int) -> float:
        return round(self.offset + boot_ns / 1e9, 6)

    def boot_ns(self, unix: float) -> int:
        return int((unix - self.offset) * 1e9)

    def record(self, row: Row) -> FlowRecord:
        (time_start, time_end, cookie, client_netns, server_netns, sent, received, redirected,
         client, server, vip, client_port, server_port, vip_port, kind, path, svc_index, srtt,
         retrans, verdict, reason) = row
        service, namespace = self.service(row)
        refused = kind == 3
        return FlowRecord(
            self.kind.get(kind, str(kind)), cookie, self.unix(time_start), self.unix(time_end),
            service, namespace, f"{_host(vip)}:{vip_port}",
            "" if refused and not client_port else f"{_host(client)}:{client_port}",
            "" if refused else endpoint(server, server_port),
            sent, received, redirected, self.path.get(path, str(path)),
            self.verdict.get(verdict, str(verdict)), self.reason.get(reason, str(reason)),
            srtt, retrans, client_netns, server_netns, svc_index)

    def __call__(self, raw: bytes) -> FlowRecord:
        return self.record(self.row(raw))


def endpoint(addr: bytes, port: int) -> str:
    return f"{_host(addr)}:{port}"
