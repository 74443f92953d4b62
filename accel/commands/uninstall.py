"""`accel uninstall`: remove every trace of an agent on a pin directory, whether it stopped
with --keep, crashed, or was SIGKILLed: cgroup attachments, pinned programs and maps,
state and lock files, and its API socket file if no agent listens on it."""

from __future__ import annotations

import argparse

from accel.commands.common import add_datapath_args, fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("uninstall", help="detach and remove everything an agent left behind")
    add_datapath_args(p, cgroup=False)
    p.add_argument("--api-socket", default=None,
                   help="the agent's API socket, removed if no agent listens on it (default "
                   "/run/accel/agent.sock, or $ACCEL_API_SOCKET; '' leaves it alone)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accel.datapath.datapath import AlreadyRunning, uninstall

    try:
        done = uninstall(args.pin_dir)
    except AlreadyRunning as e:
        return fail(str(e))
    sock = _remove_socket(args.api_socket)
    print(f"uninstalled {done.pin_dir}: {len(done.detached)} cgroup programs detached, "
          f"{', '.join(done.interfaces) + ' removed, ' if done.interfaces else ''}"
          f"pins {'removed' if done.had_pins else 'absent'}{sock}")
    return 0


def _remove_socket(path: str | None) -> str:
    """The API socket a SIGKILLed agent left; never one an agent (of any pin dir) serves."""
    if path == "":
        return ""
    from accel.api.client import DEFAULT_SOCKET
    from accel.api.server import remove_stale_socket

    path = path or DEFAULT_SOCKET
    done = remove_stale_socket(path)
    if done in ("removed", "absent"):
        return f", API socket {path} {done}"
    why = "an agent listens on it" if done == "live" else done
    return f", API socket {path} left ({why})"
