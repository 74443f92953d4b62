"""`accel agent`: arguments -> runtime Settings, checked before anything is loaded; then the
Runtime (accel/runtime.py) runs until SIGTERM/SIGINT and detaches and unpins everything (or
leaves it for the next agent: --keep)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
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
    p.add_argument("--node-cluster", default="meshaccel", help="xDS node cluster")
    p.add_argument("--node-meta", action="append", default=[], metavar="KEY=VALUE",
                   help="xDS node metadata (repeatable; istiod wants e.g. NAMESPACE, "
                   "ISTIO_VERSION, CLUSTER_ID, INSTANCE_IPS); a VALUE that is a JSON object "
                   "or list is sent as one")
    p.add_argument("--xds-api", choices=("envoy", "workload"), default="envoy",
                   help="what the xDS server speaks: envoy (Listener/Cluster/Endpoint, the "
                   "default) or workload (Istio ambient's Address/Authorization over Delta, "
                   "as istiod serves ztunnel)")
    p.add_argument("--node-name", metavar="NODE",
                   help="with --xds-api workload: this host's node name; workloads on it "
                   "are its mesh pods, whose inbound connections it authorizes")
    p.add_argument("--cluster-id", default="Kubernetes", metavar="ID",
                   help="with --xds-api workload: the mesh cluster id (istiod's CLUSTER_ID)")
    p.add_argument("--fastpath", choices=("route", "redirect"), default=None,
                   help="with --xds-api workload: the fast path of its services (the API has "
                   "no field for it; default route, see README 'The fast path')")
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
    p.add_argument("--flow-log", metavar="FILE",
                   help="write every connection record here as a JSON line (rotated at "
                   "64 MiB, 5 kept: FILE.1 ... FILE.5)")
    p.add_argument("--no-flows", action="store_true",
                   help="no connection records (accel flows, per-service connection metrics)")
    p.add_argument("--edge-iface", metavar="IFACE",
                   help="run the XDP/TC edge load balancer on this interface")
    p.add_argument("--edge-hook", choices=("auto", "native", "generic", "tc"), default="auto",
                   help="where the edge balancer runs: native or generic XDP, or tc ingress "
                   "(after GRO; auto: tc on a veth, whose XDP copies every packet, else "
                   "native XDP, else generic)")
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
                   "sockets, mesh_nets, services, slots, revnat, pods, pod_flows, "
                   "policy_addrs, policy_cidrs, policy_dsts, policy_rules, policy_netns, "
                   "policies, flow_ring)")
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


def parse_node_meta(items: list[str]) -> tuple[tuple[str, object], ...]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValidationError("--node-meta", f"{item!r}: expected KEY=VALUE")
        parsed: object = value
        if value[:1] in "{[":
            try:
                parsed = json.loads(value)
            except ValueError as e:
                raise ValidationError("--node-meta", f"{key}: not JSON: {e}") from None
        out[key] = parsed
    return tuple(out.items())


def run(args: argparse.Namespace) -> int:
    from accel import config

    # Everything that can be checked is checked before anything is loaded.
    try:
        table = config.load(args.config) if args.config else None
        caps = parse_capacities(args.capacity)
        if table is not None:
            config.check_fits(table, caps)
        node_meta = parse_node_meta(args.node_meta)
        if (args.node_meta or args.node_cluster != "meshaccel") and not args.xds:
            raise ValidationError("--node-meta", "--node-meta and --node-cluster go with --xds")
        if args.xds_delta and not args.xds:
            raise ValidationError("--xds-delta", "goes with --xds HOST:PORT")
        if args.xds_api == "workload":
            if not args.xds:
                raise ValidationError("--xds-api", "workload goes with --xds HOST:PORT")
            if not args.node_name:
                raise ValidationError("--node-name", "--xds-api workload needs this host's "
                                      "node name (the `node` of its workloads)")
        elif args.node_name or args.cluster_id != "Kubernetes" or args.fastpath:
            raise ValidationError("--node-name", "--node-name, --cluster-id and --fastpath "
                                  "go with --xds-api workload")
        if args.pod_netns and not args.pod_iface:
            raise ValidationError("--pod-netns", "goes with --pod-iface NAME")
        if args.pod_netns:
            from accel.datapath.podroute import netns_path

            if not os.path.exists(netns_path(args.pod_netns) or ""):
                raise ValidationError("--pod-netns", f"{args.pod_netns!r}: no such network "
                                      "namespace (`ip netns list` names them)")
        if args.flow_log and args.no_flows:
            raise ValidationError("--flow-log", "needs connection records: drop --no-flows")
        if args.flow_log:
            where = os.path.dirname(os.path.abspath(args.flow_log))
            if not os.path.isdir(where) or not os.access(where, os.W_OK):
                raise ValidationError("--flow-log", f"{args.flow_log!r}: directory {where} "
                                      "does not exist or is not writable")
        if args.api_listen and not (args.api_insecure or (args.api_tls_cert and args.api_tls_key)):
            raise ValidationError("--api-listen", "TCP needs --api-tls-cert/--api-tls-key "
                                  "(or --api-insecure on a trusted network)")
    except ValidationError as e:
        return fail(f"invalid input: {e}", code=2)

    from accel.datapath.datapath import AlreadyRunning
    from accel.kernel.loader import LoadError
    from accel.runtime import ApiSettings, ApplyError, Runtime, Settings, XdsSettings

    settings = Settings(
        pin_dir=args.pin_dir, cgroup=args.cgroup, capacities=caps, keep=args.keep,
        config=args.config,
        xds=XdsSettings(args.xds, node_id=args.node_id or "",
                        delta=args.xds_delta or args.xds_api == "workload",
                        api=args.xds_api, node_name=args.node_name or "",
                        cluster_id=args.cluster_id, fastpath=args.fastpath or "route",
                        node_cluster=args.node_cluster, node_meta=node_meta,
                        ca=args.xds_ca, cert=args.xds_cert, key=args.xds_key)
        if args.xds else None,
        edge_iface=args.edge_iface, edge_hook=args.edge_hook, maglev_size=args.maglev_size,
        pod_ifaces=tuple(args.pod_iface), pod_netns=args.pod_netns,
        api=ApiSettings(unix_path=args.api_socket or None, tcp_addr=args.api_listen,
                        tls_cert=args.api_tls_cert, tls_key=args.api_tls_key,
                        tls_client_ca=args.api_tls_client_ca, insecure=args.api_insecure),
        metrics=args.metrics,
        flows=not args.no_flows, flow_log=args.flow_log,
    )
    runtime = Runtime(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # The table was read and checked above; the runtime applies that very one.
        runtime.start(table)
    except AlreadyRunning as e:
        return fail(str(e))
    except ValidationError as e:
        return fail(f"invalid input: {e}", code=2)
    except ApplyError as e:
        return fail(f"the table was not applied: {e}")
    except (LoadError, OSError, RuntimeError) as e:  # bpf(2), attach and cgroup errors
        return fail(f"cannot load the datapath: {e}\n"
                    "nothing was changed; `accel doctor` tells what this kernel lacks")
    except Exception as e:
        log.exception("agent failed")
        return fail(f"agent failed: {e}")
    log.info("SIGTERM or Ctrl-C to stop")
    stop.wait()
    runtime.stop()
    return 0
