"""`accel uninstall`: remove every trace of an agent on a pin directory, whether it stopped
with --keep, crashed, or was SIGKILLed: cgroup attachments, pinned programs and maps,
state and lock files."""

from __future__ import annotations

import argparse
import json

from accel.commands.common import add_datapath_args, fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("uninstall", help="detach and remove everything an agent left behind")
    add_datapath_args(p, cgroup=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import fcntl
    import os

    from accel.datapath import datapath as dpmod

    pin_dir = os.path.abspath(args.pin_dir)
    lock = dpmod.lock_file(pin_dir)
    if lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fail(f"an agent is running on {pin_dir}: stop it first (SIGTERM)")
        finally:
            os.close(fd)
    state_path = dpmod.state_file(pin_dir)
    detached: list[int] = []
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = None
    if state:
        detached = dpmod.detach_cgroup_programs(state.get("cgroup"),
                                                set(state.get("prog_ids", {}).values()))
    edge_done: list[str] = []
    if state and state.get("edge_iface"):
        from accel.datapath.edge import detach_from

        edge_done = detach_from(state["edge_iface"])
    had_pins = os.path.isdir(pin_dir)
    dpmod.remove_pins(pin_dir)
    state_path.unlink(missing_ok=True)
    lock.unlink(missing_ok=True)
    print(f"uninstalled {pin_dir}: {len(detached)} cgroup programs detached, "
          f"{', '.join(edge_done) + ' removed, ' if edge_done else ''}"
          f"pins {'removed' if had_pins else 'absent'}")
    return 0
