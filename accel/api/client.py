"""A small client of the agent's API, for the CLI: plain dicts in and out.

Every call raises AgentUnavailable with a message a person can act on when no agent
answers, and ApiCallError (with the gRPC status) when the agent refused the request.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from accel.api import convert
from accel.api.gen import agent_pb2 as pb
from accel.api.gen import agent_pb2_grpc as pb_grpc
from accel.api.server import MAX_MESSAGE

DEFAULT_SOCKET = os.environ.get("ACCEL_API_SOCKET", "/run/accel/agent.sock")
CONNECT_TIMEOUT_S = 3.0
CALL_TIMEOUT_S = 30.0


class AgentUnavailable(RuntimeError):
    pass


class ApiCallError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _target(socket_path: str | None) -> tuple[str, str]:
    path = socket_path or DEFAULT_SOCKET
    denied = AgentUnavailable(f"permission denied on {path}: run as root (the API socket "
                              "and its directory are root-only)")
    try:
        os.stat(path)
    except PermissionError:  # its directory (/run/accel, 0700) is closed to us: not absent
        raise denied from None
    except FileNotFoundError:
        raise AgentUnavailable(f"no agent API at {path}: is `accel agent` running? "
                               "(--api-socket names another socket)") from None
    except OSError as e:
        raise AgentUnavailable(f"cannot use {path}: {e.strerror}") from None
    if not os.access(path, os.R_OK | os.W_OK):
        raise denied
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:  # what connect() says, before gRPC turns every failure into a timeout
        probe.connect(path)
    except PermissionError:
        raise denied from None
    except ConnectionRefusedError:
        raise AgentUnavailable(f"no agent answers on {path} (a stale socket: its agent was "
                               "killed? `accel uninstall` removes it): is `accel agent` "
                               "running?") from None
    except OSError:
        pass  # busy or odd: let gRPC try and say
    finally:
        probe.close()
    return path, f"unix:{path}"


@contextmanager
def connect(socket_path: str | None = None) -> Iterator[pb_grpc.AgentStub]:
    path, target = _target(socket_path)
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ])
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            raise AgentUnavailable(f"no agent answers on {path} (a stale socket?): "
                                   "is `accel agent` running?") from None
        yield pb_grpc.AgentStub(channel)
    except grpc.RpcError as e:
        code = e.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            raise AgentUnavailable(f"agent on {path} went away: {e.details()}") from None  # type: ignore[attr-defined]
        raise ApiCallError(code, e.details()) from None  # type: ignore[attr-defined]
    finally:
        channel.close()


def get_status(socket_path: str | None = None) -> dict[str, Any]:
    with connect(socket_path) as stub:
        return convert.status_to_json(stub.GetStatus(pb.GetStatusRequest(),
                                                     timeout=CALL_TIMEOUT_S))


def list_services(socket_path: str | None = None) -> dict[str, Any]:
    with connect(socket_path) as stub:
        r = stub.ListServices(pb.ListServicesRequest(), timeout=CALL_TIMEOUT_S)
        out = {"config_version": r.config_version, **convert.table_msg_to_json(r.table)}
        # One list: what is accelerated, with the features it ignores, then what is not.
        for s in out["services"]:
            s["accelerated"] = True
            s["reasons"] = list(r.ignored[s["name"]].reasons) if s["name"] in r.ignored \
                else []
        out["services"] += [{"name": x.where, "vip": x.vip, "port": x.port,
                             "protocol": x.protocol, "accelerated": False,
                             "reasons": [x.reason], "endpoints": []} for x in r.left]
        return out


def get_stats(socket_path: str | None = None) -> dict[str, Any]:
    with connect(socket_path) as stub:
        return convert.stats_to_json(stub.GetStats(pb.GetStatsRequest(),
                                                   timeout=CALL_TIMEOUT_S))


def apply_config(table: dict[str, Any] | str, version: str = "", validate_only: bool = False,
                 socket_path: str | None = None) -> dict[str, Any]:
    """`table` is a mesh.yaml document: text, or the dict it parses to. Validation happens
    on the agent, so the error paths are the agent's own."""
    import yaml

    text = table if isinstance(table, str) else yaml.safe_dump(table)
    req = pb.ApplyConfigRequest(mesh_yaml=text, version=version, validate_only=validate_only)
    with connect(socket_path) as stub:
        r = stub.ApplyConfig(req, timeout=CALL_TIMEOUT_S)
        return {"version": r.version, "services": r.services, "endpoints": r.endpoints,
                "applied": r.applied}


def watch_events(socket_path: str | None = None,
                 kinds: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Events as they happen, starting with one "watching" event once the stream is live."""
    with connect(socket_path) as stub:
        yield from _stream(stub.WatchEvents(pb.WatchEventsRequest(kinds=list(kinds))),
                           convert.event_to_json)


def _stream(call, to_json: Callable[[Any], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A server stream's messages as JSON until it ends; a cancel (ours) is no error."""
    try:
        for msg in call:
            yield to_json(msg)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
            raise
    finally:
        call.cancel()


def watch_flows(socket_path: str | None = None, follow: bool = False, service: str = "",
                since: float = 0.0, events: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Connection records: those the agent keeps, then (follow) each new one; with follow,
    one {"event": "watching"} marks the stream live."""
    req = pb.WatchFlowsRequest(follow=follow, service=service, since=since, events=list(events))
    with connect(socket_path) as stub:
        yield from _stream(stub.WatchFlows(req), convert.flow_to_json)


def wait_ready(socket_path: str | None, timeout: float,
               alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The agent's status once it says "ready" (programs attached, first table applied).
    Raises AgentUnavailable when `timeout` passes first, or at once when `alive()` (the
    agent's process, if the caller started it) says it is gone."""
    deadline = time.monotonic() + timeout
    why = "no answer"
    while True:
        if alive is not None and not alive():
            raise AgentUnavailable(f"the agent exited before it was ready ({why})")
        try:
            st = get_status(socket_path)
            if st.get("ready"):
                return st
            why = st.get("not_ready") or "not ready"
        except AgentUnavailable as e:  # not up yet: the socket comes with the API
            why = str(e)
        if time.monotonic() >= deadline:
            raise AgentUnavailable(f"not ready after {timeout:g}s: {why}")
        time.sleep(0.05)
