"""The socket datapath: its programs loaded (accel/kernel/loader) and attached to a cgroup,
a ServiceTable applied to its maps, its counters read, and all of it detached again.

One instance per pin directory. Everything it creates is found again by name under the
pin directory (maps, programs) plus one state file naming the cgroup it attached to, so
a restarted agent adopts it and `accel uninstall` removes it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import mmap
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accel.datapath import cgroup, counters
from accel.datapath.maps import MeshNetsWriter, WriteReport
from accel.datapath.qos import QosWriter
from accel.datapath.services import ServiceWriter
from accel.kernel import attach, bpf, loader
from accel.kernel.attach import Attachments
from accel.kernel.kbtf import fastpath_offsets
from accel.kernel.loader import DEFAULT_PIN_DIR, LoadError
from accel.kernel.maps import Map
from accel.model import ServiceTable

log = logging.getLogger(__name__)

# A redirected connection's queue at the receiver, when the receiver set no SO_RCVBUF (then
# its own buffer is the bound). TCP grows a window only as its receiver reads, up to
# tcp_rmem[2] (32 MiB on 6.18); the bound does the same (twice what the receiver has read,
# accel/bpf/redirect.c), starting here: a receiver that never reads holds its sender at 4 MiB
# plus what TCP then queues (under 1 MiB; 0.8 MB on plain TCP here).
REDIRECT_QUEUE_MIN = 4 << 20
RUN_DIR = Path(os.environ.get("ACCEL_RUN_DIR", "/run/accel"))
ATTACH_SK_MSG = bpf.ATTACH["sk_msg_verdict"]

# (source, function, cgroup attach type): every cgroup program the agent attaches.
CGROUP_PROGRAMS = (
    ("sockops.c", "accel_sockops", bpf.ATTACH["cgroup_sock_ops"]),
    ("connect.c", "accel_connect4", bpf.ATTACH["cgroup_inet4_connect"]),
    ("connect.c", "accel_connect6", bpf.ATTACH["cgroup_inet6_connect"]),
    ("connect.c", "accel_sendmsg4", bpf.ATTACH["cgroup_udp4_sendmsg"]),
    ("connect.c", "accel_sendmsg6", bpf.ATTACH["cgroup_udp6_sendmsg"]),
    ("connect.c", "accel_recvmsg4", bpf.ATTACH["cgroup_udp4_recvmsg"]),
    ("connect.c", "accel_recvmsg6", bpf.ATTACH["cgroup_udp6_recvmsg"]),
    ("connect.c", "accel_peer4", bpf.ATTACH["cgroup_inet4_getpeername"]),
    ("connect.c", "accel_peer6", bpf.ATTACH["cgroup_inet6_getpeername"]),
)
CGROUP_ATTACH_TYPES = frozenset(t for _, _, t in CGROUP_PROGRAMS)


def sock_unit(defines: dict[str, int | str]) -> loader.Unit:
    """The socket programs as the loader builds them: sockops.c first (it creates the
    shared maps), the sk_msg verdict, then the connect-time balancer."""
    progs = [loader.Program("sockops.c", "accel_sockops", "sock_ops",
                            bpf.ATTACH["cgroup_sock_ops"]),
             loader.Program("redirect.c", "accel_msg", "sk_msg")]
    progs += [loader.Program(src, fn, "cgroup_sock_addr", t)
              for src, fn, t in CGROUP_PROGRAMS if src == "connect.c"]
    return loader.Unit("sock", tuple(progs), defines)


class AlreadyRunning(RuntimeError):
    pass


@dataclass(frozen=True)
class Capacities:
    """Map sizes. Defaults fit 10,000 services and 100,000 endpoints."""

    sockets: int = 131072  # sockhash and pairing entries
    mesh_nets: int = 131072
    services: int = 16384
    slots: int = 262144  # endpoint slots over all services (weights take several)
    revnat: int = 262144
    pods: int = 16384  # local pod addresses (pod routing)
    pod_flows: int = 131072  # pod-to-pod TCP connections pod routing hands over (LRU)
    flow_ring: int = 1 << 20  # bytes of the connection-record ring (144 B an event)
    # Authorization (lib/policy.h), each per table (the maps hold two: old and new).
    policy_addrs: int = 131072  # workload addresses
    policy_cidrs: int = 16384  # source prefixes policies name
    policy_dsts: int = 65536  # policed destination workloads
    policy_rules: int = 262144  # (source, destination, port) decisions
    policy_netns: int = 16384  # local pod namespaces
    policies: int = 16384  # policies counted


def _key(pin_dir: str) -> str:
    return pin_dir.strip("/").replace("/", "_") or "root"


def state_file(pin_dir: str) -> Path:
    return RUN_DIR / "state" / f"{_key(pin_dir)}.json"


def lock_file(pin_dir: str) -> Path:
    return RUN_DIR / "locks" / f"{_key(pin_dir)}.lock"


@dataclass
class Datapath:
    pin_dir: str = DEFAULT_PIN_DIR
    cgroup_path: str | None = None
    capacities: Capacities = field(default_factory=Capacities)
    # Batched map writes where the kernel has them; False: one entry per call, as before.
    batch_writes: bool = True

    def __post_init__(self) -> None:
        self.pin_dir = os.path.abspath(self.pin_dir)
        self.attachments = Attachments()
        self._maps: dict[str, Map] = {}
        self._progs: dict[str, attach.Program] = {}
        self.compiled = False  # True when this start compiled, False when it reused pins
        self._lock_fd: int | None = None
        self._mesh_nets: MeshNetsWriter | None = None
        self._services: ServiceWriter | None = None
        self._qos: QosWriter | None = None
        self._prog_ids: dict[str, int] = {}
        self._state_extra: dict[str, Any] = {}
        self.cgroup: Path | None = None
        self.table: ServiceTable | None = None
        self.last_report: dict[str, WriteReport] = {}
        self._default_redirect: int | None = None  # as last written to accel_sock_config

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> Datapath:
        self._lock()
        fresh = False
        try:
            self.cgroup = cgroup.resolve(self.cgroup_path)
            fresh = not os.path.isdir(self.pin_dir) or not os.listdir(self.pin_dir)
            os.makedirs(self.pin_dir, exist_ok=True)
            previous = self._read_state()
            try:
                self._load()
            except LoadError:
                if fresh or not self._loads_elsewhere():
                    raise
                # Pins a build with other map layouts kept (--keep, then an upgrade): bcc
                # opens a pinned map whatever its layout, and the verifier refuses the
                # programs. Start afresh as `accel uninstall` and a new start would: the
                # connections the old datapath carried continue on TCP.
                log.warning("the maps pinned in %s do not fit this build's programs (an "
                            "older build's?): removing that datapath and starting afresh; "
                            "its connections continue on TCP", self.pin_dir)
                clear(self.pin_dir)
                os.makedirs(self.pin_dir, exist_ok=True)
                previous = None
                self._load()
            self._attach()
            if previous:
                self._detach_previous(previous)
            self._write_state()
        except BaseException:
            self.attachments.undo_all()
            self._close_fds()
            if fresh:
                # Nothing of ours was here before: leave nothing. (Pins of a kept datapath
                # stay: it is still serving.)
                remove_pins(self.pin_dir)
            self._unlock(remove=fresh)
            raise
        return self

    def _lock(self) -> None:
        path = lock_file(self.pin_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode().strip() or "?"
                os.close(fd)
                raise AlreadyRunning(
                    f"another agent (pid {holder}) is running on pin dir {self.pin_dir}; "
                    "stop it first or use another --pin-dir"
                ) from None
            # The previous holder unlinks the file on a clean exit: a lock on an unlinked
            # inode guards nothing, so take it again on the file the path names now.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self, remove: bool = False) -> None:
        if self._lock_fd is not None:
            if remove:
                lock_file(self.pin_dir).unlink(missing_ok=True)  # still held: no one else has it
            os.close(self._lock_fd)
            self._lock_fd = None

    def defines(self) -> dict[str, int | str]:
        """-D switches for every program sharing these pins: one set of sizes for all."""
        return {
            "ACCEL_SOCKHASH_MAX": self.capacities.sockets,
            "ACCEL_MESH_NETS_MAX": self.capacities.mesh_nets,
            "ACCEL_SERVICES_MAX": self.capacities.services,
            "ACCEL_SLOTS_MAX": self.capacities.slots,
            "ACCEL_REVNAT_MAX": self.capacities.revnat,
            "ACCEL_FLOW_RING": ring_size(self.capacities.flow_ring),
            "ACCEL_POLICY_ADDRS_MAX": self.capacities.policy_addrs,
            "ACCEL_POLICY_CIDRS_MAX": self.capacities.policy_cidrs,
            "ACCEL_POLICY_DSTS_MAX": self.capacities.policy_dsts,
            "ACCEL_POLICY_RULES_MAX": self.capacities.policy_rules,
            "ACCEL_POLICY_NETNS_MAX": self.capacities.policy_netns,
            "ACCEL_POLICIES_MAX": self.capacities.policies,
            # Kernel structure offsets the redirect's queue bound reads (none: no redirect).
            **fastpath_offsets().defines,
        }

    def _loads_elsewhere(self) -> bool:
        """Whether this build's programs load over fresh maps (a scratch pin dir, removed)."""
        scratch = f"{self.pin_dir.rstrip('/')}-probe-{os.getpid()}"
        try:
            loader.ensure(sock_unit(self.defines()), scratch)
            return True
        except LoadError:
            return False
        finally:
            remove_pins(scratch)

    def _load(self) -> None:
        loaded = loader.ensure(sock_unit(self.defines()), self.pin_dir)
        self.compiled = loaded.compiled
        self._progs = {fn: attach.Program(path) for fn, path in loaded.programs.items()}
        self._mesh_nets = MeshNetsWriter(self.map("accel_mesh_nets"), self.batch_writes)
        self._services = ServiceWriter(
            self.map("accel_services"), self.map("accel_slots"), self.map("accel_svc_stats"),
            self.capacities.services, batch=self.batch_writes,
        )
        self._qos = QosWriter(self.map("accel_qos_limits"), self.map("accel_qos_state"),
                              self.map("accel_qos_stats"), self.map("accel_qos_split"))

    def map(self, name: str) -> Map:
        """One of the socket programs' pinned maps, opened once."""
        if name not in self._maps:
            self._maps[name] = Map.open(os.path.join(self.pin_dir, name))
        return self._maps[name]

    def _attach(self) -> None:
        msg = self._progs["accel_msg"]
        sockhash_fd = self.map("accel_sockhash").fd
        # sk_msg first: a socket inserted by sock_ops must find its verdict program ready.
        try:
            attach.sockmap_attach(msg, sockhash_fd, ATTACH_SK_MSG)
        except attach.AttachError as e:
            raise LoadError(str(e)) from e
        self.attachments.add(
            "sk_msg", lambda: attach.sockmap_detach(msg.fd, sockhash_fd, ATTACH_SK_MSG))
        self._prog_ids = {"accel_msg": msg.id}

        cg_fd = cgroup.open_dir(self.cgroup)
        self.attachments.add(f"cgroup fd {self.cgroup}", lambda: os.close(cg_fd))
        for _source, name, attach_type in CGROUP_PROGRAMS:
            self._attach_cgroup(cg_fd, name, attach_type)

    def _attach_cgroup(self, cg_fd: int, name: str, attach_type: int) -> None:
        prog = self._progs[name]
        try:
            # ALLOW_MULTI: coexist with another CNI's programs on the same cgroup. Already
            # attached (a kept datapath, same build): adopted as it is.
            attach.cgroup_attach(prog, cg_fd, attach_type)
        except attach.AttachError as e:
            raise LoadError(f"{e} on {self.cgroup}") from e
        self.attachments.add(
            f"{name} on {self.cgroup}",
            lambda: attach.cgroup_detach(prog.fd, cg_fd, attach_type))
        self._prog_ids[name] = prog.id

    def _close_fds(self) -> None:
        for m in self._maps.values():
            m.close()
        for p in self._progs.values():
            p.close()
        self._maps.clear()
        self._progs.clear()

    # ---- state shared with the next agent and with uninstall --------------------------------

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(state_file(self.pin_dir).read_text())
        except (OSError, ValueError):
            return None

    def record(self, **extra: Any) -> None:
        """Note more of what this agent attached (e.g. the edge interface) for uninstall."""
        self._state_extra.update(extra)
        self._write_state()

    def _write_state(self, **extra: Any) -> None:
        path = state_file(self.pin_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "pin_dir": self.pin_dir,
            "cgroup": str(self.cgroup),
            "prog_ids": self._prog_ids,
            "capacities": asdict(self.capacities),
            "pid": os.getpid(),
            **self._state_extra,
            **extra,
        }))
        tmp.replace(path)  # readers never see a half-written file

    def _detach_previous(self, previous: dict[str, Any]) -> None:
        """Make-before-break adoption: ours is attached, now drop the old agent's programs
        (none when it left the very programs we reuse)."""
        old = set(previous.get("prog_ids", {}).values()) - set(self._prog_ids.values())
        detach_cgroup_programs(previous.get("cgroup"), old)

    # ---- configuration ----------------------------------------------------------------------

    def apply(self, table: ServiceTable) -> dict[str, WriteReport]:
        assert self._mesh_nets is not None, "start() first"
        # Mesh addresses before services: a balanced connection is paired from its first byte.
        self._write_sock_config(table)
        report = {
            "mesh_nets": self._mesh_nets.apply(table),
            "services": self._services.apply(table),
        }
        assert self._qos is not None
        self._qos.apply(table, self._service_indexes())
        self.table = table
        self.last_report = report
        return report

    def _write_sock_config(self, table: ServiceTable) -> None:
        default_redirect = int(table.fastpath == "redirect")
        if default_redirect == self._default_redirect:
            return
        cfg = self.map("accel_sock_config")
        v = cfg.Leaf()
        v.default_redirect = default_redirect
        v.ingress_max = max(tcp_rmem_max(), REDIRECT_QUEUE_MIN)
        v.ingress_min = REDIRECT_QUEUE_MIN
        cfg[ctypes.c_uint32(0)] = v
        self._default_redirect = default_redirect

    def usage_after(self, table: ServiceTable) -> dict[str, int]:
        """Entries the maps hold once `table` is applied, for the capacity check: counted from
        the change against what they hold now, so cheap for a table derived from the last."""
        assert self._mesh_nets is not None and self._services is not None, "start() first"
        return {"services": len(table.services),
                "slots": self._services.slots_after(table),
                "mesh_nets": self._mesh_nets.count_after(table)}

    def counters(self) -> dict[str, int]:
        return counters.read(self.pin_dir)

    def dump(self) -> dict[str, Any]:
        """What the kernel maps hold now, read back afresh (not our bookkeeping)."""
        nets = MeshNetsWriter(self.map("accel_mesh_nets")).prefixes()
        svcs = ServiceWriter(self.map("accel_services"), self.map("accel_slots"),
                             self.map("accel_svc_stats"), self.capacities.services).current
        return {
            "mesh_nets": sorted((str(a), p) for a, p in nets),
            "services": {f"{k[0]}:{k[1]}/{k[2]}": sorted((str(a), p) for a, p in w.slots)
                         for k, w in sorted(svcs.items(), key=lambda kv: str(kv[0]))},
        }

    def _service_indexes(self) -> dict[str, int]:
        return {w.name: w.index for w in self._services.current.values() if w.name} \
            if self._services else {}

    def qos_counters(self) -> dict[str, dict[str, int]]:
        """Per limited service: connects admitted/refused, connections paced, live."""
        return self._qos.per_service(self._service_indexes()) if self._qos else {}

    def service_counters(self) -> dict[str, dict[str, int]]:
        return self._services.per_service() if self._services else {}

    def sockhash_entries(self) -> int:
        """Live sockets in the sockhash (walks the keys; for tests and status)."""
        return len(self.map("accel_sockhash"))

    def usage(self) -> dict[str, dict[str, int]]:
        """Entries in use against capacity, per map that can fill up."""
        caps = self.capacities
        svc = self._services.current if self._services else {}
        return {
            "sockets": {"used": self.sockhash_entries(), "capacity": caps.sockets},
            "mesh_nets": {"used": len(self._mesh_nets.current) if self._mesh_nets else 0,
                          "capacity": caps.mesh_nets},
            "services": {"used": len(svc), "capacity": caps.services},
            "slots": {"used": self._services.slots_used if self._services else 0,
                      "capacity": caps.slots},
        }

    def pairing_entries(self) -> int:
        return len(self.map("accel_conn_ns"))

    def close(self, keep: bool = False) -> None:
        if keep:
            self.attachments.forget()
            log.info("leaving the datapath in %s for the next agent (--keep)", self.pin_dir)
        else:
            errors = self.attachments.undo_all()
            for msg in errors:
                log.error("cleanup: %s", msg)
            remove_pins(self.pin_dir)
            state_file(self.pin_dir).unlink(missing_ok=True)
        self._close_fds()
        self._unlock(remove=not keep)

    def __enter__(self) -> Datapath:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def ring_size(n: int) -> int:
    """A ring buffer's size as the kernel takes it: a power of two, at least a page."""
    return max(mmap.PAGESIZE, 1 << max(0, n - 1).bit_length())


def tcp_rmem_max() -> int:
    """tcp_rmem's maximum: the most TCP's autotuning grows a receive buffer to."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 << 20  # the kernel's default


def detach_cgroup_programs(cgroup_dir: str | None, prog_ids: set[int]) -> list[int]:
    """Detach the given program IDs from every hook of a cgroup; returns those detached."""
    return attach.cgroup_detach_ids(cgroup_dir, prog_ids, set(CGROUP_ATTACH_TYPES))


@dataclass
class Uninstalled:
    pin_dir: str
    detached: list[int]
    interfaces: list[str]  # what came off network interfaces (edge, pod routing)
    had_pins: bool


def uninstall(pin_dir: str) -> Uninstalled:
    """Remove every trace of the agent of `pin_dir` that is no longer running: cgroup
    attachments, the edge, pins, state and lock files. Raises AlreadyRunning if one runs."""
    pin_dir = os.path.abspath(pin_dir)
    lock = lock_file(pin_dir)
    if lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(
                f"an agent is running on {pin_dir}: stop it first (SIGTERM)") from None
        finally:
            os.close(fd)
    done = clear(pin_dir)
    lock.unlink(missing_ok=True)
    return done


def clear(pin_dir: str) -> Uninstalled:
    """uninstall() without the lock: the caller holds it, or checked no agent runs."""
    try:
        state = json.loads(state_file(pin_dir).read_text())
    except (OSError, ValueError):
        state = {}
    detached = detach_cgroup_programs(state.get("cgroup"),
                                      set(state.get("prog_ids", {}).values()))
    interfaces: list[str] = []
    if state.get("edge_iface"):
        from accel.datapath.edge import detach_from

        interfaces = detach_from(state["edge_iface"])
    if state.get("pod_prog_id"):
        from accel.datapath import podroute

        interfaces += podroute.detach_from(state.get("pod_netns") or None, state["pod_prog_id"])
    if state.get("policy_sides"):
        from accel.datapath import policy

        interfaces += policy.detach_from(state["policy_sides"])
    had_pins = os.path.isdir(pin_dir)
    remove_pins(pin_dir)
    state_file(pin_dir).unlink(missing_ok=True)
    return Uninstalled(pin_dir, detached, interfaces, had_pins)


def remove_pins(pin_dir: str) -> None:
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir, ignore_errors=True)
