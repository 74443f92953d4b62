"""The agent's bookkeeping of connection records (accel/flows/store.py) and their JSON and
API forms, fed records as the reader makes them: per-service totals with byte deltas over
reports, the active gauge, the duration histogram, the endpoint cap, history and follow."""

from __future__ import annotations

import json

from accel.api import convert
from accel.flows.record import FlowRecord, namespace_of
from accel.flows.store import DURATION_BUCKETS, FlowStore


def rec(event: str, id: int, sent: int = 0, received: int = 0, t0: float = 100.0,
        t1: float = 100.5, service: str = "reviews", dst: str = "10.0.0.2:80",
        reason: str = "") -> FlowRecord:
    return FlowRecord(event=event, id=id, time_start=t0, time_end=t1, service=service,
                      namespace=namespace_of(service), vip="10.96.0.1:80",
                      src=f"10.0.0.1:{40000 + id}", dst=dst, bytes_sent=sent,
                      bytes_received=received, bytes_redirected=0, path="tcp",
                      verdict="dropped" if event == "refused" else "forwarded",
                      reason=reason, srtt_us=20, retransmits=0, client_netns=1,
                      server_netns=0, service_index=0)


def test_totals_add_report_deltas_and_close_rest():
    s = FlowStore()
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
    s = FlowStore()
    s.add([rec("close", 7, 5, 6), rec("refused", 8, reason="no_backend"),
           rec("refused", 9, reason="no_backend")])
    t = s.snapshot()[0][("reviews", "")]
    assert (t.connections, t.active, t.sent, t.received) == (1, 0, 5, 6)
    assert t.failures == {"no_backend": 2}


def test_endpoint_series_capped():
    s = FlowStore(endpoint_series=2)
    s.add([rec("close", i, 1, 1, dst=f"10.0.1.{i}:80") for i in range(5)])
    eps = s.snapshot()[1]
    assert len(eps) == 3 and eps[("reviews", "", "other")].connections == 3
    assert sum(e.sent for e in eps.values()) == 5


def test_history_since_and_follow_see_each_record_once():
    s = FlowStore(history=3)
    s.add([rec("close", i, t1=100.0 + i) for i in range(5)])
    assert [r.id for r in s.recent()] == [2, 3, 4]
    kept, q = s.recent_and_watch(since=103.0)
    assert [r.id for r in kept] == [3, 4]
    s.add([rec("close", 9, t1=200)])
    assert q.get_nowait().id == 9 and q.empty()
    s.unwatch(q)


def test_namespace_from_controller_names():
    assert namespace_of("default/reviews.default.svc.cluster.local") == "default"
    assert namespace_of("reviews.shop.svc.cluster.local") == "shop"
    assert namespace_of("reviews") == ""


def test_record_to_api_and_json_keeps_every_field():
    r = rec("close", 3, 10, 20)
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
    j = convert.flow_to_json(convert.flow_to_proto(rec("close", 3, 10, 20)))
    line = _line(j)
    assert "reviews 10.0.0.1:40003 -> 10.96.0.1:80 => 10.0.0.2:80" in line
    assert "sent 10 recv 20" in line and "tcp" in line
    ref = _line(convert.flow_to_json(convert.flow_to_proto(
        rec("refused", 4, reason="no_backend", dst=""))))
    assert "refused" in ref and "dropped (no_backend)" in ref
