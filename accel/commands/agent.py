"""`accel agent`: load the datapath, feed it from mesh.yaml or xDS, serve the API, run until
SIGTERM/SIGINT, then detach and unpin everything (or leave it for the next agent: --keep)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import fields, replace

from accel.commands.common import add_datapath_args, fail
from accel.model import ValidationError

log = logging.getLogger("accel.agent")

DEFAULT_API_SOCKET = "/run/accel/agent.sock"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the meshaccel agent (datapath + config + API)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="MESH_YAML", help="service table from a mesh.yaml file")
    src.add_argument("--xds", metavar="HOST:PORT", help="service table from an xDS (ADS) server")
    p.add_argument("--node-id", default=None, help="xDS node id (default: meshaccel-<hostname>)")
    p.add_argument("--xds-ca", metavar="PEM", help="CA bundle: use TLS to the xDS server")
    p.add_argument("--xds-cert", metavar="PEM", help="client certificate for mutual TLS")
    p.add_argument("--xds-key", metavar="PEM", help="client key for mutual TLS")
    p.add_argument("--xds-delta", action="store_true",
                   help="incremental (Delta) xDS instead of state of the world: the server "
                   "sends only what changed")
    add_datapath_args(p)
    p.add_argument("--keep", action="store_true",
                   help="on exit leave programs and maps in place for the next agent")
    p.add_argument("--api-socket", default=DEFAULT_API_SOCKET,
                   help=f"unix socket of the gRPC API, root-only (default {DEFAULT_API_SOCKET}; "
                   "'' disables)")
    p.add_argument("--api-listen", metavar="HOST:PORT",
                   help="also serve the API on TCP (needs --api-tls-* or --api-insecure)")
    p.add_argument("--api-insecure", action="store_true",
                   help="allow --api-listen without TLS (trusted networks only)")
    p.add_argument("--api-tls-cert", metavar="PEM")
    p.add_argument("--api-tls-key", metavar="PEM")
    p.add_argument("--api-tls-client-ca", metavar="PEM",
                   help="require client certificates signed by this CA")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.add_argument("--edge-iface", metavar="IFACE",
                   help="run the XDP/TC edge load balancer on this interface")
    p.add_argument("--maglev-size", type=int, default=65537,
                   help="Maglev table size per edge VIP (a prime; default 65537)")
    p.add_argument("--pod-iface", action="append", default=[], metavar="NAME",
                   help="host-side veth of a local mesh pod (a name or glob such as 'veth*'; "
                   "repeat for more): packets between such pods on one bridge skip the bridge")
    p.add_argument("--pod-netns", metavar="NETNS",
                   help="network namespace holding those veths and their bridge (an `ip netns` "
                   "name or a path; default: the agent's own)")
    p.add_argument("--capacity", action="append", default=[], metavar="NAME=N",
                   help="map capacity, e.g. services=20000 (names: "
                   "sockets, mesh_nets, services, slots, revnat, pods, pod_flows)")
    p.set_defaults(func=run)


def parse_capacities(items: list[str]):
    from accel.datapath.datapath import Capacities

    caps = Capacities()
    names = {f.name for f in fields(Capacities)}
    for item in items:
        for part in item.split(","):
            name, sep, value = part.partition("=")
            if not sep or name not in names or not value.isdigit() or int(value) < 1:
                raise ValidationError("--capacity", f"{part!r}: expected NAME=N with NAME one "
                                      f"of {', '.join(sorted(names))} and N >= 1")
            caps = replace(caps, **{name: int(value)})
    return caps


def run(args: argparse.Namespace) -> int:
    from accel import config

    # Everything that can be checked is checked before anything is loaded.
    try:
        table = config.load(args.config) if args.config else None
        caps = parse_capacities(args.capacity)
        if table is not None:
            config.check_fits(table, caps)
        if args.xds_delta and not args.xds:
            raise ValidationError("--xds-delta", "goes with --xds HOST:PORT")
        if args.pod_netns and not args.pod_iface:
            raise ValidationError("--pod-netns", "goes with --pod-iface NAME")
        if args.pod_netns:
            from accel.datapath.podroute import netns_path

            if not os.path.exists(netns_path(args.pod_netns) or ""):
                raise ValidationError("--pod-netns", f"{args.pod_netns!r}: no such network "
                                      "namespace (`ip netns list` names them)")
        if args.api_listen and not (args.api_insecure or (args.api_tls_cert and args.api_tls_key)):
            raise ValidationError("--api-listen", "TCP needs --api-tls-cert/--api-tls-key "
                                  "(or --api-insecure on a trusted network)")
    except ValidationError as e:
        return fail(f"invalid input: {e}", code=2)

    from accel.agent import Agent
    from accel.datapath.datapath import AlreadyRunning, Datapath
    from accel.kernel.loader import LoadError

    dp = Datapath(pin_dir=args.pin_dir, cgroup_path=args.cgroup, capacities=caps)
    try:
        dp.start()
    except AlreadyRunning as e:
        return fail(str(e))
    except (LoadError, OSError, RuntimeError) as e:
        return fail(f"cannot load the datapath: {e}\n"
                    "nothing was changed; `accel doctor` tells what this kernel lacks")
    agent = Agent(dp, source=f"file:{args.config}" if args.config else f"xds:{args.xds}")
    stoppers: list = []
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    code = 0
    chores: list = []
    try:
        if args.edge_iface:
            from accel.datapath.edge import EdgeDatapath

            edge = EdgeDatapath(args.edge_iface, pin_dir=dp.pin_dir, maglev_size=args.maglev_size)
            mode = edge.attach()
            log.info("edge balancer on %s (XDP %s mode)", args.edge_iface, mode)
            dp.record(edge_iface=args.edge_iface)
            if not args.keep:
                stoppers.append(edge.close)
            agent.edge = edge
            chores.append((edge.refresh, True))
            chores.append((_every(10, edge.compact), True))
        if args.pod_iface:
            agent.pods = _start_pod_routing(args, dp, caps, stoppers, chores)
        if chores:
            stoppers.append(_housekeeping(agent, chores, stop))
        stoppers.extend(_start_source(args, agent, table))
        stoppers.extend(_start_api(args, agent))
        log.info("agent running (pin dir %s, cgroup %s); SIGTERM or Ctrl-C to stop",
                 dp.pin_dir, dp.cgroup)
        stop.wait()
    except ValidationError as e:
        code = fail(f"invalid input: {e}", code=2)
    except Exception as e:
        log.exception("agent failed")
        code = fail(f"agent failed: {e}")
    finally:
        for s in reversed(stoppers):
            try:
                s()
            except Exception as e:
                log.warning("stopping: %s", e)
        dp.close(keep=args.keep)
        log.info("agent stopped%s", " (datapath kept)" if args.keep else ", datapath removed")
    return code


def _start_pod_routing(args: argparse.Namespace, dp, caps, stoppers: list, chores: list):
    """Pod routing, or, when it cannot run here, an Unavailable that says why: the rest of
    the datapath serves on and pod traffic keeps the bridge (fail open)."""
    from accel.datapath.podroute import PodRouter, Unavailable

    patterns = tuple(args.pod_iface)
    try:
        pods = PodRouter(dp.pin_dir, patterns, netns=args.pod_netns, capacity=caps.pods,
                         flows=caps.pod_flows)
    except Exception as e:
        log.error("pod routing unavailable, pod traffic stays on the bridge: %s", e)
        return Unavailable(patterns, args.pod_netns, str(e))
    dp.record(pod_netns=args.pod_netns or "", pod_prog_id=pods.prog_id)
    if not args.keep:
        stoppers.append(pods.close)
    pods.refresh()
    log.info("pod routing on %d ports (%s)", len(pods.ports), ", ".join(patterns))
    # Outside the agent's lock: it touches only its own map and filters, and reading many
    # pods' namespaces must not hold up an xDS update.
    chores.append((pods.refresh, False))
    return pods


def _every(n: int, fn):
    ticks = {"n": 0}

    def tick() -> None:
        ticks["n"] += 1
        if ticks["n"] % n == 0:
            fn()

    return tick


def _housekeeping(agent, chores: list, stop: threading.Event):
    """Once a second, each chore (fn, under the agent's lock?): the edge's neighbours resolve
    and MACs move after a table is applied, churn leaves ring slots to compact, and pods
    come and go."""

    def loop() -> None:
        while not stop.wait(1.0):
            for chore, locked in chores:
                try:
                    if locked:
                        with agent.lock:
                            chore()
                    else:
                        chore()
                except Exception as e:  # never let housekeeping take the agent down
                    log.warning("housekeeping: %s", e)

    t = threading.Thread(target=loop, name="housekeeping", daemon=True)
    t.start()
    return lambda: t.join(timeout=5)


def _start_source(args: argparse.Namespace, agent, table) -> list:
    if table is not None:
        from accel.sources.file import FileSource

        agent.apply_table(table, version="file-1")
        source = FileSource(args.config)
        counter = {"n": 1}

        def on_change(t) -> None:
            counter["n"] += 1
            try:
                agent.apply_table(t, version=f"file-{counter['n']}")
            except Exception as e:
                log.error("new %s not applied, keeping the last good one: %s", args.config, e)

        source.watch(on_change)
        return [source.close]

    import socket

    import grpc

    from accel.xds.client import XdsClient

    creds = None
    if args.xds_ca:
        def read(p: str | None) -> bytes | None:
            return open(p, "rb").read() if p else None

        creds = grpc.ssl_channel_credentials(read(args.xds_ca), read(args.xds_key),
                                              read(args.xds_cert))
    node_id = args.node_id or f"meshaccel-{socket.gethostname()}"
    client = XdsClient(args.xds, node_id, on_update=agent.apply_table, credentials=creds,
                       delta=args.xds_delta)
    agent.xds_state = client.state
    # ACK/NACK as the protocol saw them (a NACK of a malformed resource never reaches
    # apply_table, so the agent would not know of it otherwise).
    client.events.append(lambda kind, info: agent.emit(
        "xds", f"{kind}: " + ", ".join(f"{k}={v}" for k, v in sorted(info.items())),
        str(info.get("version", ""))))
    client.start()
    return [client.stop]


def _start_api(args: argparse.Namespace, agent) -> list:
    stoppers = []
    try:
        from accel.api import server as api_server
    except ImportError:
        api_server = None
    if api_server is not None and (args.api_socket or args.api_listen):
        handle = api_server.serve(
            agent,
            unix_path=args.api_socket or None,
            tcp_addr=args.api_listen,
            tls_cert=args.api_tls_cert,
            tls_key=args.api_tls_key,
            tls_client_ca=args.api_tls_client_ca,
            insecure=args.api_insecure,
        )
        stoppers.append(handle.stop)
    if args.metrics:
        try:
            from accel.api import metrics
        except ImportError:
            print("accel agent: --metrics is not available in this build", file=sys.stderr)
        else:
            stoppers.append(metrics.serve(agent, args.metrics).stop)
    return stoppers
