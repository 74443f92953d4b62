"""`accel controller`: serve a mesh's service table over xDS (ADS) to agents and gRPC clients."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from accel.model import ValidationError
from accel.sources import TableSource

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "controller",
        help="serve the service table over xDS (ADS) to agents and proxyless gRPC",
        description="Serve mesh.yaml (reloaded on change) as Envoy v3 xDS resources over "
        "ADS. See README.md, 'xDS mapping'.",
    )
    p.add_argument("--config", metavar="MESH_YAML", help="mesh.yaml to serve (watched)")
    p.add_argument("--listen", default="127.0.0.1:18000", metavar="HOST:PORT",
                   help="gRPC listen address (default %(default)s)")
    p.add_argument("--xds-api", choices=("envoy", "workload"), default="envoy",
                   help="envoy: Listener/Cluster/Endpoint resources (agents, proxyless "
                   "gRPC); workload: Istio ambient's Address and Authorization, as istiod "
                   "serves ztunnel, with mesh.yaml's identities and policies (default "
                   "%(default)s)")
    p.add_argument("--node-name", default="", metavar="NODE",
                   help="with --xds-api workload: the node every endpoint runs on (the "
                   "Workload's node; an agent with --node-name NODE polices them)")
    # Hook for other table sources (e.g. `--docker`): add the flag here and a branch in
    # build_source() returning an object that implements accel.sources.TableSource.
    p.add_argument("--docker", action="store_true",
                   help="discover services from container labels (meshaccel.service, "
                   "meshaccel.port, ...) through the Docker Engine API; README.md, "
                   "'docker-compose'")
    p.add_argument("--vip-cidr", metavar="CIDR",
                   help="with --docker: allocate service VIPs from here (default 10.96.0.0/16)")
    p.add_argument("--docker-label", action="append", default=[], metavar="KEY[=VALUE]",
                   help="with --docker: only containers that also carry this label (repeatable)")
    p.set_defaults(func=run)


def build_source(args: argparse.Namespace) -> TableSource:
    """The table source the flags ask for. Raises ValidationError for bad input."""
    if getattr(args, "docker", False):
        if args.config:
            raise ValidationError("--docker", "give either --config or --docker, not both")
        from accel.sources.docker import DockerSource
        from accel.sources.vips import DEFAULT_VIP_CIDR

        return DockerSource(args.vip_cidr or DEFAULT_VIP_CIDR, selector=args.docker_label)
    if getattr(args, "vip_cidr", None) or getattr(args, "docker_label", None):
        raise ValidationError("--vip-cidr", "--vip-cidr and --docker-label go with --docker")
    if args.config:
        from accel.sources.file import FileSource

        return FileSource(args.config)
    raise ValidationError("--config", "a table source is required (--config mesh.yaml or "
                          "--docker)")


def run(args: argparse.Namespace) -> int:
    from accel.xds.server import ControllerServer

    try:
        source = build_source(args)
    except ValidationError as e:
        print(f"accel controller: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"accel controller: {e}", file=sys.stderr)
        return 2
    api, node = getattr(args, "xds_api", "envoy"), getattr(args, "node_name", "")
    if node and api != "workload":
        source.close()
        print("accel controller: --node-name goes with --xds-api workload", file=sys.stderr)
        return 2
    server = ControllerServer(source, listen=args.listen, api=api, node_name=node)
    try:
        server.start()
    except ValidationError as e:
        source.close()
        print(f"accel controller: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        source.close()
        print(f"accel controller: {e}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"accel controller: serving xDS on {args.listen.rsplit(':', 1)[0]}:{server.port}",
          flush=True)
    done.wait()
    log.info("stopping the controller")
    server.stop()
    return 0
