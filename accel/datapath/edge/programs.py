"""The edge programs (accel/bpf/edge_lb.c: the balancer at XDP or tc ingress, and XDP's tc
follow-up; edge_tc.c: replies) as a loader unit, and
the pins under which their maps outlive an agent (created on first load, adopted by the
next agent)."""

from __future__ import annotations

import logging
from pathlib import Path

from accel import maglev
from accel.datapath.edge.errors import EdgeError
from accel.kernel import loader
from accel.kernel.bpf import pinned_map_info

log = logging.getLogger(__package__)

BPF_DIR = loader.bpf_dir()
EDGE_H = BPF_DIR / "lib" / "edge.h"
PROGRAMS = (loader.Program("edge_lb.c", "edge_xdp", "xdp"),
            loader.Program("edge_lb.c", "edge_ingress", "sched_cls"),
            loader.Program("edge_lb.c", "edge_tc_balance", "sched_cls"),
            loader.Program("edge_tc.c", "edge_tc", "sched_cls"),
            loader.Program("edge_tc.c", "edge_reply", "sched_cls"))

PIN_MAPS = (
    "edge_vips", "edge_rings", "edge_backends", "edge_conns", "edge_revs", "edge_deny",
    "edge_syn", "edge_config", "edge_vip_stats", "edge_counters", "edge_tx", "edge_limits",
    "edge_uplink", "edge_rports",
)


def load(pin_dir: Path, defines: dict[str, int | str]) -> loader.Loaded:
    """Both programs pinned under pin_dir (compiled by the loader, or reused as they are)."""
    try:
        return loader.ensure(loader.Unit("edge", PROGRAMS, defines), pin_dir)
    except loader.LoadError as e:
        raise EdgeError(f"edge programs failed to load: {e}") from e


def drop_stale_pins(pin_dir: Path, expected: dict[str, int]) -> None:
    """Pins from an agent with other sizes would silently mis-index: start them afresh."""
    stale = []
    for name, want in expected.items():
        path = pin_dir / name
        if path.exists() and pinned_map_info(str(path)).max_entries != want:
            stale.append(name)
    if stale:
        log.warning("edge: pinned maps %s have other sizes: recreating all", stale)
        unpin(pin_dir)


def unpin(pin_dir: Path) -> None:
    loader.forget(pin_dir, "edge", [p.function for p in PROGRAMS])
    for name in PIN_MAPS:
        try:
            (pin_dir / name).unlink()
        except FileNotFoundError:
            pass


def pinned_sizes(pin_dir: Path) -> dict | None:
    """The EdgeDatapath sizes the maps pinned under pin_dir were made with; None when no edge
    was ever set up there."""
    if not all((pin_dir / m).exists() for m in PIN_MAPS):
        return None
    vips = pinned_map_info(str(pin_dir / "edge_vip_stats")).max_entries
    rows = pinned_map_info(str(pin_dir / "edge_rings")).max_entries // (vips + 1)
    return {
        "maglev_size": prime_for_rows(rows),
        "max_vips": vips,
        "max_backends": pinned_map_info(str(pin_dir / "edge_backends")).max_entries,
        "conn_max": pinned_map_info(str(pin_dir / "edge_conns")).max_entries,
        "tx_max": pinned_map_info(str(pin_dir / "edge_tx")).max_entries,
    }


def prime_for_rows(rows: int) -> int:
    for n in range(rows * 16, (rows - 1) * 16, -1):
        if maglev.is_prime(n):
            return n
    raise EdgeError(f"pinned edge_rings has {rows} rows per ring: no prime size fits")
