"""`accel demo` end to end, as the README runs it: mesh, controller, agent on xDS, traffic
through the VIPs, counters, quick comparison, teardown; under two minutes, nothing left."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accel.bench import runner
from tests.leftovers import leftovers
from tests.stats import FALSE_FAILURE, binomial_range

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]


def test_demo_end_to_end(tmp_path):
    prefix = "hb" + secrets.token_hex(2)
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "accel.cli", "demo", "--prefix", prefix, "--out",
             str(tmp_path), "--json"], cwd=REPO, capture_output=True, text=True, timeout=240)
    finally:
        runner.cleanup_stale()
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    doc = json.loads(r.stdout)  # the report, and nothing else, on stdout
    assert doc["ok"] and doc["error"] is None, doc
    assert elapsed < 120, f"the demo took {elapsed:.0f}s"

    # Every step announced, in order.
    assert [(s["n"], s["of"]) for s in doc["steps"]] == [(n, 5) for n in range(1, 6)]
    # The table came from the embedded controller over xDS.
    assert doc["agent"]["source"] == "xds" and doc["agent"]["controller"]
    assert doc["agent"]["services_applied"] == 3
    # Every answer through a VIP complete and correct, spread by weight over the pods.
    traffic = doc["traffic"]
    assert traffic["connections"] == traffic["correct"] == 90
    endpoints = {s["name"]: s["endpoints"] for s in doc["services"]}
    assert set(traffic["services"]) == set(endpoints) == {"productpage", "reviews", "ratings"}
    # The kernel picks a slot at random per connect: each endpoint's count is binomial.
    # Two services with two endpoints, one check each (the other count is the rest):
    # false failure <= 2 x 5e-5 = 1e-4.
    checks = [name for name, eps in endpoints.items() if len(eps) > 1]
    for name, eps in endpoints.items():
        seen = traffic["services"][name]
        assert seen["bad"] == 0 and sum(seen["pods"].values()) == 30, (name, seen)
        assert set(seen["pods"]) <= {e["pod"] for e in eps}, (name, seen)
        total = sum(e["weight"] for e in eps)
        if len(eps) > 1:
            first = eps[0]
            lo, hi = binomial_range(30, first["weight"] / total, FALSE_FAILURE / len(checks))
            assert lo <= seen["pods"].get(first["pod"], 0) <= hi, (name, seen, (lo, hi))
    # The counters prove it: every connect balanced in the kernel, the route services'
    # sockets left on TCP, the redirect service's bytes handed socket to socket.
    c = doc["counters"]
    assert all(doc["checks"].values()), doc["checks"]
    assert c["connect_balanced"] == 90
    assert c["socks_routed"] == 2 * 60  # productpage and reviews: both ends of 60 connections
    assert c["sockhash_inserts"] == 2 * 30  # ratings
    assert c["msg_redirects"] >= 60 and c["redirected_bytes"] >= 30 * 2 * 16384
    assert c["msg_peer_unknown"] == 0
    assert c["pod_redirects"] > 0
    # The comparison: table (on stderr with --json), targets, plot and JSON.
    assert re.search(r"^accel\s+[\d.]+\s", r.stderr, re.M)
    cmp = doc["comparison"]
    assert "accel+redirect p50 <= 0.55x kernel" in [t["target"] for t in cmp["targets"]]
    assert cmp["plot"] == str(tmp_path / "bench.png") and cmp["cases"] == 18
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert len(bench["cases"]) == 18 and all(x["repeats"] > 0 for x in bench["cases"])
    assert "everything the demo made is removed" in r.stderr
    assert leftovers(prefix) == []
