"""`accel uninstall`: remove every trace of an agent on a pin directory, whether it stopped
with --keep, crashed, or was SIGKILLed: cgroup attachments, pinned programs and maps,
state and lock files."""

from __future__ import annotations

import argparse

from accel.commands.common import add_datapath_args, fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("uninstall", help="detach and remove everything an agent left behind")
    add_datapath_args(p, cgroup=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accel.datapath.datapath import AlreadyRunning, uninstall

    try:
        done = uninstall(args.pin_dir)
    except AlreadyRunning as e:
        return fail(str(e))
    print(f"uninstalled {done.pin_dir}: {len(done.detached)} cgroup programs detached, "
          f"{', '.join(done.interfaces) + ' removed, ' if done.interfaces else ''}"
          f"pins {'removed' if done.had_pins else 'absent'}")
    return 0
