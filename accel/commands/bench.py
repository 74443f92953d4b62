"""`accel bench`: reproducible measurements of what meshaccel saves.

    accel bench [mesh options]        the mesh benchmark (default): kernel vs accel vs sidecars
    accel bench mesh [mesh options]   the same, named
    accel bench edge ...              the XDP edge balancer benchmark (accel/bench/edge.py)
    accel bench connect ...           new-connection latency vs services configured: connect-time
                                      balancing against iptables DNAT (accel/bench/connect.py)
    accel bench xds ...               xDS push of S x E to the kernel maps, agent RSS, one-endpoint
                                      change latency (accel/bench/xds.py)
    accel bench qos ...               a bandwidth limit's accuracy and another service's p99 beside
                                      it: meshaccel's pacing vs tc tbf and htb (accel/bench/qos.py)

Each benchmark is a module under accel/bench/; this file only parses and dispatches.
"""

from __future__ import annotations

import argparse

from accel.commands.common import fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: mesh (default; kernel, accel, sidecars) and edge")
    add_mesh_args(p)
    p.set_defaults(func=run_mesh)
    bsub = p.add_subparsers(dest="bench_command", metavar="[mesh|edge|connect|xds|policy|qos]")
    mesh = bsub.add_parser("mesh", help="the mesh benchmark (what `accel bench` runs by default)")
    add_mesh_args(mesh)
    mesh.set_defaults(func=run_mesh)
    register_edge(bsub)
    register_connect(bsub)
    register_xds(bsub)
    register_policy(bsub)
    register_qos(bsub)


# ---- mesh ------------------------------------------------------------------------------------


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="fewer, shorter repeats (about a minute): a smoke run, not a measurement")
    p.add_argument("--json", metavar="FILE", help="write every raw figure and the environment")
    p.add_argument("--plot", metavar="FILE.png", help="write latency and throughput plots")
    p.add_argument("--cpus", metavar="LIST", default=None,
                   help="CPUs for client, server, client proxy, server proxy, in turn "
                   "(e.g. 1 or 0,1 or 0-1; default: the last CPU for all, the like-with-like "
                   "placement)")
    p.add_argument("--modes", default=None, metavar="LIST",
                   help="comma list of kernel,accel,accel+redirect,sidecar,sidecar+accel,"
                   "iptables-dnat (default: all), accel-noflows,accel+redirect-noflows")
    p.add_argument("--workloads", default=None, metavar="LIST",
                   help="comma list of rr,stream,crr (default: all)")
    p.add_argument("--flows-cost", action="store_true",
                   help="what connection records cost: accel and accel+redirect with records "
                   "on and off (accel-noflows, accel+redirect-noflows), rr and crr, in one run")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds over every mode (default 5; --quick 2)")
    p.add_argument("--seconds", type=float, default=None,
                   help="whole seconds per workload run (default 2; --quick 1)")
    p.add_argument("--sidecar-capture", choices=("redirect", "ports"), default="redirect",
                   help="how the sidecar mode captures traffic: iptables REDIRECT as Istio does "
                   "(default) or explicit proxy ports (as sidecar+accel always does)")
    p.add_argument("--prefix", default=None,
                   help="name prefix of the lab, cgroups and pin dir (default ab<hex>)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--compose", action="store_true",
                   help="the docker-compose example mesh instead: meshaccel (compose/mesh.yml) "
                   "vs haproxy sidecars (compose/sidecar.yml); uses --seconds, --repeats, "
                   "--workloads, --json, --quick (accel/bench/compose.py)")


def run_mesh(args: argparse.Namespace) -> int:
    if getattr(args, "compose", False):
        from accel.bench import compose

        return compose.main(args.seconds, args.repeats, args.workloads, args.quick, args.json,
                            args.quiet)
    from accel.bench import runner

    try:
        config = runner.config_from_args(args)
    except ValueError as e:
        return fail(f"bench: {e}", code=2)
    try:
        missing = runner.missing_prerequisites(config)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return fail(f"bench: {e}")
    if missing:
        return fail("bench: missing " + "; ".join(missing) + " (deploy/setup.sh installs them)")
    return runner.main(config, json_path=args.json, plot_path=args.plot)


# ---- edge ------------------------------------------------------------------------------------


def register_edge(bsub: argparse._SubParsersAction) -> None:
    """`accel bench edge`: owned by the edge benchmark (accel/bench/edge.py)."""
    p = bsub.add_parser(
        "edge", help="ns/packet of the XDP edge balancer (hit, miss, drop) beside an XDP_PASS floor"
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result here")
    p.add_argument("--repeat", type=int, default=1_000_000,
                   help="BPF_PROG_TEST_RUN repeats per round (default 1000000)")
    p.add_argument("--rounds", type=int, default=7, help="rounds per case; the median is kept")
    p.add_argument("--maglev-size", type=int, default=65537, help="ring size (a prime)")
    p.add_argument("--no-lab", action="store_true",
                   help="skip the lab traffic run (edge vs iptables DNAT through namespaces)")
    p.add_argument("--lab-seconds", type=float, default=2.0,
                   help="duration of each lab workload (default 2)")
    p.add_argument("--edge-gro", choices=("on", "off"), default="off",
                   help="GRO on the lab's edge interface (default off, a veth's default: every "
                   "packet is balanced and forwarded alone, as at XDP; on: as a NIC, where "
                   "64 KB packets make the path a few percent of the stream's cost)")
    p.add_argument("--lab-repeats", type=int, default=5,
                   help="lab rotations of every mode; medians are kept (default 5)")
    p.set_defaults(func=run_edge)


def run_edge(args: argparse.Namespace) -> int:
    import json

    from accel import maglev
    from accel.commands.common import print_table

    if args.repeat < 1 or args.rounds < 1:
        return fail("bench edge: --repeat and --rounds must be >= 1", code=2)
    try:
        maglev.check_size(args.maglev_size)
    except ValueError as e:
        return fail(f"bench edge: {e}", code=2)
    from accel.bench import edge

    try:
        result = edge.run(repeat=args.repeat, rounds=args.rounds, maglev_size=args.maglev_size)
    except Exception as e:  # noqa: BLE001 - a benchmark that cannot run says why and fails
        return fail(f"bench edge: {e}")
    if not args.no_lab:
        try:
            result["lab"] = edge.run_lab(args.lab_seconds, args.maglev_size, args.lab_repeats,
                                         edge_gro=args.edge_gro == "on")
        except Exception as e:  # noqa: BLE001 - the packet figures stand without it
            result["lab_error"] = str(e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    print(", ".join(f"{k}={v}" for k, v in result["env"].items()))
    cols = list(result["cases"][0])
    print_table([[c[k] for k in cols] for c in result["cases"]], cols)
    if result.get("lab"):
        print()
        modes = result["lab"]["modes"]
        cols = list(modes[0])
        print_table([[c.get(k) for k in cols] for c in modes], cols)
        print("edge program ns per run: " + ", ".join(
            f"{k} {v}" for k, v in result["lab"]["edge_prog_ns_per_run"].items()))
    if result.get("lab_error"):
        print(f"lab run failed: {result['lab_error']}")
    return 0


# ---- connect and xds (accel/bench/connect.py, accel/bench/xds.py) -----------------------------


def _write_json(path: str | None, result: dict) -> None:
    import json

    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def _say(quiet: bool):
    import sys

    return (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def register_connect(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("connect", help="new-connection latency to a VIP with N services: "
                        "connect-time balancing vs iptables DNAT rules (kube-proxy style)")
    p.add_argument("--services", default="10,1000,10000", metavar="N,N,...",
                   help="service counts to measure (default 10,1000,10000)")
    p.add_argument("--endpoints", type=int, default=3, help="endpoints per service (default 3)")
    p.add_argument("--count", type=int, default=2000,
                   help="timed connections per case and round (default 2000)")
    p.add_argument("--chunks", type=int, default=10,
                   help="the cases alternate in this many chunks of each count (default 10)")
    p.add_argument("--warmup", type=int, default=20,
                   help="untimed connections before each chunk (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all sizes (default 3)")
    p.add_argument("--cpu", type=int, default=None,
                   help="the CPU client and server are pinned to (default: the last)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_connect)


def run_connect(args: argparse.Namespace) -> int:
    from accel.commands.common import print_table

    try:
        sizes = [int(x) for x in args.services.split(",") if x.strip()]
    except ValueError:
        return fail(f"bench connect: --services {args.services!r}: expected N,N,...", code=2)
    from accel.bench import connect

    try:
        result = connect.run(sizes, args.endpoints, args.count, args.warmup, args.rounds,
                             args.chunks, args.cpu, say=_say(args.quiet))
    except ValueError as e:
        return fail(f"bench connect: {e}", code=2)
    except Exception as e:  # noqa: BLE001 - a benchmark that cannot run says why and fails
        return fail(f"bench connect: {e}")
    _write_json(args.json, result)
    print(", ".join(f"{k}={v}" for k, v in result["env"].items()))
    cols = ["case", "services", "connections", "errors", "p50_us", "p90_us", "p99_us", "mean_us"]
    print_table([[c[k] for k in cols] for c in result["cases"]], cols)
    return 0


def register_xds(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("xds", help="agent cold start and warm restart to ready, xDS push of S "
                        "services x E endpoints until the kernel maps are complete, agent RSS, "
                        "and one-endpoint change latency (p50/p99)")
    p.add_argument("--services", type=int, default=10_000, help="services (default 10000)")
    p.add_argument("--endpoints", type=int, default=10, help="endpoints each (default 10)")
    p.add_argument("--changes", type=int, default=300,
                   help="one-endpoint changes to time (default 300)")
    p.add_argument("--seed", type=int, default=1, help="which services/endpoints change")
    p.add_argument("--delta", action="store_true",
                   help="incremental (Delta) xDS instead of state of the world")
    p.add_argument("--shape", choices=("mesh", "istio"), default="mesh",
                   help="what the controller serves: meshaccel's own resources (default) or "
                   "a large Istio mesh as a sidecar gets it (sniffing listener per VIP, mTLS "
                   "clusters); istio times start and push only")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_xds)


def run_xds(args: argparse.Namespace) -> int:
    from accel.bench import xds

    try:
        result = xds.run(args.services, args.endpoints, args.changes, args.seed,
                         say=_say(args.quiet), delta=args.delta, shape=args.shape)
    except ValueError as e:
        return fail(f"bench xds: {e}", code=2)
    except Exception as e:  # noqa: BLE001 - a benchmark that cannot run says why and fails
        return fail(f"bench xds: {e}")
    _write_json(args.json, result)
    print(", ".join(f"{k}={v}" for k, v in result["env"].items()))
    for phase, r in result["start"].items():
        print(f"start {phase}: " + ", ".join(f"{k}={v}" for k, v in r.items()))
    for part in ("push", "change"):
        if result[part] is not None:
            print(f"{part}: " + ", ".join(f"{k}={v}" for k, v in result[part].items()))
    ok = result["push"]["maps_complete"] and (result["change"] is None
                                              or result["change"]["maps_verified"])
    return 0 if ok else 1


# ---- policy (accel/bench/policy.py) -----------------------------------------------------------


def register_policy(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("policy", help="L4 authorization: connection rate through a VIP with "
                        "N policies vs none, update -> enforced, update -> held connection cut")
    p.add_argument("--policies", type=int, default=1000, help="policies loaded (default 1000)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per rate sample")
    p.add_argument("--repeats", type=int, default=5, help="rate samples per case (default 5)")
    p.add_argument("--updates", type=int, default=50, help="one-policy updates timed")
    p.add_argument("--cpu", type=int, default=1, help="the CPU client and server run on")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result here")
    p.set_defaults(func=run_policy)


def run_policy(args: argparse.Namespace) -> int:
    import json

    from accel.bench import policy

    if min(args.policies, args.repeats, args.updates) < 1 or args.seconds <= 0:
        return fail("bench policy: --policies, --repeats, --updates and --seconds must be > 0",
                    code=2)
    try:
        result = policy.run(args.seconds, args.repeats, args.cpu, args.updates, args.policies)
    except Exception as e:  # noqa: BLE001 - a benchmark that cannot run says why and fails
        return fail(f"bench policy: {e}")
    _write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


# ---- qos (accel/bench/qos.py) -----------------------------------------------------------------


def register_qos(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("qos", help="per-service bandwidth limits: rate accuracy of a limited "
                        "iperf3 stream and a ping-pong's p99 to another service beside it, "
                        "meshaccel's pacing vs tc tbf and htb at the same rate")
    p.add_argument("--rates", default=None, metavar="LIST",
                   help="limits to measure, as mesh.yaml writes them (default "
                   "50Mbit,200Mbit,1Gbit)")
    p.add_argument("--duration", type=int, default=3,
                   help="counted seconds of each stream, after --omit (default 3, at least 3: "
                   "the ping-pong beside it, sockperf -t duration-2, takes 2.3 s more)")
    p.add_argument("--omit", type=int, default=1,
                   help="seconds of slow start not counted (iperf3 -O; default 1)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds over every case, order rotated; medians kept (default 3)")
    p.add_argument("--cpus", metavar="LIST", default=None,
                   help="CPU of the stream, CPU of the ping-pong (e.g. 0,1; default: the first "
                   "and the last usable CPU)")
    p.add_argument("--json", metavar="FILE", default=None, help="write every run and the "
                   "environment")
    p.add_argument("--plot", "--png", dest="plot", metavar="FILE.png", default=None,
                   help="write the rate and latency plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_qos)


def run_qos(args: argparse.Namespace) -> int:
    from accel.bench import qos, runner

    try:
        rates = qos.parse_rates(args.rates or qos.DEFAULT_RATES)
        cpus = runner.parse_cpus(args.cpus) if args.cpus else ()
    except ValueError as e:
        return fail(f"bench qos: {e}", code=2)
    if args.duration < 3 or args.omit < 0 or args.repeats < 1:
        return fail("bench qos: --duration must be >= 3, --omit >= 0, --repeats >= 1", code=2)
    if len(cpus) > 2:
        return fail(f"bench qos: --cpus {args.cpus!r}: one or two CPUs (stream, ping-pong)",
                    code=2)
    try:
        result = qos.run(rates, args.duration, args.repeats, args.omit, cpus,
                         say=_say(args.quiet))
    except KeyboardInterrupt:
        return fail("bench qos: interrupted; everything it made was removed", code=130)
    except Exception as e:  # noqa: BLE001 - a benchmark that cannot run says why and fails
        return fail(f"bench qos: {e}")
    _write_json(args.json, result)
    print(qos.table(result))
    if args.plot:
        qos.plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0 if all(c["repeats"] for c in result["cases"]) else 1
