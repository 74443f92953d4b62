"""Per-service QoS in the kernel (accel/bpf/lib/qos.h): each service's Limits written to
accel_qos_limits at its service index, its bucket state reset when the index changes hands,
and its counters read back.

Mechanisms (what `accel doctor` and status report):
- connections: a GCRA token bucket per service checked at connect() (connect.c); over the
  limit connect() fails at once with EPERM. Exact under concurrency (compare-and-swap).
- bandwidth: "tcp-pacing": the service's rate split among its live client connections, set
  as SO_MAX_PACING_RATE from sock_ops (work-conserving: what light connections leave goes
  to the others); a paced connection is kept off the socket redirect.
  The one mechanism fits both kinds of host: TCP computes each packet's earliest departure
  time (EDT, Linux >= 4.20) and, where fq is the egress qdisc, stamps it on the skb for fq
  to release (the EDT + fq pacing of Cilium's bandwidth manager, stamped by TCP instead of
  a BPF program); without fq (this kernel has none) TCP holds packets back itself (its
  internal pacing timer, Linux >= 4.13). Nothing queues behind the limit either way.
"""

from __future__ import annotations

import ctypes
import subprocess
from dataclasses import dataclass, field
from functools import cache

from accel.kernel.maps import Map
from accel.model import Limits, ServiceTable

NS_PER_S = 1_000_000_000
BANDWIDTH_MECHANISM = "tcp-pacing"
CONNECTION_MECHANISM = "connect-gcra"
REFUSED_ERRNO = "EPERM"


@dataclass(frozen=True)
class KernelLimit:
    """accel_qos_limits' value for a Limits, in the units the programs compare."""

    conn_interval_ns: int = 0
    conn_tolerance_ns: int = 0
    bandwidth: int = 0  # bytes/s

    @classmethod
    def of(cls, limits: Limits) -> KernelLimit:
        if not limits.connections:
            return cls(bandwidth=limits.bandwidth // 8)
        interval = max(1, round(NS_PER_S / limits.connections))
        return cls(interval, interval * limits.burst, limits.bandwidth // 8)


@dataclass
class QosWriter:
    limits: Map  # accel_qos_limits
    state: Map  # accel_qos_state
    stats: Map  # accel_qos_stats (per-CPU)
    split: Map  # accel_qos_split: the light connections' claims, by window
    # service index -> (service name, what was written): unchanged limits are not rewritten,
    # so a bucket keeps its tokens across unrelated table updates.
    written: dict[int, tuple[str, KernelLimit]] = field(default_factory=dict)

    def apply(self, table: ServiceTable, indexes: dict[str, int]) -> None:
        """Write the limit of every service of `table`; `indexes` maps service name to its
        index in the service maps (ServiceWriter.current)."""
        wanted: dict[int, tuple[str, KernelLimit]] = {}
        for svc in table.services:
            i = indexes.get(svc.name)
            if i is not None:
                wanted[i] = (svc.name, KernelLimit.of(svc.limits))
        for i, (name, kl) in wanted.items():
            old = self.written.get(i)
            if old == (name, kl):
                continue
            if old is None and self._holds(i, kl):
                continue  # a restarted agent's own limit: bucket and live count kept
            if old is None or old[0] != name:
                self._reset(i)  # a new service at this index starts with a full bucket
            self._write(i, kl)
        for i in set(self.written) - set(wanted):
            self._write(i, KernelLimit())
        self.written = {i: v for i, v in wanted.items() if v[1] != KernelLimit()}

    def _holds(self, index: int, kl: KernelLimit) -> bool:
        v = self.limits[ctypes.c_uint32(index)]
        return kl != KernelLimit() and (v.conn_interval_ns, v.conn_tolerance_ns,
                                        v.bandwidth) == (kl.conn_interval_ns,
                                                         kl.conn_tolerance_ns, kl.bandwidth)

    def _write(self, index: int, kl: KernelLimit) -> None:
        old = self.limits[ctypes.c_uint32(index)]
        v = self.limits.Leaf()
        v.conn_interval_ns, v.conn_tolerance_ns, v.bandwidth = (
            kl.conn_interval_ns, kl.conn_tolerance_ns, kl.bandwidth)
        # A new connection limit refills the bucket (lib/qos.h); a bandwidth change alone
        # leaves it as it is.
        same = (old.conn_interval_ns, old.conn_tolerance_ns) == (kl.conn_interval_ns,
                                                                 kl.conn_tolerance_ns)
        v.gen = old.gen if same else old.gen + 1
        self.limits[ctypes.c_uint32(index)] = v

    def _reset(self, index: int) -> None:
        self.state[ctypes.c_uint32(index)] = self.state.Leaf()
        self.split[ctypes.c_uint32(index)] = self.split.Leaf()
        self.stats[ctypes.c_uint32(index)] = self.stats.Leaf()

    def per_service(self, indexes: dict[str, int]) -> dict[str, dict[str, int]]:
        """name -> {admitted, refused, paced, repaced, live} for services with a limit."""
        out: dict[str, dict[str, int]] = {}
        for i, (name, _) in self.written.items():
            if indexes.get(name) != i:
                continue
            cpus = self.stats[ctypes.c_uint32(i)]
            st = self.state[ctypes.c_uint32(i)]
            out[name] = {f: int(sum(getattr(c, f) for c in cpus))
                         for f in ("admitted", "refused", "paced", "repaced")}
            out[name]["live"] = int(st.live)
            sp = self.split[ctypes.c_uint32(i)]
            # Connections using less than their share in the last full window: the others
            # share what they leave (lib/qos.h).
            out[name]["light"] = int(sp.light_prev)
        return out




@cache
def kernel_qdiscs() -> dict[str, bool]:
    """Which qdiscs this kernel has (fq: EDT pacing possible), each tried on the loopback of
    a throwaway network namespace (`unshare --net`): nothing of the host's is touched."""
    found: dict[str, bool] = {}
    for kind in ("fq", "htb", "tbf"):
        try:
            r = subprocess.run(["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root",
                                kind], capture_output=True, timeout=5)
            found[kind] = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            found[kind] = False
    return found


def mechanisms() -> dict[str, str]:
    """What this host's QoS uses, for doctor and status."""
    fq = kernel_qdiscs().get("fq", False)
    return {
        "bandwidth": BANDWIDTH_MECHANISM,
        "bandwidth_note": ("fq on this kernel: where it is the egress qdisc, TCP stamps each "
                           "packet's departure time (EDT) at the paced rate and fq releases "
                           "it then; elsewhere TCP's internal pacing (SO_MAX_PACING_RATE "
                           "from sock_ops)" if fq else
                           "no fq qdisc on this kernel: TCP's internal pacing "
                           "(SO_MAX_PACING_RATE from sock_ops), no qdisc, nothing queued"),
        "connections": CONNECTION_MECHANISM,
        "refused_errno": REFUSED_ERRNO,
    }
