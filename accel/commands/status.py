"""`accel status`: what the running agent is doing, from its API."""

from __future__ import annotations

import argparse
import json
import time

from accel.commands.common import add_json_arg, fail, print_json, print_table


def add_api_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-socket", default=None,
                   help="the agent's API socket (default /run/accel/agent.sock, "
                   "or $ACCEL_API_SOCKET)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="the running agent's state (source, config, xDS, edge, "
                       "pod routing)")
    add_json_arg(p)
    add_api_arg(p)
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait up to SECONDS for the agent to be ready (programs attached, "
                   "first table applied): exit 0 once it is, 1 if it is not by then")
    p.set_defaults(func=run)


def call(fn, socket_path: str | None):
    """Run one API call; returns (result, None) or (None, exit code after saying why)."""
    from accel.api import client

    try:
        return fn(socket_path), None
    except client.AgentUnavailable as e:
        return None, fail(str(e))
    except client.ApiCallError as e:
        return None, fail(f"the agent refused: {e}")


def _ago(t: float | None) -> str:
    return f"{time.time() - t:.0f}s ago" if t else "never"


def _edge(edge: dict) -> str:
    parts = []
    for k, v in edge.items():
        if isinstance(v, list):
            parts.append(f"{k}={len(v)}")  # per-VIP detail: `accel status --json`
        elif isinstance(v, dict):
            parts.append(f"{k}={json.dumps(v, separators=(',', ':'))}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts) or "on"


def _pods(pods: dict | None) -> str:
    if pods is None:
        return "off"
    if pods.get("error"):
        return f"UNAVAILABLE: {pods['error']}"
    ports = pods.get("ports") or []
    text = (f"{len(ports)} ports, {pods.get('addresses', 0)} addresses"
            + (f" in netns {pods['netns']}" if pods.get("netns") else ""))
    for what in ("conflicts", "failures"):
        if pods.get(what):
            text += f"; {what}: {json.dumps(pods[what], separators=(',', ':'))}"
    return text


def _qos(q: dict | None) -> str:
    if not q:
        return "-"
    return (f"bandwidth by {q['bandwidth']} ({q['bandwidth_note']}); connections by "
            f"{q['connections']} (over the limit: {q['refused_errno']})")


def run(args: argparse.Namespace) -> int:
    from accel.api import client

    if args.wait is not None:
        if args.wait < 0:
            return fail("--wait takes a number of seconds >= 0", code=2)
        try:
            st = client.wait_ready(args.api_socket, args.wait)
        except client.AgentUnavailable as e:
            return fail(str(e))
    else:
        st, code = call(client.get_status, args.api_socket)
        if st is None:
            return code
    if args.json:
        print_json(st)
        return 0
    rows = [
        ["ready", "yes" + (f" ({st['seconds_to_ready']:.2f}s after start, "
                           f"{'compiled' if st['compiled'] else 'pinned programs reused'})"
                           if st.get("seconds_to_ready") is not None else "")
         if st.get("ready") else f"NO: {st.get('not_ready') or '?'}"],
        ["version", st["version"]],
        ["source", st["source"]],
        ["config version", st["config_version"] or "(none)"],
        ["services", f"{st['services']} accelerated"
         + (f", {st['services_left']} left to the kernel path (`accel services`)"
            if st.get("services_left") else "")],
        ["applied / rejected", f"{st['applied']} / {st['rejected']}"],
        ["last error", st["last_error"] or "-"],
        ["uptime", f"{st['uptime_s']:.0f}s"],
        ["pin dir", st["pin_dir"]],
        ["maps", ", ".join(f"{n} {u['used']}/{u['capacity']}" for n, u in st["maps"].items())
         or "-"],
        ["cgroup", st["cgroup"]],
        ["edge", "off" if st["edge"] is None else _edge(st["edge"])],
        ["pod routing", _pods(st.get("pod_routing"))],
        ["fastpath: redirect", "available" if not st.get("redirect_unavailable")
         else f"UNAVAILABLE ({st['redirect_unavailable']}): those services stay on TCP"],
        ["qos", _qos(st.get("qos"))],
    ]
    xds = st["xds"]
    if xds is not None:
        rows += [
            ["xds", f"{'connected' if xds['connected'] else 'DISCONNECTED'} to {xds['target']} "
                    f"as {xds['node_id']} ({xds['reconnects']} reconnects)"],
        ]
        if xds["pending"]:
            rows.append(["xds pending", "; ".join(f"{k}: {v}" for k, v in xds["pending"].items())])
        if xds.get("skipped"):
            rows.append(["xds left to kernel", f"{len(xds['skipped'])} listeners or virtual "
                         "hosts with no L4 service the kernel path can take (--json: why)"])
    print_table(rows, ["", ""])
    edge_backends = [[f"{v['service']} {v['vip']}:{v['port']}", f"{b['address']}:{b['port']}",
                      b["via"]]
                     for v in (st["edge"] or {}).get("vips", []) for b in v.get("backends", [])]
    if edge_backends:
        print()
        print_table(edge_backends, ["edge VIP", "backend", "path (why)"])
    if xds is not None and xds["types"]:
        print()
        print_table([[url.rsplit(".", 1)[-1], t["last_ack_version"] or "-", t["resource_count"],
                      _ago(t["last_update_time"]), t["last_nack_error"] or "-"]
                     for url, t in xds["types"].items()],
                    ["xds type", "acked", "resources", "updated", "last NACK"])
    return 0
