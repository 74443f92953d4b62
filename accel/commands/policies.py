"""`accel policies`: the L4 authorization the running agent enforces, with per-policy
counters (allowed, denied, dry-run denied, closed by an update)."""

from __future__ import annotations

import argparse

from accel.commands.common import add_json_arg, print_json, print_table
from accel.commands.status import add_api_arg, call

COLUMNS = ("allowed", "denied", "dry_run_denied", "closed_by_update")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="L4 authorization policies enforced and their counters")
    add_json_arg(p)
    add_api_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accel.api import client

    st, code = call(client.get_status, args.api_socket)
    if st is None:
        return code
    pol = st.get("policy")
    if args.json:
        print_json(pol or {"policies": {}})
        return 0
    if pol is None:
        print("no policy enforced (none was ever applied)")
        return 0
    rows = [[name, *(c[k] for k in COLUMNS)] for name, c in pol["policies"].items()]
    rows.append(["(default: no policy decided)", *(pol["default"][k] for k in COLUMNS)])
    print_table(rows, ["policy", *(k.replace("_", " ") for k in COLUMNS)])
    maps = ", ".join(f"{n} {u['used']}/{u['capacity']}" for n, u in pol["maps"].items())
    print(f"\n{pol['namespaces']} local pod namespaces decided at connect(), "
          f"{len(pol['guarded'])} pod interfaces answering denied SYNs; maps: {maps}")
    if pol["ignored"]:
        print()
        print_table([[k, v] for k, v in pol["ignored"].items()], ["not enforced", "why"])
    return 0
