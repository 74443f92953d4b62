"""`accel services`: the service table the running agent serves."""

from __future__ import annotations

import argparse

from accel.commands.common import add_json_arg, print_json, print_table, printable
from accel.commands.status import add_api_arg, call
from accel.model import port_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("services", help="the running agent's services and endpoints")
    add_json_arg(p)
    add_api_arg(p)
    p.set_defaults(func=run)


def _hostport(addr: str, port: int | str) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _vip(s: dict) -> str:
    """VIP:port/protocol; port 0 (--json) is every port of the VIP, shown as `*`."""
    return f"{_hostport(s['vip'], port_text(s['port']))}/{s['protocol']}"


def _limits(lim: dict) -> str:
    """`50Mbit, 100/s burst 20`, or `-` for none."""
    parts = [str(lim["bandwidth"])] if "bandwidth" in lim else []
    if "connections" in lim:
        parts.append(f"{lim['connections']} burst {lim['burst']}")
    return ", ".join(parts) or "-"


def run(args: argparse.Namespace) -> int:
    from accel.api import client

    out, code = call(client.list_services, args.api_socket)
    if out is None:
        return code
    if args.json:
        print_json(out)
        return 0
    rows = []
    left = [s for s in out["services"] if not s.get("accelerated", True)]
    for s in out["services"]:
        if not s.get("accelerated", True):
            continue
        eps = [f"{_hostport(e['address'], e['port'])} w={e['weight']}"
               + ("" if e["healthy"] else " (unhealthy)") for e in s["endpoints"]]
        rows.append([s["name"], _vip(s),
                     s.get("fastpath", "route"), "yes" if s["edge"] else "no",
                     _limits(s.get("limits") or {}), ", ".join(eps) or "(none)"])
    print_table(rows, ["service", "vip", "fastpath", "edge", "limits", "endpoints"])
    print(f"\nconfig version {printable(out['config_version'] or '(none)')}, {len(rows)} "
          "services")
    if left:
        print()
        print_table([[s["name"], _vip(s), "; ".join(s["reasons"])] for s in left],
                    ["left to the kernel path", "vip", "why"])
    return 0
