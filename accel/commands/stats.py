"""`accel stats`: the datapath counters, read from the pinned maps (no agent needed),
with per-service figures from the agent's API when one is running."""

from __future__ import annotations

import argparse
import sys

from accel.commands.common import add_datapath_args, add_json_arg, fail, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="datapath counters (works with or without a running agent)")
    add_datapath_args(p, cgroup=False)
    add_json_arg(p)
    p.add_argument("--api-socket", default=None, help="agent API socket for per-service figures")
    p.set_defaults(func=run)


def _from_api(socket_path: str | None) -> dict | None:
    try:
        from accel.api import client
    except ImportError:
        return None
    try:
        return client.get_stats(socket_path)
    except Exception as e:
        if socket_path:  # asked for by name: say why the per-service figures are missing
            print(f"accel: no per-service figures: {e}", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    from accel.datapath import counters

    try:
        numbers = counters.read(args.pin_dir)
    except (FileNotFoundError, OSError) as e:
        return fail(str(e))
    extra = _from_api(args.api_socket) or {}
    if args.json:
        print_json({**numbers, "services": extra.get("services", {}), "edge": extra.get("edge"),
                    "flows": extra.get("flows")})
        return 0
    print_table([[k, v] for k, v in numbers.items()], ["counter", "value"])
    if extra.get("services"):
        print()
        print_table([[n, s.get("connects", 0), s.get("no_backend", 0)]
                     for n, s in extra["services"].items()],
                    ["service", "connects", "no_backend"])
    if extra.get("flows"):
        print()
        print_table([[f"flow_{k}", v] for k, v in extra["flows"].items()], ["records", "value"])
    return 0
