"""`accel compose`: docker-compose helpers. `up|status|down`: a compose mesh as one command
(accel.compose_up); `hosts`: the name -> VIP mapping for a compose project, as an override
file of extra_hosts (or /etc/hosts lines)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accel.commands.common import fail, print_json, print_table
from accel.model import ValidationError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compose", help="docker-compose meshes: up, status, down (and the "
                       "name -> VIP mapping)")
    csub = p.add_subparsers(dest="compose_command", metavar="SUBCOMMAND")
    u = csub.add_parser(
        "up", help="start a compose mesh, with what this host needs found, and wait for the agent",
        description="Find the host's cgroup2 mount (ACCEL_CGROUP2), whether docker can start "
        "privileged containers (if not, add compose/agent-caps.yml), write the name -> VIP "
        "override, run `docker-compose -p PROJECT -f ... up -d`, and wait until the agent is "
        "ready. Exit 0 once it is, 1 if something failed (said why), 2 for bad arguments.")
    _project_args(u)
    u.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                   help="wait up to SECONDS for the agent to be ready (default 120; 0: no wait)")
    u.set_defaults(func=run_up)
    s = csub.add_parser("status", help="a compose mesh's containers and its agent's readiness",
                        description="Exit 0 when every container of the project runs and the "
                        "agent is ready, 1 otherwise.")
    _project_args(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_status)
    d = csub.add_parser(
        "down", help="stop a compose mesh and remove the agent's kept datapath",
        description="`docker-compose down`, then what the agent (run with --keep) left: its "
        "cgroup attachments and pins (as `accel uninstall --pin-dir` of its pin dir), and the "
        "files `accel compose up` generated. Safe to run again.")
    _project_args(d)
    d.set_defaults(func=run_down)
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


def _project_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", dest="files", action="append", required=True,
                   metavar="COMPOSE_FILE", help="compose file(s), as given to docker-compose")
    p.add_argument("-p", "--project-name", dest="project", default=None,
                   help="compose project (default: as docker-compose: $COMPOSE_PROJECT_NAME "
                   "or the first file's directory name)")


def _say(text: str) -> None:
    print(f"accel compose: {text}", flush=True)


def run_up(args: argparse.Namespace) -> int:
    from accel import compose_up

    if args.wait < 0:
        return fail("--wait takes a number of seconds >= 0", code=2)
    try:
        rec = compose_up.up(args.files, args.project, args.wait, _say)
    except compose_up.ComposeError as e:
        code = fail(str(e), code=e.code)
        if e.code == 1:
            project = compose_up.project_name([Path(args.files[0])], args.project)
            print(f"accel: `accel compose down {' '.join(f'-f {f}' for f in args.files)} "
                  f"-p {project}` removes what started", file=sys.stderr)
        return code
    _say(f"project {rec.project} is up"
         + ("" if args.wait else " (agent readiness not waited for)"))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from accel import compose_up

    try:
        st = compose_up.status(compose_up.project_name(
            compose_up.check_files(args.files), args.project))
    except compose_up.ComposeError as e:
        return fail(str(e), code=e.code)
    if args.json:
        print_json(st)
        return 0 if st["ok"] else 1
    if not st["containers"]:
        print(f"project {st['project']}: no containers")
        return 1
    print_table([[c["name"], c["service"], c["state"], c["health"] or "-", c["restarts"]]
                 for c in st["containers"]], ["container", "service", "state", "health",
                                              "restarts"])
    a = st["agent"]
    print()
    if a["ready"]:
        s = a["status"]
        print(f"agent {a['container']}: ready, {s.get('services', 0)} services, "
              f"config {s.get('config_version') or '(none)'}, pin dir {s.get('pin_dir')}, "
              f"cgroup {s.get('cgroup')}")
    else:
        print(f"agent {a['container'] or '-'}: NOT READY: {a.get('error') or '?'}")
    return 0 if st["ok"] else 1


def run_down(args: argparse.Namespace) -> int:
    from accel import compose_up

    try:
        done = compose_up.down(args.files, args.project, _say)
    except compose_up.ComposeError as e:
        return fail(str(e), code=e.code)
    _say(f"project {done['project']} is down")
    return 0


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
