"""The agent's gRPC API server: a thin mirror of the Runtime (accel/runtime.py).

Served on a root-only unix socket and, only when asked, on TCP with TLS (mutual TLS with a
client CA). Who may change the agent: unix-socket peers (root, by the socket's mode), TCP
peers with a verified client certificate, and any TCP peer when the operator chose
--api-insecure. A TCP peer over plain server-side TLS may only read.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import socket
import stat
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from accel import config
from accel.api import convert
from accel.api.gen import agent_pb2 as pb
from accel.api.gen import agent_pb2_grpc as pb_grpc
from accel.model import ValidationError

if TYPE_CHECKING:
    from accel.runtime import Runtime

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Agent"].full_name  # accel.agent.v1.Agent
MAX_WATCHERS = 8  # each open WatchEvents stream holds a worker thread
MAX_WORKERS = MAX_WATCHERS + 8
# A full table at the default capacities (10,000 services, 100,000 endpoints) is ~5 MB.
MAX_MESSAGE = 64 << 20
POLL_S = 0.25  # how fast a watch stream notices a cancelled call or a stopping server
# An error's message travels in a trailer, which gRPC refuses beyond 16 KiB (percent-encoded:
# up to 3 bytes per byte), and must be valid UTF-8. Errors quote the bad value, which may be
# anything: keep the start, where the path of the field is.
MAX_DETAILS = 2048  # bytes


class ApiError(RuntimeError):
    """The API cannot be served as asked (socket taken, bad TLS setup)."""


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, agent: Runtime, stopping: threading.Event, tcp_may_write: bool):
        self.agent = agent
        self.stopping = stopping
        self.tcp_may_write = tcp_may_write
        self._watchers = threading.BoundedSemaphore(MAX_WATCHERS)
        self._api_versions = itertools.count(1)

    # ---- reading -----------------------------------------------------------------------

    def GetStatus(self, request, context):
        return convert.status_to_proto(self.agent.status())

    def ListServices(self, request, context):
        table, version = self.agent.table, self.agent.version
        msg = pb.ListServicesResponse(config_version=version, table=convert.table_to_proto(table))
        if self.agent.xds is not None:
            left, ignored = self.agent.xds.report()
            for where, (vip, port, protocol, reason) in sorted(left.items()):
                msg.left.add(where=where, vip=vip, port=port, protocol=protocol, reason=reason)
            for name, features in ignored.items():
                msg.ignored[name].reasons.extend(features)
        return msg

    def GetStats(self, request, context):
        try:
            return convert.stats_to_proto(self.agent.stats())
        except (OSError, RuntimeError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"reading the counters: {e}")

    def WatchEvents(self, request, context):
        if not self._watchers.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"at most {MAX_WATCHERS} event streams at once")
        kinds = set(request.kinds)
        q = self.agent.watch()
        try:
            # First message: the stream is live; every later change will be seen.
            yield pb.Event(kind="watching", message=f"{len(self.agent.table.services)} services",
                           version=self.agent.version)
            while context.is_active() and not self.stopping.is_set():
                try:
                    ev = q.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if kinds and ev.kind not in kinds:
                    continue
                yield pb.Event(kind=ev.kind, message=ev.message, version=ev.version,
                               time=ev.time)
        finally:
            self.agent.unwatch(q)
            self._watchers.release()

    def WatchFlows(self, request, context):
        from accel.flows.record import KINDS

        flows = self.agent.flows
        if flows is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "connection records are off in this agent")
        events = set(request.events) or {"close", "refused"}
        bad = sorted(events - set(KINDS))
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"events: {', '.join(map(repr, bad))} not one of {', '.join(KINDS)}")
        if not self._watchers.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"at most {MAX_WATCHERS} event streams at once")

        def wanted(r) -> bool:
            return r.event in events and (not request.service or r.service == request.service)

        # One step: the history then exactly what came after it, nothing twice or lost.
        history, q = flows.store.recent_and_watch(request.since, request.follow)
        try:
            for r in history:
                if wanted(r):
                    yield convert.flow_to_proto(r)
            if q is None:
                return
            yield pb.Flow(event="watching")
            while context.is_active() and not self.stopping.is_set():
                try:
                    r = q.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if wanted(r) and r.time_end >= request.since:
                    yield convert.flow_to_proto(r)
        finally:
            if q is not None:
                flows.store.unwatch(q)
            self._watchers.release()

    # ---- changing ----------------------------------------------------------------------

    def _may_write(self, context, what: str) -> None:
        peer = context.peer()
        if peer.startswith("unix:") or self.tcp_may_write:
            log.info("%s from %s", what, peer)
            return
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"{what} needs the unix socket or a client certificate "
                      "(start the agent with --api-tls-client-ca)")

    def ApplyConfig(self, request, context):
        self._may_write(context, "ApplyConfig")
        which = request.WhichOneof("config")
        try:
            if which == "table":
                table = convert.table_from_proto(request.table)
            elif which == "mesh_yaml":
                table = _prefixed("mesh_yaml", config.load_text, request.mesh_yaml)
            else:
                raise ValidationError("config", "set either table or mesh_yaml")
        except ValidationError as e:
            self.agent.emit("rejected", f"API: {_details(e)}", request.version)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(e))
        version = request.version or f"api-{next(self._api_versions)}"
        counts = {"services": len(table.services),
                  "endpoints": sum(len(s.endpoints) for s in table.services)}
        if request.validate_only:
            try:
                self.agent.check_capacity(table)
            except ValidationError as e:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _details(e))
            return pb.ApplyConfigResponse(version=version, applied=False, **counts)
        try:
            self.agent.apply(table, version=version)
        except ValidationError as e:  # CapacityError included: the maps cannot hold it
            code = (grpc.StatusCode.RESOURCE_EXHAUSTED if type(e).__name__ == "CapacityError"
                    else grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, _details(e))
        except RuntimeError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _details(e))
        except Exception as e:
            log.exception("ApplyConfig failed")
            context.abort(grpc.StatusCode.INTERNAL, _details(f"applying the table: {e}"))
        return pb.ApplyConfigResponse(version=version, applied=True, **counts)

    def SetGuard(self, request, context):
        self._may_write(context, "SetGuard")
        try:
            if not request.HasField("guard"):
                raise ValidationError("guard", "missing required field")
            guard = convert.guard_from_proto(request.guard)
        except ValidationError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(e))
        try:
            enforced = self.agent.set_guard(guard)
        except Exception as e:
            log.exception("SetGuard failed")
            context.abort(grpc.StatusCode.INTERNAL, _details(f"setting the guard: {e}"))
        return pb.SetGuardResponse(enforced=enforced, guard=convert.guard_to_proto(guard))


def _details(e: object) -> str:
    data = str(e).encode(errors="backslashreplace")
    if len(data) > MAX_DETAILS:
        return data[:MAX_DETAILS].decode(errors="ignore") + f"... ({len(data)} bytes in all)"
    return data.decode()


def _prefixed(prefix: str, fn, *args):
    try:
        return fn(*args)
    except ValidationError as e:
        raise ValidationError(f"{prefix}.{e.path}" if e.path else prefix, e.reason) from None


# ---- the unix socket ----------------------------------------------------------------------


def _socket_is_live(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        s.close()


def remove_stale_socket(path: str) -> str:
    """Remove the API socket at `path` if no agent listens on it (one SIGKILLed leaves it
    behind). Returns what was done: "removed", "absent", or why it was left ("live", "not a
    socket", "unknown: <error>"). A socket some agent serves on is never removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISSOCK(st.st_mode):
        return "not a socket"
    try:
        if _socket_is_live(path):
            return "live"
    except OSError as e:
        return f"unknown: {e.strerror or e}"
    try:
        if os.lstat(path).st_ino != st.st_ino:
            return "live"  # an agent starting just now replaced it: its socket, not ours
        os.unlink(path)
    except FileNotFoundError:
        return "absent"
    return "removed"


def prepare_unix_path(path: str) -> None:
    """Parent dir root-only; a stale socket removed; a live one (another agent) refused."""
    p = Path(path)
    if not p.parent.exists():
        p.parent.mkdir(mode=0o700, parents=True)
    parent = p.parent.stat()
    if parent.st_uid == os.geteuid() and stat.S_IMODE(parent.st_mode) & 0o077:
        os.chmod(p.parent, 0o700)  # ours: nobody else needs to reach the socket's directory
    elif parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        raise ApiError(f"{p.parent} is writable by anyone: refusing to put the API socket there")
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiError(f"{path} exists and is not a socket: refusing to replace it")
    if _socket_is_live(path):
        raise ApiError(f"another agent is serving on {path}: stop it first or use --api-socket")
    p.unlink()  # stale: its agent is gone


_umask_lock = threading.Lock()


def _bind_unix(server: grpc.Server, path: str) -> None:
    # The socket is born 0600: no window in which another user could connect.
    with _umask_lock:
        old = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix:{path}")
        finally:
            os.umask(old)
    os.chmod(path, 0o600)


# ---- serving ------------------------------------------------------------------------------


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ApiError(f"cannot read {path}: {e.strerror}") from None


@dataclass
class ApiServer:
    server: grpc.Server
    health: health.HealthServicer
    stopping: threading.Event
    unix_path: str | None
    unix_ino: int | None
    tcp_port: int | None  # the bound port (useful with port 0)

    def set_serving(self, serving: bool) -> None:
        """gRPC health follows the runtime's readiness: SERVING only once it is ready."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float = 2.0) -> None:
        self.stopping.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)
        if self.unix_path:
            try:
                if os.lstat(self.unix_path).st_ino == self.unix_ino:
                    os.unlink(self.unix_path)
            except FileNotFoundError:
                pass


def serve(
    agent: Runtime,
    unix_path: str | None,
    tcp_addr: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    insecure: bool = False,
) -> ApiServer:
    if not unix_path and not tcp_addr:
        raise ApiError("nothing to serve on: give a unix socket path or a TCP address")
    creds = None
    if tcp_addr:
        if bool(tls_cert) != bool(tls_key):
            raise ApiError("TLS needs both a certificate and a key")
        if tls_cert:
            ca = _read(tls_client_ca)
            creds = grpc.ssl_server_credentials(
                [(_read(tls_key), _read(tls_cert))],
                root_certificates=ca, require_client_auth=ca is not None)
        elif tls_client_ca:
            raise ApiError("a client CA needs TLS: give the server certificate and key too")
        elif not insecure:
            raise ApiError(f"refusing to serve the API on {tcp_addr} without TLS "
                           "(give a certificate and key, or insecure=True on a trusted network)")
    if unix_path:
        prepare_unix_path(unix_path)

    stopping = threading.Event()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="accel-api"),
        options=[
            ("grpc.so_reuseport", 0),  # a TCP port already taken must fail, not be shared
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    pb_grpc.add_AgentServicer_to_server(
        AgentService(agent, stopping, tcp_may_write=bool(tls_client_ca) or insecure), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    ready = agent.ready.is_set()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING if ready
                            else health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    unix_ino = tcp_port = None
    try:
        if unix_path:
            _bind_unix(server, unix_path)
            unix_ino = os.lstat(unix_path).st_ino
        if tcp_addr:
            try:
                tcp_port = (server.add_secure_port(tcp_addr, creds) if creds
                            else server.add_insecure_port(tcp_addr))
            except RuntimeError as e:
                raise ApiError(f"cannot listen on {tcp_addr}: {e}") from None
        server.start()
    except BaseException:
        server.stop(0)
        if unix_path and unix_ino is not None:
            Path(unix_path).unlink(missing_ok=True)
        raise
    mode = "mTLS" if tls_client_ca else "TLS" if creds else "plaintext"
    where = [f"unix:{unix_path}"] if unix_path else []
    where += [f"{tcp_addr} ({mode})"] if tcp_addr else []
    log.info("API serving on %s", ", ".join(where))
    return ApiServer(server, health_servicer, stopping, unix_path, unix_ino, tcp_port)
