"""`accel flows`: connection records from the running agent (its WatchFlows stream), one
line per connection, or one JSON object per line with --json; --follow keeps watching."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from accel.commands.common import fail, printable

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """"90s", "5m", "1h30m", "250ms" or plain seconds -> seconds; ValueError otherwise."""
    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ValueError(f"{text!r}: expected a duration such as 30s, 5m, 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flows", help="connection records: who talked to whom through which "
                       "VIP, bytes, path, verdict (needs a running agent)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--service", default="", metavar="NAME", help="only this service")
    p.add_argument("--since", default=None, metavar="DURATION",
                   help="only records that ended this long ago or later (30s, 5m, 1h)")
    p.add_argument("--all-events", action="store_true",
                   help="also each connection's open and 10 s report events")
    p.add_argument("--api-socket", default=None, help="the agent's API socket")
    p.set_defaults(func=run)


def _line(r: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(r["time_end"])) + \
        f".{int(r['time_end'] * 1000) % 1000:03d}"
    svc = printable(r["service"] or "?")
    if r["event"] == "refused":
        return (f"{when} refused  {svc} {r['src'] or '-'} -> {r['vip']}  "
                f"{r['verdict']} ({r['reason']})")
    dur = (r["time_end"] - r["time_start"]) * 1000
    return (f"{when} {r['event']:<7}  {svc} {r['src']} -> {r['vip']} => {r['dst']}  "
            f"{r['path']}  sent {r['bytes_sent']} recv {r['bytes_received']}  "
            f"{dur:.1f}ms srtt {r['srtt_us']}us retrans {r['retransmits']}")


def run(args: argparse.Namespace) -> int:
    try:
        since = time.time() - parse_duration(args.since) if args.since is not None else 0.0
    except ValueError as e:
        return fail(f"invalid input: --since {e}", code=2)
    from accel.api import client

    events = ("open", "close", "refused", "report") if args.all_events else ()
    try:
        for r in client.watch_flows(args.api_socket, follow=args.follow,
                                    service=args.service, since=since, events=events):
            if r["event"] == "watching":
                print("following; Ctrl-C to stop", file=sys.stderr, flush=True)
                continue
            print(json.dumps(r, separators=(",", ":")) if args.json else _line(r),
                  flush=True)
    except client.AgentUnavailable as e:
        return fail(f"{e}\n`accel flows` reads the running agent's connection records")
    except client.ApiCallError as e:
        return fail(str(e), code=2 if e.details.startswith("events") else 1)
    except BrokenPipeError:
        return 0
    return 0
