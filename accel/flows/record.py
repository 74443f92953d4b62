"""struct flow_event -> FlowRecord, a typed record with the service's name and plain
addresses. The layout comes from the maps' BTF, the enum names from lib/flows.h: the C
header stays the one definition of both."""

from __future__ import annotations

import ctypes
import ipaddress
import re
import time
from dataclasses import asdict, dataclass
from functools import cache
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


def _addr(words: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes(words)
    a = ipaddress.IPv6Address(raw)
    return a.ipv4_mapped or a


def _hostport(words: Any, port: int) -> str:
    a = _addr(words)
    return f"[{a}]:{port}" if a.version == 6 else f"{a}:{port}"


def namespace_of(service: str) -> str:
    """The namespace a controller's service name carries: `ns/host` (Istio ambient) or
    `name.ns.svc...` (Kubernetes hostnames); "" otherwise."""
    if "/" in service:
        return service.split("/", 1)[0]
    parts = service.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[1]
    return ""


@dataclass(frozen=True)
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


class Decoder:
    """Bytes of a struct flow_event -> FlowRecord; `names(vip, port)` gives the service."""

    def __init__(self, layout: type, names):
        self.layout = layout
        self.names = names
        self.enums = _enums()
        self.offset = boot_offset()

    def __call__(self, raw: bytes) -> FlowRecord:
        e = self.layout.from_buffer_copy(raw.ljust(ctypes.sizeof(self.layout), b"\0"))
        vip = _addr(e.vip)
        service = self.names(vip, e.vip_port) or (
            str(e.svc_index) if e.svc_index != 0xFFFFFFFF else "")
        refused = e.kind == 3
        return FlowRecord(
            event=self.enums["kind"].get(e.kind, str(e.kind)),
            id=e.cookie,
            time_start=round(self.offset + e.time_start / 1e9, 6),
            time_end=round(self.offset + e.time_end / 1e9, 6),
            service=service,
            namespace=namespace_of(service),
            vip=_hostport(e.vip, e.vip_port),
            src="" if refused and not e.client_port else _hostport(e.client, e.client_port),
            dst="" if refused else _hostport(e.server, e.server_port),
            bytes_sent=e.bytes_sent,
            bytes_received=e.bytes_received,
            bytes_redirected=e.bytes_redirected,
            path=self.enums["path"].get(e.path, str(e.path)),
            verdict=self.enums["verdict"].get(e.verdict, str(e.verdict)),
            reason=self.enums["reason"].get(e.reason, str(e.reason)),
            srtt_us=e.srtt_us,
            retransmits=e.retransmits,
            client_netns=e.client_netns,
            server_netns=e.server_netns,
            service_index=e.svc_index,
        )
