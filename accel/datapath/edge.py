"""The XDP edge balancer: loads bpf/edge_xdp.c and bpf/edge_tc.c and keeps their maps.

How a backend is reached. The programs never look up routes: for each endpoint
this class asks the kernel (pyroute2: `route get`, then the neighbour table)
for the interface and next-hop MAC, and writes them into the backend's map
entry with a devmap slot for that interface. XDP then rewrites the MACs and
redirects the frame straight to that interface. An endpoint whose neighbour is
not known yet (after a probe and a short wait), or that is local to this host,
is still balanced but in route mode: XDP rewrites the address and passes the
packet to the kernel, which routes it and resolves the neighbour itself;
`refresh()` (the agent calls it periodically) moves it to redirect mode once
the neighbour is known, and follows MAC changes. A veth that receives
redirected frames needs an XDP program (or GRO) on its peer end.

Changes are make-before-break: new backends are written first, then the new
ring into a spare ring slot, then the VIP entry flips to it, and only then are
removed backends invalidated. Endpoints marked unhealthy leave the ring but
their established flows stay (draining); removed endpoints lose their flows,
which pick again from the ring.

The fast path. Every new flow (SYN, UDP, or a flow the table does not know) is
recorded in edge_conns, but a TCP segment on a ring slot whose owner never
changed takes the ring's answer without that lookup: no flow there ever went
elsewhere. Slots that changed owner are marked dirty and consult the table;
`compact()` (call it periodically, with `refresh()`) clears the bits no
recorded flow needs any more.

Limits: replies are given the VIP back on the edge interface's egress, so they
must leave through it (the route back to the client); ICMP errors about a
balanced flow are not translated; IP fragments, IPv6 extension headers and
NAT46 are left to the kernel; a redirected packet keeps its TTL. Call every
method from one thread (the agent's lock).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import logging
import operator
import os
import re
import secrets
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from accel import maglev
from accel.model import Guard, IPAddress, IPNetwork, Service, ServiceTable, mapped

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
EDGE_H = BPF_DIR / "lib" / "edge.h"
PROTO_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
TC_EGRESS = "ffff:fff3"
TC_PRIO = 0xED6E  # our filter's priority on the clsact egress hook: finds it again to delete
TC_HANDLE = 1

BE_VALID = 1
BE_REDIRECT = 2
VIP_EMPTY, VIP_LIVE, VIP_GONE = 0, 1, 2
VIP_PROBES = 4

PIN_MAPS = (
    "edge_vips", "edge_rings", "edge_backends", "edge_conns", "edge_revs", "edge_deny",
    "edge_syn", "edge_config", "edge_vip_stats", "edge_counters", "edge_tx",
)
VIP_STAT_FIELDS = (
    "packets", "bytes", "new_flows", "drop_deny", "drop_syn", "drop_no_backend",
    "conn_full", "reply_packets", "reply_bytes",
)


def _ep_name(addr: IPAddress, port: int) -> str:
    """An endpoint's name in the Maglev ring: its permutation derives from it."""
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _words(addr: IPAddress) -> tuple[int, int, int, int]:
    """An address16 as the datapath loads it: four native-order u32 of network bytes."""
    packed = mapped(addr).packed
    return tuple(int.from_bytes(packed[i : i + 4], "little") for i in (0, 4, 8, 12))


def _raw16(port: int) -> int:
    """A port as the datapath loads it from the packet (network bytes, native u16)."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def vip_hash(key: tuple[IPAddress, int, str], slots: int) -> int:
    """edge_vip_hash() of edge.h: the home slot of a VIP."""
    w = _words(key[0])
    x = w[0] ^ w[1] ^ w[2] ^ w[3]
    return _mix32(x ^ (_raw16(key[1]) << 8) ^ PROTO_NUMBERS[key[2]]) & (slots - 1)


def flow_slot(src: IPAddress, sport: int, dport: int, size: int) -> int:
    """The ring slot a client flow hashes to (edge_flow_hash() scaled onto the ring)."""
    w = _words(src)
    ports = (_raw16(sport) << 16) | _raw16(dport)
    return (_mix32(_mix32(w[3] ^ ports) ^ (w[0] ^ w[1] ^ w[2])) * size) >> 32


def deny_prefilter(nets: Iterable[IPNetwork]) -> tuple[list[int], list[int]]:
    """The deny4/deny6 bitmaps of edge_config (4 x u64 each) for a deny list.

    Bit b of deny4: some denied IPv4 CIDR holds addresses with first octet b.
    Bit b of deny6: some denied IPv6 CIDR holds addresses with second byte b.
    """
    b4, b6 = 0, 0
    for net in nets:
        raw = net.network_address.packed
        if net.version == 4:
            span = 1 << max(0, 8 - net.prefixlen)
            b4 |= ((1 << span) - 1) << (raw[0] & ~(span - 1) & 0xFF)
            b6 |= 1  # ::ffff:a.b.c.d sources of IPv6 packets share the trie entry
        else:
            if net.prefixlen <= 8:
                span = 256
            else:
                span = 1 << max(0, 16 - net.prefixlen)
            b6 |= ((1 << span) - 1) << (raw[1] & ~(span - 1) & 0xFF)
    words = lambda b: [(b >> (64 * i)) & (2**64 - 1) for i in range(4)]  # noqa: E731
    return words(b4), words(b6)


class EdgeError(RuntimeError):
    """The edge could not be set up as asked; the message says what to change."""


class EdgeCapacityError(EdgeError, ValueError):
    """The table does not fit the maps (too many VIPs or backends); nothing was changed."""


@dataclass(frozen=True)
class NextHop:
    """How XDP reaches a backend: out of `ifindex`, from `smac` to `dmac`."""

    ifindex: int
    dmac: bytes
    smac: bytes


# Maps addresses to next hops; None means "let the kernel route it" (route mode).
Resolver = Callable[[Iterable[IPAddress]], dict[IPAddress, NextHop | None]]


def counter_names(header: Path = EDGE_H) -> list[tuple[str, str]]:
    """(name, meaning) of each global counter, in enum order, from edge.h."""
    text = header.read_text()
    body = text[text.index("enum edge_counter") :]
    body = body[: body.index("};")]
    out = []
    for m in re.finditer(r"^\s*E_(\w+)(?:\s*=\s*\d+)?,\s*/\*\s*(.*?)\s*\*/", body, re.M):
        out.append((m.group(1).lower(), m.group(2)))
    return out


class NeighbourResolver:
    """The kernel's view of how to reach an address: route, interface MAC, neighbour MAC.

    A missing neighbour is solicited with one UDP datagram to the discard port
    (the kernel sends the ARP/ND request) and waited for up to `wait` seconds.
    A route out of a bridge resolves to the bridge port that learned the
    neighbour's MAC (a bridge takes no XDP redirects; its veth ports do). Only
    veths and plain devices (NICs) are redirect targets: VLAN, bond, tunnel and
    other virtual devices are left to the kernel (route mode).
    """

    USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # reachable stale delay probe noarp permanent
    REDIRECT_KINDS = (None, "veth")

    def __init__(self, wait: float = 1.0):
        self.wait = wait

    def __call__(self, addrs: Iterable[IPAddress]) -> dict[IPAddress, NextHop | None]:
        from pyroute2 import IPRoute

        out: dict[IPAddress, NextHop | None] = {}
        pending: dict[IPAddress, tuple[int, str, bytes]] = {}
        with IPRoute() as ipr:
            for addr in addrs:
                hop = self._route(ipr, addr)
                if hop is None:
                    out[addr] = None
                    continue
                dmac = self._neigh(ipr, hop[0], hop[1])
                if dmac:
                    out[addr] = self._next_hop(ipr, hop, dmac)
                else:
                    pending[addr] = hop
                    self._solicit(hop[1])
            deadline = time.monotonic() + self.wait
            while pending and time.monotonic() < deadline:
                time.sleep(0.02)
                for addr, hop in list(pending.items()):
                    dmac = self._neigh(ipr, hop[0], hop[1])
                    if dmac:
                        out[addr] = self._next_hop(ipr, hop, dmac)
                        del pending[addr]
        for addr in pending:
            log.info("edge: no neighbour for %s yet: balanced in route mode", addr)
            out[addr] = None
        return out

    @staticmethod
    def _kind(ipr, index: int) -> tuple[str | None, str | None]:
        links = ipr.link("get", index=index)
        if not links:
            return None, None
        info = links[0].get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        return kind, links[0].get_attr("IFLA_ADDRESS")

    def _next_hop(self, ipr, hop: tuple[int, str, bytes], dmac: bytes) -> NextHop | None:
        oif, _, smac = hop
        kind, _ = self._kind(ipr, oif)
        if kind == "bridge":
            port = self._bridge_port(ipr, oif, dmac)
            if port is None:
                return None  # not learned (yet): the bridge floods, the kernel copes
            oif = port
            kind, _ = self._kind(ipr, oif)
        if kind not in self.REDIRECT_KINDS:
            return None
        return NextHop(oif, dmac, smac)

    @staticmethod
    def _bridge_port(ipr, bridge: int, mac: bytes) -> int | None:
        want = ":".join(f"{b:02x}" for b in mac)
        for n in ipr.fdb("dump"):
            if n.get_attr("NDA_MASTER") == bridge and n.get_attr("NDA_LLADDR") == want:
                return n["ifindex"]
        return None

    @staticmethod
    def _route(ipr, addr: IPAddress) -> tuple[int, str, bytes] | None:
        try:
            routes = ipr.route("get", dst=str(addr))
        except Exception as e:  # noqa: BLE001 - unreachable: route mode, the kernel decides
            log.info("edge: no route to %s (%s): route mode", addr, e)
            return None
        if not routes:
            return None
        r = routes[0]
        if r["type"] != 1:  # RTN_UNICAST; local, blackhole...: the kernel handles it
            return None
        oif = r.get_attr("RTA_OIF")
        gw = r.get_attr("RTA_GATEWAY")
        links = ipr.link("get", index=oif) if oif else []
        smac = links[0].get_attr("IFLA_ADDRESS") if links else None
        if not oif or not smac or smac == "00:00:00:00:00:00":
            return None  # loopback, tunnels: nothing to rewrite MACs for
        return oif, gw or str(addr), bytes.fromhex(smac.replace(":", ""))

    def _neigh(self, ipr, oif: int, nh: str) -> bytes | None:
        fam = socket.AF_INET6 if ":" in nh else socket.AF_INET
        for n in ipr.neigh("dump", ifindex=oif, family=fam):
            if n.get_attr("NDA_DST") == nh and n["state"] & self.USABLE:
                mac = n.get_attr("NDA_LLADDR")
                if mac:
                    return bytes.fromhex(mac.replace(":", ""))
        return None

    @staticmethod
    def _solicit(nh: str) -> None:
        fam = socket.AF_INET6 if ":" in nh else socket.AF_INET
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.sendto(b"", (nh, 9))
        except OSError:
            pass


@dataclass
class _Backend:
    id: int
    gen: int
    addr: IPAddress
    port: int
    hop: NextHop | None
    tx: int  # devmap slot, 0 when in route mode


@dataclass
class _Vip:
    key: tuple[IPAddress, int, str]
    name: str
    id: int
    ring: int
    backends: dict[tuple[IPAddress, int], _Backend] = field(default_factory=dict)
    ring_sig: tuple = ()
    owners: list[str | None] | None = None  # endpoint per ring slot, as last written
    dirty: bytearray | None = None  # slots that changed owner (see EDGE_CELL_DIRTY)


class EdgeDatapath:
    """The edge balancer on one interface: `load`, `attach`, `apply`, `set_guard`, `counters`.

    `iface` may be None to load the programs without attaching them (benchmarks,
    BPF_PROG_TEST_RUN tests). All maps are pinned under `pin_dir`.
    """

    def __init__(
        self,
        iface: str | None,
        pin_dir: str | os.PathLike,
        maglev_size: int = maglev.DEFAULT_SIZE,
        *,
        max_vips: int = 64,
        max_backends: int = 4096,
        conn_max: int = 262144,
        tx_max: int = 256,
        resolver: Resolver | None = None,
    ):
        maglev.check_size(maglev_size)
        if not 1 <= max_vips <= 4096:
            raise EdgeError(f"max_vips {max_vips} is out of range 1-4096")
        self.iface = iface
        self.pin_dir = Path(pin_dir)
        self.maglev_size = maglev_size
        self.max_vips = max_vips
        self.max_backends = max_backends
        self.conn_max = conn_max
        self.tx_max = tx_max
        self.resolver: Resolver = resolver or NeighbourResolver()
        self.mode: str | None = None  # "native" | "generic" once attached
        self._xdp = None
        self._tc = None
        self._xdp_fn = None
        self._tc_fn = None
        self._made_pin_dir = False
        self._tc_ifindex: int | None = None
        self._made_clsact = False
        self._vips: dict[tuple[IPAddress, int, str], _Vip] = {}
        self._guard = Guard()
        self._deny: set[IPNetwork] = set()
        self.vip_slots = max(64, 1 << (8 * max_vips - 1).bit_length())
        self._slot_keys: list = [None] * self.vip_slots  # key per edge_vips slot, None = empty
        self._slot_live: list[bool] = [False] * self.vip_slots
        self._free_vip_ids = deque(range(max_vips))
        self._free_rings = deque(range(max_vips + 1))
        self._free_backends = deque(range(1, max_backends))  # 0 means "no backend"
        self._gen = secrets.randbits(31) + 1  # never matches a previous agent's flows
        self._tx_slots: dict[int, int] = {}  # ifindex -> devmap slot
        self._tx_refs: dict[int, int] = {}
        self._free_tx = deque(range(tx_max))
        self._legacy: dict | None = None
        self._readonly = False

    # ---- loading -------------------------------------------------------------------------

    @property
    def ring_rows(self) -> int:
        return -(-self.maglev_size // 16)

    def cflags(self) -> list[str]:
        return [
            f"-I{BPF_DIR}",
            f'-DACCEL_PIN_DIR="{self.pin_dir}"',
            f"-DEDGE_RING_SIZE={self.maglev_size}",
            f"-DEDGE_MAX_VIPS={self.max_vips}",
            f"-DEDGE_VIP_SLOTS={self.vip_slots}",
            f"-DEDGE_MAX_BACKENDS={self.max_backends}",
            f"-DEDGE_CONN_MAX={self.conn_max}",
            f"-DEDGE_TX_MAX={self.tx_max}",
            "-Wno-unused-function",
        ]

    def _expected_sizes(self) -> dict[str, int]:
        return {
            "edge_vips": self.vip_slots,
            "edge_rings": (self.max_vips + 1) * self.ring_rows,
            "edge_backends": self.max_backends,
            "edge_conns": self.conn_max,
            "edge_revs": self.conn_max,
            "edge_vip_stats": self.max_vips,
            "edge_counters": len(counter_names()),
            "edge_tx": self.tx_max,
        }

    def _drop_stale_pins(self) -> None:
        """Pins from an agent with other sizes would silently mis-index: start them afresh."""
        from accel.datapath.testrun import pinned_map_info

        stale = []
        for name, want in self._expected_sizes().items():
            path = self.pin_dir / name
            if path.exists() and pinned_map_info(str(path)).max_entries != want:
                stale.append(name)
        if stale:
            log.warning("edge: pinned maps %s have other sizes: recreating all", stale)
            self._unpin()

    def load(self, readonly: bool = False) -> None:
        """Compile and load both programs; maps are created or adopted from the pins.

        `readonly` (a stats reader): adopt nothing, write nothing.
        """
        if self._xdp is not None:
            return
        from bcc import BPF

        self._readonly = readonly
        if not readonly:
            if not self.pin_dir.exists():
                self.pin_dir.mkdir(parents=True)
                self._made_pin_dir = True
            self._drop_stale_pins()
        cflags = self.cflags()
        try:
            self._xdp = BPF(src_file=str(BPF_DIR / "edge_xdp.c").encode(), cflags=cflags)
            self._xdp_fn = self._xdp.load_func(b"edge_xdp", BPF.XDP)
            self._tc = BPF(src_file=str(BPF_DIR / "edge_tc.c").encode(), cflags=cflags)
            self._tc_fn = self._tc.load_func(b"edge_tc", BPF.SCHED_CLS)
        except Exception as e:
            self._xdp = self._tc = None
            raise EdgeError(f"edge programs failed to load: {e}") from e
        if not readonly:
            self._adopt()

    @property
    def xdp_fd(self) -> int:
        self.load()
        return self._xdp_fn.fd

    @property
    def tc_fd(self) -> int:
        self.load()
        return self._tc_fn.fd

    def table(self, name: str):
        self.load()
        return self._xdp[name.encode()]

    def _adopt(self) -> None:
        """A restarted agent finds the previous one's VIPs still serving traffic.

        Their ring slots, stats ids and backend ids stay reserved until the first
        apply() has replaced them VIP by VIP, so nothing serving is overwritten.
        The guard stays as it was until set_guard().
        """
        for k in self._xdp[b"edge_deny"].keys():
            addr = self._get_addr(k.addr)
            plen = k.prefixlen - (96 if addr.version == 4 else 0)
            self._deny.add(ipaddress.ip_network(f"{addr}/{plen}", strict=False))
        legacy_vips = {}
        for k, v in self._xdp[b"edge_vips"].items():
            if v.state == VIP_EMPTY:
                continue
            key = self._vip_key_from(v.key)
            self._slot_keys[k.value] = key
            if v.state == VIP_LIVE:
                self._slot_live[k.value] = True
                legacy_vips[key] = (v.id, v.ring)
        legacy_backends = [
            k.value for k, v in self._xdp[b"edge_backends"].items() if v.flags & BE_VALID
        ]
        if not legacy_vips and not legacy_backends:
            return
        self._legacy = {"vips": legacy_vips, "backends": legacy_backends}
        used_ids = {i for i, _ in legacy_vips.values()}
        used_rings = {r for _, r in legacy_vips.values()}
        self._free_vip_ids = deque(i for i in self._free_vip_ids if i not in used_ids)
        self._free_rings = deque(r for r in self._free_rings if r not in used_rings)
        used_be = set(legacy_backends)
        self._free_backends = deque(b for b in self._free_backends if b not in used_be)
        for k, v in self._xdp[b"edge_tx"].items():
            if v.value:
                self._tx_slots[v.value] = k.value
                self._tx_refs[v.value] = 1  # held by the legacy backends until released
                if k.value in self._free_tx:
                    self._free_tx.remove(k.value)
        log.info("edge: adopted %d VIPs from the pins", len(legacy_vips))

    # ---- attaching -----------------------------------------------------------------------

    def attach(self, mode: str = "auto") -> str:
        """XDP on the edge interface (native, else generic) and tc on its egress.

        Returns the XDP mode in use: "native" or "generic".
        """
        if not self.iface:
            raise EdgeError("no edge interface given")
        if mode not in ("auto", "native", "generic"):
            raise EdgeError(f"xdp mode {mode!r} is not one of auto, native, generic")
        self.load()
        from bcc import BPF

        foreign = self._attached_xdp()
        if foreign and foreign != "edge_xdp":
            raise EdgeError(
                f"{self.iface} already runs XDP program {foreign!r}: detach it first "
                f"(ip link set dev {self.iface} xdp off) or pick another interface"
            )
        tries = {"auto": ("native", "generic"), "native": ("native",), "generic": ("generic",)}
        errors = []
        for m in tries[mode]:
            flags = XDP_FLAGS_DRV_MODE if m == "native" else XDP_FLAGS_SKB_MODE
            try:
                BPF.attach_xdp(self.iface, self._xdp_fn, flags)
            except Exception as e:  # bcc raises a bare Exception with the kernel's reason
                errors.append(f"{m}: {e}")
                continue
            self.mode = m
            break
        if self.mode is None:
            raise EdgeError(f"cannot attach XDP to {self.iface}: " + "; ".join(errors))
        if errors:
            log.info("edge: native XDP unavailable on %s (%s): generic mode", self.iface, errors)
        try:
            self._attach_tc()
        except Exception:
            self._detach_xdp()
            raise
        log.info("edge: XDP %s on %s, reverse NAT on its egress", self.mode, self.iface)
        return self.mode

    def _attached_xdp(self) -> str | None:
        """Name of the XDP program on the interface now (ours from an earlier agent is fine)."""
        try:
            out = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", self.iface],
                                 capture_output=True, text=True, check=True).stdout
            xdp = json.loads(out)[0].get("xdp") or {}
        except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
            return None
        progs = [a.get("prog", {}) for a in xdp.get("attached", [])] or [xdp.get("prog", {})]
        names = [p.get("name") for p in progs if p]
        return names[0] if names else None

    def _attach_tc(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.iface)
            if not idx:
                raise EdgeError(f"no interface {self.iface}")
            idx = idx[0]
            try:
                ipr.tc("add", "clsact", index=idx)
                self._made_clsact = True
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc(
                "replace-filter", "bpf", index=idx, handle=TC_HANDLE, fd=self._tc_fn.fd,
                name="edge_tc", parent=TC_EGRESS, prio=TC_PRIO, classid=1, direct_action=True,
            )
            self._tc_ifindex = idx

    def _detach_xdp(self) -> None:
        if self.mode is None or not self.iface:
            return
        from bcc import BPF

        flags = XDP_FLAGS_DRV_MODE if self.mode == "native" else XDP_FLAGS_SKB_MODE
        try:
            BPF.remove_xdp(self.iface, flags)
        except Exception as e:  # the interface may be gone already
            log.debug("edge: remove_xdp %s: %s", self.iface, e)
        self.mode = None

    def _detach_tc(self) -> None:
        if self._tc_ifindex is None:
            return
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        idx = self._tc_ifindex
        self._tc_ifindex = None
        with IPRoute() as ipr:
            try:
                ipr.tc("del-filter", "bpf", index=idx, handle=TC_HANDLE, parent=TC_EGRESS,
                       prio=TC_PRIO)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise
            if self._made_clsact:
                self._made_clsact = False
                try:
                    others = ipr.get_filters(index=idx, parent=TC_EGRESS) + ipr.get_filters(
                        index=idx, parent="ffff:fff2"
                    )
                    if not [f for f in others if f.get_attr("TCA_KIND")]:
                        ipr.tc("del", "clsact", index=idx)
                except NetlinkError as e:
                    if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                        raise

    def detach(self) -> None:
        """Remove the XDP program and our tc filter (and the clsact qdisc if we made it)."""
        self._detach_xdp()
        self._detach_tc()

    def close(self, unpin: bool = True) -> None:
        """Detach and, unless told otherwise, remove every pin this datapath made."""
        self.detach()
        for b in (self._tc, self._xdp):
            if b is not None:
                b.cleanup()
        self._xdp = self._tc = None
        if unpin and not self._readonly:
            self._unpin()
            try:
                self.pin_dir.rmdir()  # only when nothing else is pinned there
            except OSError:
                pass

    def _unpin(self) -> None:
        for name in PIN_MAPS:
            try:
                (self.pin_dir / name).unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> EdgeDatapath:
        self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- map encoding --------------------------------------------------------------------

    @staticmethod
    def _put_addr(dst: ctypes.Structure, addr: IPAddress) -> None:
        ctypes.memmove(ctypes.addressof(dst), mapped(addr).packed, 16)

    @staticmethod
    def _get_addr(src: ctypes.Structure) -> IPAddress:
        a = ipaddress.IPv6Address(bytes(ctypes.string_at(ctypes.addressof(src), 16)))
        return a.ipv4_mapped or a

    def _vip_slot(self, key: tuple[IPAddress, int, str], insert: bool) -> int:
        """The edge_vips slot holding `key`, or (insert) the one it would go to; -1 if none."""
        home = vip_hash(key, self.vip_slots)
        free = -1
        for i in range(VIP_PROBES):
            idx = (home + i) & (self.vip_slots - 1)
            if self._slot_live[idx]:
                if self._slot_keys[idx] == key:
                    return idx
            elif free < 0:
                free = idx
            if self._slot_keys[idx] is None:
                break  # lookups stop at a never-used slot: so does the search
        return free if insert else -1

    def _write_vip(self, idx: int, key, vid: int, ring: int, state: int) -> None:
        t = self.table("edge_vips")
        v = t.Leaf()
        self._put_addr(v.key.addr, key[0])
        v.key.port = socket.htons(key[1])
        v.key.proto = PROTO_NUMBERS[key[2]]
        v.id = vid
        v.ring = ring
        if state == VIP_LIVE and not self._slot_live[idx]:
            # A new slot: the data lands (not yet live) before the state says live, so
            # a lookup that sees it live sees its ring too.
            v.state = VIP_GONE
            t[ctypes.c_uint32(idx)] = v
        v.state = state
        t[ctypes.c_uint32(idx)] = v
        self._slot_keys[idx] = key
        self._slot_live[idx] = state == VIP_LIVE

    def _delete_vip(self, key) -> None:
        idx = self._vip_slot(key, insert=False)
        if idx >= 0:
            t = self.table("edge_vips")
            v = t[ctypes.c_uint32(idx)]
            v.state = VIP_GONE
            t[ctypes.c_uint32(idx)] = v
            self._slot_live[idx] = False

    def _vip_key_from(self, k) -> tuple[IPAddress, int, str]:
        return (self._get_addr(k.addr), socket.ntohs(k.port), PROTO_NAMES.get(k.proto, "?"))

    # ---- service table -------------------------------------------------------------------

    @staticmethod
    def edge_services(table: ServiceTable) -> dict[tuple[IPAddress, int, str], Service]:
        return {s.key: s for s in table.services if s.edge}

    def _endpoints(self, svc: Service) -> list:
        """Endpoints XDP can serve: same family as the VIP (no NAT46 in the datapath)."""
        out = []
        for ep in svc.endpoints:
            if ep.address.version != svc.vip.version:
                log.warning(
                    "edge: %s: endpoint %s skipped (IPv%d VIP, IPv%d endpoint)",
                    svc.name, ep, svc.vip.version, ep.address.version,
                )
                continue
            out.append(ep)
        return out

    def check_capacity(self, table: ServiceTable) -> None:
        """Raise EdgeCapacityError when `table` cannot fit; changes nothing."""
        wanted = self.edge_services(table)
        if len(wanted) > self.max_vips:
            raise EdgeCapacityError(
                f"{len(wanted)} edge services, the edge holds {self.max_vips} (raise max_vips)"
            )
        # Every new VIP needs a slot within VIP_PROBES of its hash (simulated on a copy).
        keys, live = list(self._slot_keys), list(self._slot_live)
        for key in self._vips:
            if key not in wanted:
                live[self._vip_slot(key, insert=False)] = False
        for key in wanted:
            if key in self._vips:
                continue
            home = vip_hash(key, self.vip_slots)
            for i in range(VIP_PROBES):
                idx = (home + i) & (self.vip_slots - 1)
                if not live[idx]:
                    keys[idx], live[idx] = key, True
                    break
            else:
                raise EdgeCapacityError(
                    f"no edge_vips slot for {key[0]}:{key[1]}/{key[2]} (raise max_vips)"
                )
        # New backends are written before the ones they replace are retired.
        new = 0
        for key, svc in wanted.items():
            cur = self._vips.get(key)
            new += sum(
                1 for ep in self._endpoints(svc)
                if cur is None or (ep.address, ep.port) not in cur.backends
            )
        freed = sum(len(v.backends) for k, v in self._vips.items() if k not in wanted)
        if new > len(self._free_backends) + freed:
            raise EdgeCapacityError(
                f"{new} new edge endpoints, {len(self._free_backends) + freed} backend slots "
                f"free of {self.max_backends - 1} (raise max_backends)"
            )

    def apply(self, table: ServiceTable) -> dict[str, list[str]]:
        """Make the edge serve exactly the `edge: true` services of `table`.

        Only VIPs whose backends or weights changed are rewritten. Returns the
        service names by outcome: added, changed, removed, unchanged.
        """
        self.load()
        self.check_capacity(table)
        wanted = self.edge_services(table)
        result: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "unchanged": []}

        need_hop = set()
        for key, svc in wanted.items():
            cur = self._vips.get(key)
            for ep in self._endpoints(svc):
                if cur is None or (ep.address, ep.port) not in cur.backends:
                    need_hop.add(ep.address)
        hops = self.resolver(sorted(need_hop, key=lambda a: (a.version, a))) if need_hop else {}

        for key in [k for k in self._vips if k not in wanted]:
            result["removed"].append(self._vips[key].name)
            self._remove_vip(key)
        legacy_vips = self._legacy["vips"] if self._legacy else {}
        for key in [k for k in legacy_vips if k not in wanted]:
            self._delete_vip(key)
            vid, ring = legacy_vips.pop(key)
            self._free_rings.append(ring)
            self._free_vip_ids.append(vid)
        for key, svc in sorted(wanted.items(), key=lambda kv: kv[1].name):
            outcome = self._apply_vip(key, svc, hops, legacy_vips.get(key))
            result[outcome].append(svc.name)
        if self._legacy:
            self._release_legacy()
        return result

    def _apply_vip(self, key, svc: Service, hops, legacy: tuple[int, int] | None) -> str:
        cur = self._vips.get(key)
        outcome = "changed"
        if cur is None:
            outcome = "added"
            vid = legacy[0] if legacy else self._free_vip_ids.popleft()
            cur = _Vip(key=key, name=svc.name, id=vid, ring=legacy[1] if legacy else -1)
            if not legacy:
                self._zero_stats(vid)
            self._vips[key] = cur
        cur.name = svc.name
        eps = self._endpoints(svc)
        want = {(ep.address, ep.port): ep for ep in eps}

        # 1. Backends first: a ring never names an id that is not written yet.
        for bkey, ep in want.items():
            if bkey not in cur.backends:
                cur.backends[bkey] = self._new_backend(ep.address, ep.port, hops.get(ep.address))
        members = sorted(
            (_ep_name(ep.address, ep.port), ep.weight, cur.backends[(ep.address, ep.port)].id)
            for ep in eps
            if ep.healthy
        )
        sig = tuple(members)
        gone = [b for bkey, b in cur.backends.items() if bkey not in want]
        if sig == cur.ring_sig and not gone and outcome == "changed":
            return "unchanged"

        # 2. New ring into a spare slot, 3. flip the VIP to it, 4. retire the old.
        if sig != cur.ring_sig or cur.ring < 0 or legacy:
            new_ring = self._free_rings.popleft()
            if legacy and cur.owners is None:
                cur.owners = self._read_owners(legacy[1])
                cur.dirty = bytearray(self.maglev_size)  # unknown history: the owners decide
            self._write_ring(new_ring, members, cur)
            self._write_vip(self._vip_slot(key, insert=True), key, cur.id, new_ring, VIP_LIVE)
            old, cur.ring = cur.ring, new_ring
            if old >= 0:
                self._free_rings.append(old)
            cur.ring_sig = sig
        for b in gone:
            del cur.backends[(b.addr, b.port)]
            self._drop_backend(b)
        return outcome

    def _remove_vip(self, key) -> None:
        cur = self._vips.pop(key)
        self._delete_vip(key)
        for b in cur.backends.values():
            self._drop_backend(b)
        if cur.ring >= 0:
            self._free_rings.append(cur.ring)
        self._free_vip_ids.append(cur.id)

    def _release_legacy(self) -> None:
        """After the first apply: the previous agent's leftovers are no longer referenced."""
        legacy = self._legacy
        self._legacy = None
        bt = self.table("edge_backends")
        for bid in legacy["backends"]:
            bt[ctypes.c_uint32(bid)] = bt.Leaf()
            self._free_backends.append(bid)
        for ifindex in list(self._tx_refs):
            self._tx_release(ifindex)

    def _zero_stats(self, vid: int) -> None:
        t = self.table("edge_vip_stats")
        t[ctypes.c_uint32(vid)] = t.Leaf()  # bcc fills every CPU with the one value

    def _next_gen(self) -> int:
        self._gen = (self._gen % 0xFFFFFFFF) + 1
        return self._gen

    def _new_backend(self, addr: IPAddress, port: int, hop: NextHop | None) -> _Backend:
        b = _Backend(self._free_backends.popleft(), self._next_gen(), addr, port, None, 0)
        self._set_hop(b, hop)
        return b

    def _set_hop(self, b: _Backend, hop: NextHop | None) -> None:
        old_if = b.hop.ifindex if b.hop else None
        if hop is not None:
            try:
                b.tx = self._tx_acquire(hop.ifindex)
            except EdgeCapacityError as e:
                log.warning("edge: %s: route mode", e)
                hop = None
        b.hop = hop
        self._write_backend(b)
        if old_if is not None:
            self._tx_release(old_if)

    def _write_backend(self, b: _Backend) -> None:
        t = self.table("edge_backends")
        v = t.Leaf()
        self._put_addr(v.addr, b.addr)
        v.port = socket.htons(b.port)
        v.gen = b.gen
        v.flags = BE_VALID
        if b.hop is not None:
            v.flags |= BE_REDIRECT
            v.tx = b.tx
            ctypes.memmove(ctypes.addressof(v.macs), b.hop.dmac + b.hop.smac, 12)
        t[ctypes.c_uint32(b.id)] = v

    def _drop_backend(self, b: _Backend) -> None:
        t = self.table("edge_backends")
        t[ctypes.c_uint32(b.id)] = t.Leaf()  # not VALID: its flows pick again
        self._free_backends.append(b.id)
        if b.hop is not None:
            self._tx_release(b.hop.ifindex)

    def _tx_acquire(self, ifindex: int) -> int:
        slot = self._tx_slots.get(ifindex)
        if slot is None:
            if not self._free_tx:
                raise EdgeCapacityError(f"devmap full ({self.tx_max} interfaces)")
            slot = self._free_tx.popleft()
            tx = self.table("edge_tx")
            tx[ctypes.c_uint32(slot)] = ctypes.c_int(ifindex)
            self._tx_slots[ifindex] = slot
            self._tx_refs[ifindex] = 0
        self._tx_refs[ifindex] += 1
        return slot

    def _tx_release(self, ifindex: int) -> None:
        self._tx_refs[ifindex] -= 1
        if self._tx_refs[ifindex] <= 0:
            slot = self._tx_slots.pop(ifindex)
            del self._tx_refs[ifindex]
            try:
                del self.table("edge_tx")[ctypes.c_uint32(slot)]
            except KeyError:
                pass
            self._free_tx.append(slot)

    def _write_ring(self, slot: int, members: list[tuple[str, int, int]], vip: _Vip) -> None:
        """Write a ring for `vip` into ring slot `slot`, before any VIP entry points at it.

        members: (endpoint name, weight, backend id). A cell is dirty when its slot
        was dirty or its owner changed: flows there must consult the flow table.
        """
        ids = {name: bid for name, _, bid in members}
        names = sorted(ids)
        table = maglev.build([(n, w) for n, w, _ in members], self.maglev_size)
        owners = [names[i] if i >= 0 else None for i in table]
        if vip.owners is None:
            dirty = bytearray(self.maglev_size)
        else:
            changed = map(operator.ne, vip.owners, owners)
            dirty = bytearray(map(operator.or_, vip.dirty, changed))
        lut = [ids[n] for n in names] + [0]  # index -1 (no backend) -> id 0
        cells = [lut[i] | (d << 31) for i, d in zip(table, dirty, strict=True)]
        self._put_ring(slot, cells)
        vip.owners = owners
        vip.dirty = dirty

    def _put_ring(self, slot: int, cells: list[int]) -> None:
        rings = self.table("edge_rings")
        rows = self.ring_rows
        keys = (ctypes.c_uint32 * rows)(*range(slot * rows, (slot + 1) * rows))
        leaves = (rings.Leaf * rows)()
        raw = (ctypes.c_uint32 * (rows * 16)).from_buffer(leaves)
        raw[: len(cells)] = cells
        try:
            rings.items_update_batch(keys, leaves)
        except Exception:  # kernels without batch ops on arrays
            for i in range(rows):
                rings[keys[i]] = leaves[i]

    def _read_owners(self, slot: int) -> list[str | None]:
        """Endpoint per slot of a ring another agent wrote (adoption)."""
        rings = self.table("edge_rings")
        backends = self.table("edge_backends")
        rows = self.ring_rows
        keys = (ctypes.c_uint32 * rows)(*range(slot * rows, (slot + 1) * rows))
        names: dict[int, str | None] = {0: None}
        out: list[str | None] = []
        for k in keys:
            for cell in rings[ctypes.c_uint32(k)].b:
                bid = cell & 0x7FFFFFFF
                if bid not in names:
                    be = backends[ctypes.c_uint32(bid)]
                    ep = _ep_name(self._get_addr(be.addr), socket.ntohs(be.port))
                    names[bid] = ep if be.flags & BE_VALID else None
                out.append(names[bid])
        return out[: self.maglev_size]

    def compact(self) -> int:
        """Clear the dirty bits no recorded flow needs; returns how many slots came clean.

        A dirty slot sends TCP through the flow table. It can go clean once every
        recorded flow on it uses the slot's current backend (or a backend that is
        gone, whose flows pick again anyway). Call it now and then from the thread
        that calls apply(): each changed VIP gets a new ring, written before it flips.
        """
        self.load()
        by_key = {k: v for k, v in self._vips.items() if v.dirty is not None and any(v.dirty)}
        if not by_key:
            return 0
        need: dict[tuple, set[int]] = {k: set() for k in by_key}
        live = {
            (k, b.id): (b.gen, _ep_name(b.addr, b.port))
            for k, v in by_key.items() for b in v.backends.values()
        }
        for fk, cv in self._flows():
            key = (self._get_addr(fk.dst), socket.ntohs(fk.dport), PROTO_NAMES.get(fk.proto, ""))
            vip = by_key.get(key)
            if vip is None:
                continue
            slot = flow_slot(self._get_addr(fk.src), socket.ntohs(fk.sport), key[1],
                             self.maglev_size)
            if not vip.dirty[slot]:
                continue
            gen_name = live.get((key, cv.backend))
            if gen_name is None or gen_name[0] != cv.gen:
                continue  # its backend is gone: it picks again whatever the bit says
            if gen_name[1] != vip.owners[slot]:
                need[key].add(slot)
        cleaned = 0
        for key, vip in by_key.items():
            dirty = bytearray(self.maglev_size)
            for slot in need[key]:
                dirty[slot] = 1
            gained = sum(vip.dirty) - len(need[key])
            if gained <= 0:
                continue
            ids = {_ep_name(b.addr, b.port): b.id for b in vip.backends.values()}
            cells = [(ids[o] if o is not None else 0) | (d << 31)
                     for o, d in zip(vip.owners, dirty, strict=True)]
            new_ring = self._free_rings.popleft()
            self._put_ring(new_ring, cells)
            self._write_vip(self._vip_slot(key, insert=True), key, vip.id, new_ring, VIP_LIVE)
            self._free_rings.append(vip.ring)
            vip.ring = new_ring
            vip.dirty = dirty
            cleaned += gained
        return cleaned

    def _flows(self):
        t = self.table("edge_conns")
        try:
            yield from t.items_lookup_batch()
        except Exception:  # kernels without batch ops
            yield from t.items()

    def refresh(self) -> int:
        """Re-resolve every backend's next hop; returns how many changed.

        Moves route-mode backends to redirect once their neighbour is known and
        follows MAC or interface changes. Established flows keep their backend.
        """
        self.load()
        backends = [b for v in self._vips.values() for b in v.backends.values()]
        if not backends:
            return 0
        hops = self.resolver(sorted({b.addr for b in backends}, key=lambda a: (a.version, a)))
        changed = 0
        for b in backends:
            hop = hops.get(b.addr)
            if hop != b.hop:
                self._set_hop(b, hop)
                changed += 1
        return changed

    # ---- guard ---------------------------------------------------------------------------

    def set_guard(self, guard: Guard) -> None:
        """Deny list and SYN budget. New denies go in before the old ones go out."""
        self.load()
        deny = self.table("edge_deny")
        new = set(guard.deny)
        for net in new - self._deny:
            deny[self._deny_key(net)] = ctypes.c_uint32(1)
        self._guard = guard
        self._write_config(self._deny | new)  # the prefilter covers both while they swap
        for net in self._deny - new:
            deny.pop(self._deny_key(net), None)
        self._deny = new
        self._write_config(new)

    def _deny_key(self, net: IPNetwork):
        k = self.table("edge_deny").Key()
        self._put_addr(k.addr, net.network_address)
        k.prefixlen = net.prefixlen + (96 if net.version == 4 else 0)
        return k

    def _write_config(self, nets: set[IPNetwork]) -> None:
        g = self._guard
        t = self._xdp[b"edge_config"]
        c = t.Leaf()
        c.syn_rate = g.syn_rate
        c.syn_cap = g.syn_burst * 10**9
        c.syn_fill_ns = -(-c.syn_cap // g.syn_rate) if g.syn_rate else 0
        c.deny_active = 1 if nets else 0
        d4, d6 = deny_prefilter(nets)
        for i in range(4):
            c.deny4[i] = d4[i]
            c.deny6[i] = d6[i]
        t[ctypes.c_uint32(0)] = c

    # ---- counters ------------------------------------------------------------------------

    def counters(self) -> dict:
        """{"global": {counter: n}, "vips": [{service, vip, port, protocol, packets, ...}]}."""
        self.load()
        return read_counters(self._xdp, {k: v.name for k, v in self._vips.items()})

    def status(self) -> dict:
        """What the edge serves and how each backend is reached (for `accel status`)."""
        return {
            "iface": self.iface,
            "mode": self.mode,
            "maglev_size": self.maglev_size,
            "guard": {"deny": sorted(str(n) for n in self._deny),
                      "syn_rate": self._guard.syn_rate, "syn_burst": self._guard.syn_burst},
            "vips": [
                {
                    "service": v.name, "vip": str(v.key[0]), "port": v.key[1],
                    "protocol": v.key[2],
                    "dirty_slots": sum(v.dirty) if v.dirty else 0,
                    "backends": [
                        {"address": str(b.addr), "port": b.port,
                         "via": f"redirect ifindex {b.hop.ifindex}" if b.hop else "kernel route"}
                        for b in v.backends.values()
                    ],
                }
                for v in sorted(self._vips.values(), key=lambda v: v.name)
            ],
        }

    def vip_ids(self) -> dict[str, int]:
        return {v.name: v.id for v in self._vips.values()}


def read_counters(bpf, names: dict | None = None) -> dict:
    """Counters from a loaded edge program's maps (the agent's, or a reader's over the pins)."""
    glob = {}
    t = bpf[b"edge_counters"]
    for i, (name, _) in enumerate(counter_names()):
        glob[name] = int(sum(t[ctypes.c_uint32(i)]))
    vips = []
    stats = bpf[b"edge_vip_stats"]
    for _, v in bpf[b"edge_vips"].items():
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


def open_pinned(pin_dir: str | os.PathLike) -> EdgeDatapath | None:
    """The edge maps an agent pinned under pin_dir, loaded for reading (no attach).

    None when no edge was ever set up there: nothing is created.
    """
    pin_dir = Path(pin_dir)
    if not all((pin_dir / m).exists() for m in PIN_MAPS):
        return None
    from accel.datapath.testrun import pinned_map_info

    vips = pinned_map_info(str(pin_dir / "edge_vip_stats")).max_entries
    rows = pinned_map_info(str(pin_dir / "edge_rings")).max_entries // (vips + 1)
    size = _prime_for_rows(rows)
    dp = EdgeDatapath(
        None, pin_dir, size, max_vips=vips,
        max_backends=pinned_map_info(str(pin_dir / "edge_backends")).max_entries,
        conn_max=pinned_map_info(str(pin_dir / "edge_conns")).max_entries,
        tx_max=pinned_map_info(str(pin_dir / "edge_tx")).max_entries,
    )
    dp.load(readonly=True)
    return dp


def detach_from(iface: str) -> list[str]:
    """Remove what an edge left on `iface` (after a crash or --keep): our XDP program in
    either mode and our tc egress filter. Another tool's programs are left alone."""
    from bcc import BPF
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    done = []
    probe = EdgeDatapath.__new__(EdgeDatapath)
    probe.iface = iface
    if probe._attached_xdp() == "edge_xdp":
        for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            try:
                BPF.remove_xdp(iface, flags)
            except Exception:  # not attached in this mode
                continue
        done.append(f"xdp on {iface}")
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=iface)
        if idx:
            try:
                ipr.tc("del-filter", "bpf", index=idx[0], handle=TC_HANDLE, parent=TC_EGRESS,
                       prio=TC_PRIO)
                done.append(f"tc egress filter on {iface}")
            except NetlinkError:
                pass
    return done


def _prime_for_rows(rows: int) -> int:
    for n in range(rows * 16, (rows - 1) * 16, -1):
        if maglev.is_prime(n):
            return n
    raise EdgeError(f"pinned edge_rings has {rows} rows per ring: no prime size fits")
