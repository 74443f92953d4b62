"""The benchmarks still run: `accel bench connect` and `accel bench xds` in a tiny
configuration through the CLI, checked for what they measured, never for how fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]


def bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-m", "accel.cli", "bench", *args, "--json", str(out),
                        "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_connect_measures_every_case(tmp_path: Path) -> None:
    r = bench(tmp_path, "connect", "--services", "2,20", "--endpoints", "2", "--count", "40",
              "--chunks", "2", "--warmup", "5", "--rounds", "1")
    got = {(c["case"], c["services"]): c for c in r["cases"]}
    assert set(got) == {("direct", 0), ("direct+accel", 0), ("accel", 2), ("accel", 20),
                        ("iptables", 2), ("iptables", 20)}
    for (_, n), c in got.items():
        assert c["connections"] == (80 if n == 0 else 40) and c["errors"] == 0  # direct: per N
        assert 0 < c["min_us"] <= c["p50_us"] <= c["p99_us"]
    # Every accel connection was balanced by the connect program, not by something else:
    # 2 sizes x 2 chunks x (20 timed + 5 warmup).
    assert r["accel_balanced"] == r["accel_connections"] == 2 * 2 * (20 + 5)
    assert "pinned to CPU" in r["env"]["placement"]


def test_bench_xds_fills_the_maps_and_times_changes(tmp_path: Path) -> None:
    r = bench(tmp_path, "xds", "--services", "30", "--endpoints", "4", "--changes", "8")
    push, change = r["push"], r["change"]
    assert push["maps_complete"] and push["maps"] == {"services": 30, "slots": 30 * 7,
                                                      "mesh_nets": 30 * 4}
    assert push["agent_rss_mb"] > 0 and push["push_to_maps_complete_s"] > 0
    assert change["changes"] == 8 and change["maps_verified"]
    assert 0 < change["p50_ms"] <= change["p99_ms"] <= change["max_ms"]
