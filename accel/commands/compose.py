"""`accel compose`: docker-compose helpers. `hosts`: the name -> VIP mapping for a compose
project, as an override file of extra_hosts (or /etc/hosts lines)."""

from __future__ import annotations

import argparse
import sys

from accel.commands.common import fail
from accel.model import ValidationError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compose", help="docker-compose helpers (name -> VIP mapping)")
    csub = p.add_subparsers(dest="compose_command", metavar="SUBCOMMAND")
    h = csub.add_parser(
        "hosts",
        help="extra_hosts override giving every container the mesh services' VIPs",
        description="Print a compose override file that maps each meshaccel.service name to "
        "the VIP `accel controller --docker` allocates for it (same CIDR, same names, same "
        "VIPs). Use it as an extra -f file.",
    )
    h.add_argument("-f", "--file", dest="files", action="append", required=True,
                   metavar="COMPOSE_FILE", help="compose file(s), as given to docker-compose")
    h.add_argument("--vip-cidr", default=None,
                   help="the controller's --vip-cidr (default $ACCEL_VIP_CIDR or 10.96.0.0/16)")
    h.add_argument("--format", choices=("compose", "hosts"), default="compose",
                   help="compose: an override file (default); hosts: /etc/hosts lines")
    h.add_argument("-o", "--output", help="write here instead of stdout")
    h.set_defaults(func=run_hosts)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_hosts(args: argparse.Namespace) -> int:
    from accel import compose_hosts

    try:
        if args.format == "hosts":
            text = compose_hosts.render_hosts(compose_hosts.vip_map(args.files, args.vip_cidr))
        else:
            text = compose_hosts.render_override(args.files, args.vip_cidr)
    except ValidationError as e:
        return fail(f"invalid input: {e}", code=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
