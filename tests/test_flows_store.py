"""The agent's bookkeeping of connection records (accel/flows/store.py) and their JSON and
API forms, fed records as the reader makes them: per-service totals with byte deltas over
reports, the active gauge, the duration histogram, the endpoint cap, history and follow;
the flow log; `accel flows` without an agent."""

from __future__ import annotations

import ctypes
import ipaddress
import json
from pathlib import Path

from accel.api import convert
from accel.flows.record import EVENT_FIELDS, Decoder, namespace_of
from accel.flows.store import DURATION_BUCKETS, FlowStore


class Event(ctypes.Structure):
    """struct flow_event as the programs' BTF gives it (the kernel tier reads the real one;
    the decoder checks the fields' order against EVENT_FIELDS either way)."""

    _fields_ = ([(n, ctypes.c_uint64) for n in EVENT_FIELDS[:8]]
                + [(n, ctypes.c_uint8 * 16) for n in ("client", "server", "vip")]
                + [(n, ctypes.c_uint16) for n in ("client_port", "server_port", "vip_port")]
                + [("kind", ctypes.c_uint8), ("path", ctypes.c_uint8),
                   ("svc_index", ctypes.c_uint32), ("srtt_us", ctypes.c_uint32),
                   ("retransmits", ctypes.c_uint32), ("verdict", ctypes.c_uint8),
                   ("reason", ctypes.c_uint8), ("pad", ctypes.c_uint16)])


VIPS = {ipaddress.ip_address("10.96.0.1"): "reviews",
        ipaddress.ip_address("10.96.0.2"): "reviews.shop.svc.cluster.local"}
DEC = Decoder(Event, lambda vip, port: VIPS.get(vip, ""))


def _a16(ip: str) -> bytes:
    a = ipaddress.ip_address(ip)
    return (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a).packed


def rec(event: str, id: int, sent: int = 0, received: int = 0, t0: float = 100.0,
        t1: float = 100.5, vip: str = "10.96.0.1", dst: str = "10.0.0.2:80",
        reason: str = "") -> tuple:
    """A row as the ring gives it (times in seconds since boot)."""
    host, port = dst.rsplit(":", 1) if dst else ("0.0.0.0", "0")
    reasons = {v: k for k, v in DEC.reason.items()}
    e = Event(time_start=int(t0 * 1e9), time_end=int(t1 * 1e9), cookie=id, client_netns=1,
              bytes_sent=sent, bytes_received=received, client_port=40000 + id,
              server_port=int(port), vip_port=80, kind=DEC.kinds[event], svc_index=0,
              srtt_us=20, verdict=1 if event == "refused" else 0, reason=reasons[reason])
    for field, ip in (("client", "10.0.0.1"), ("server", host), ("vip", vip)):
        ctypes.memmove(ctypes.addressof(e) + getattr(Event, field).offset, _a16(ip), 16)
    return DEC.row(bytes(e))


def store(**kw) -> FlowStore:
    return FlowStore(DEC, **kw)


def test_totals_add_report_deltas_and_close_rest():
    s = store()
    s.add([rec("open", 1), rec("report", 1, 100, 10, t1=110), rec("report", 1, 250, 30, t1=120)])
    svc, _ = s.snapshot()
    t = svc[("reviews", "")]
    assert (t.connections, t.active, t.sent, t.received) == (1, 1, 250, 30)
    s.add([rec("close", 1, 400, 50, t1=130)])
    t = s.snapshot()[0][("reviews", "")]
    assert (t.connections, t.active, t.sent, t.received) == (1, 0, 400, 50)
    assert t.durations == 1 and t.duration_sum == 30.0
    assert t.buckets[DURATION_BUCKETS.index(60.0)] == 1 and sum(t.buckets) == 1


def test_close_without_open_still_counts_once_and_refusals_by_reason():
    s = store()
    s.add([rec("close", 7, 5, 6), rec("refused", 8, reason="no_backend"),
           rec("refused", 9, reason="no_backend")])
    t = s.snapshot()[0][("reviews", "")]
    assert (t.connections, t.active, t.sent, t.received) == (1, 0, 5, 6)
    assert t.failures == {"no_backend": 2}


def test_endpoint_series_capped():
    s = store(endpoint_series=2)
    s.add([rec("close", i, 1, 1, dst=f"10.0.1.{i}:80") for i in range(5)])
    eps = s.snapshot()[1]
    assert len(eps) == 3 and eps[("reviews", "", "other")].connections == 3
    assert sum(e.sent for e in eps.values()) == 5


def test_history_since_and_follow_see_each_record_once():
    s = store(history=3)
    s.add([rec("close", i, t1=100.0 + i) for i in range(5)])
    assert [r.id for r in s.recent()] == [2, 3, 4]
    kept, q = s.recent_and_watch(since=DEC.unix(int(103e9)) - 1e-3)
    assert [r.id for r in kept] == [3, 4]
    assert (kept[0].service, kept[0].src, kept[0].dst) == ("reviews", "10.0.0.1:40003",
                                                          "10.0.0.2:80")
    s.add([rec("close", 9, t1=200)])
    assert q.get_nowait().id == 9 and q.empty()
    s.unwatch(q)


def test_namespace_from_controller_names():
    assert namespace_of("default/reviews.default.svc.cluster.local") == "default"
    assert namespace_of("reviews.shop.svc.cluster.local") == "shop"
    assert namespace_of("reviews") == ""


def test_services_named_with_namespace_and_renamed_after_a_table_change():
    s = store()
    s.add([rec("close", 1, 5, 5, vip="10.96.0.2")])
    assert ("reviews.shop.svc.cluster.local", "shop") in s.snapshot()[0]
    VIPS[ipaddress.ip_address("10.96.0.2")] = "ratings"
    try:
        DEC.forget_names()
        s.add([rec("close", 2, 5, 5, vip="10.96.0.2")])
        assert ("ratings", "") in s.snapshot()[0]
    finally:
        VIPS[ipaddress.ip_address("10.96.0.2")] = "reviews.shop.svc.cluster.local"
        DEC.forget_names()


def test_record_to_api_and_json_keeps_every_field():
    r = DEC.record(rec("close", 3, 10, 20))
    j = convert.flow_to_json(convert.flow_to_proto(r))
    assert j == {k: v for k, v in r.as_dict().items() if k != "service_index"}
    assert json.loads(json.dumps(j))["bytes_received"] == 20


def test_cli_durations_and_lines():
    import pytest

    from accel.commands.flows import _line, parse_duration

    assert parse_duration("90") == 90 and parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    for bad in ("ten", "5x", "1h 30m", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
    j = convert.flow_to_json(convert.flow_to_proto(DEC.record(rec("close", 3, 10, 20))))
    line = _line(j)
    assert "reviews 10.0.0.1:40003 -> 10.96.0.1:80 => 10.0.0.2:80" in line
    assert "sent 10 recv 20" in line and "tcp" in line
    ref = _line(convert.flow_to_json(convert.flow_to_proto(
        DEC.record(rec("refused", 4, reason="no_backend", dst="")))))
    assert "refused" in ref and "dropped (no_backend)" in ref


def test_flow_log_writes_json_lines_and_rotates(tmp_path):
    from accel.flows.log import FlowLog

    path = tmp_path / "flows.jsonl"
    log = FlowLog(str(path), max_bytes=2000, backups=2)
    records = [DEC.record(rec("close", i, i, 2 * i)) for i in range(30)]
    log.write(records)
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"]
    lines = [json.loads(x) for f in reversed(files) for x in f.read_text().splitlines()]
    assert all(f.stat().st_size <= 2000 for f in files)
    # The newest records are kept, in order, whole.
    assert [r["id"] for r in lines] == list(range(30 - len(lines), 30))
    assert lines[-1]["bytes_received"] == 58 and lines[-1]["src"] == "10.0.0.1:40029"


def test_flows_without_agent_says_so(tmp_path):
    import subprocess
    import sys

    def accel(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "accel.cli", *args], capture_output=True,
                              text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])

    out = accel("flows", "--api-socket", str(tmp_path / "none.sock"))
    assert out.returncode == 1
    assert "no agent" in out.stderr and "accel flows" in out.stderr
    bad = accel("flows", "--since", "ten minutes", "--api-socket", str(tmp_path / "x.sock"))
    assert bad.returncode == 2 and "--since" in bad.stderr
