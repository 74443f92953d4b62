"""`accel lab up|down|list`: the lab mesh of pods (network namespaces on a bridge)."""

from __future__ import annotations

import argparse

from accel.commands.common import add_json_arg, fail, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="a mesh of N pods as network namespaces, for trying things")
    lsub = p.add_subparsers(dest="lab_command", metavar="up|down|list", required=True)
    up = lsub.add_parser("up", help="create N pods on a bridge and print them")
    up.add_argument("-n", "--pods", type=int, default=3)
    up.add_argument("--prefix", default=None, help="name prefix (default: random ax<hex>)")
    up.add_argument("--subnet", default="10.200.0.0/24")
    up.add_argument("--routed", action="store_true",
                    help="no bridge: a /32 route per pod and the node forwarding (Calico's "
                    "shape) instead of pods on one bridge")
    add_json_arg(up)
    down = lsub.add_parser("down", help="remove a lab (works after a crash)")
    down.add_argument("prefix", nargs="?", help="lab prefix (default: every recorded lab)")
    lsub.add_parser("list", help="recorded labs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accel import lab

    if args.lab_command == "up":
        if not 1 <= args.pods <= 200:
            return fail("--pods must be between 1 and 200", code=2)
        kw = {"prefix": args.prefix} if args.prefix else {}
        try:
            mesh = lab.Lab(args.pods, subnet=args.subnet, routed=args.routed, **kw).up()
        except (ValueError, OSError) as e:
            return fail(f"lab up: {e}", code=2 if isinstance(e, ValueError) else 1)
        info = mesh.describe()
        if args.json:
            print_json(info)
        else:
            for pod in info["pods"]:
                print(f"{pod['name']}  {pod['ip']}  {pod['ip6']}")
            print(f"run in a pod: ip netns exec {info['pods'][0]['name']} <cmd>")
            print(f"remove: accel lab down {info['prefix']}")
        return 0
    if args.lab_command == "down":
        prefixes = [args.prefix] if args.prefix else lab.recorded()
        for prefix in prefixes:
            removed = lab.remove(prefix)
            print(f"{prefix}: removed {len(removed)} namespaces")
        return 0
    for prefix in lab.recorded():
        print(prefix)
    return 0
