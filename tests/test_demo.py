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

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]


def test_demo_end_to_end(tmp_path):
    prefix = "hb" + secrets.token_hex(2)
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "accel.cli", "demo", "--prefix", prefix, "--out",
             str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    finally:
        runner.cleanup_stale()
    elapsed = time.monotonic() - t0
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-3000:]
    assert elapsed < 120, f"the demo took {elapsed:.0f}s"

    # Every step announced, in order.
    steps = re.findall(r"^\[(\d)/5\] (.*?)  \(", out, re.M)
    assert [int(n) for n, _ in steps] == [1, 2, 3, 4, 5], steps
    # The table came from the embedded controller over xDS.
    assert "over xDS (ADS)" in out and "services applied from the controller" in out
    # Every answer through a VIP complete and correct, spread by weight over the pods.
    assert "all 90 answers complete and correct" in out
    reviews = re.search(r"reviews\s+(\S+) \(.*weight 1\): (\d+), (\S+) \(.*weight 2\): (\d+)", out)
    assert reviews, out
    assert int(reviews.group(2)) + int(reviews.group(4)) == 30
    assert int(reviews.group(4)) > int(reviews.group(2))
    # The counters prove it: every connect balanced in the kernel, the route services'
    # sockets left on TCP, the redirect service's bytes handed socket to socket.
    m = re.search(r"this traffic: (\d+) of 90 connects balanced.*?; (\d+) sockets kept on TCP.*?"
                  r"(\d+) paired .*? and (\d+) messages \((\d+) bytes\) handed socket to socket"
                  r".*?, (\d+) left on TCP", out, re.S)
    assert m, out
    assert int(m.group(1)) == 90
    assert int(m.group(2)) == 2 * 60  # productpage and reviews: both ends of 60 connections
    assert int(m.group(3)) == 2 * 30  # ratings
    assert int(m.group(4)) >= 60 and int(m.group(5)) >= 30 * 2 * 16384
    assert int(m.group(6)) == 0
    # The comparison: table, targets, plot and JSON.
    assert re.search(r"^accel\s+[\d.]+\s", out, re.M)
    assert "accel+redirect p50 <= 0.55x kernel" in out
    assert f"plot: {tmp_path / 'bench.png'}" in out
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert len(doc["cases"]) == 18 and all(c["repeats"] > 0 for c in doc["cases"])
    assert "everything the demo made is removed" in out
    assert leftovers(prefix) == []
