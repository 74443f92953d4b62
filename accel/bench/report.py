"""The bench's outputs: a terminal table, the targets, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# (label, (mode, workload, metric) measured, (mode, workload, metric) reference, op, ratio)
# The latency and throughput targets are the socket redirect's (fastpath: redirect); the
# default mode (route) is plain TCP to the applications, so its figures are comparisons.
TARGETS = (
    ("accel+redirect p50 <= 0.55x kernel", ("accel+redirect", "rr", "p50_us"),
     ("kernel", "rr", "p50_us"), "<=", 0.55),
    ("accel+redirect p50 <= 0.15x sidecar", ("accel+redirect", "rr", "p50_us"),
     ("sidecar", "rr", "p50_us"), "<=", 0.15),
    ("accel+redirect throughput >= 1.7x kernel", ("accel+redirect", "stream", "gbps"),
     ("kernel", "stream", "gbps"), ">=", 1.7),
    ("accel conn/s via VIP >= kernel direct", ("accel", "crr", "conn_per_s"),
     ("kernel", "crr", "conn_per_s"), ">=", 1.0),
)
# Further comparisons worth a line, without a target.
RATIOS = (
    ("accel (route) p50 / kernel p50", ("accel", "rr", "p50_us"), ("kernel", "rr", "p50_us")),
    ("accel (route) Gbit/s / kernel", ("accel", "stream", "gbps"),
     ("kernel", "stream", "gbps")),
    ("accel+redirect conn/s / kernel", ("accel+redirect", "crr", "conn_per_s"),
     ("kernel", "crr", "conn_per_s")),
    ("sidecar+accel p50 / sidecar p50", ("sidecar+accel", "rr", "p50_us"),
     ("sidecar", "rr", "p50_us")),
    ("sidecar+accel Gbit/s / sidecar", ("sidecar+accel", "stream", "gbps"),
     ("sidecar", "stream", "gbps")),
    ("accel conn/s / iptables-dnat (VIP)", ("accel", "crr", "conn_per_s"),
     ("iptables-dnat", "crr", "conn_per_s")),
    ("iptables-dnat p50 / kernel p50", ("iptables-dnat", "rr", "p50_us"),
     ("kernel", "rr", "p50_us")),
)
MODE_COLOURS = {"kernel": "#7f7f7f", "accel": "#2ca02c", "accel+redirect": "#17becf",
                "sidecar": "#d62728",
                "sidecar+accel": "#ff7f0e", "iptables-dnat": "#1f77b4"}


def _figure(cases: list[dict[str, Any]], key: tuple[str, str, str]) -> float | None:
    mode, workload, metric = key
    for c in cases:
        if c["mode"] == mode and c["workload"] == workload:
            return c.get(metric)
    return None


def _ratio(cases: list[dict[str, Any]], a: tuple[str, str, str],
           b: tuple[str, str, str]) -> tuple[float | None, float | None, float | None]:
    x, y = _figure(cases, a), _figure(cases, b)
    if x is None or y is None or y == 0:
        return x, y, None
    return x, y, x / y


def check_targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, a, b, op, bound in TARGETS:
        x, y, ratio = _ratio(cases, a, b)
        met = None if ratio is None else (ratio <= bound if op == "<=" else ratio >= bound)
        out.append({"target": label, "measured": x, "reference": y,
                    "ratio": None if ratio is None else round(ratio, 3), "op": op,
                    "bound": bound, "met": met})
    return out


# What connection records cost: each accel mode with records on against the same mode with
# them off, in one run. Loss in percent: conn/s given up (crr), p50 added (rr).
FLOWS_COST_GOAL_PCT = 3.0  # on crr


def _median_run(cases: list[dict[str, Any]], mode: str, workload: str,
                key: str) -> float | None:
    for c in cases:
        if c["mode"] == mode and c["workload"] == workload:
            values = sorted(r[key] for r in c.get("runs", []) if r.get(key) is not None)
            return values[len(values) // 2] if values else None
    return None


def flows_cost(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for mode in ("accel", "accel+redirect"):
        for workload, metric in (("crr", "conn_per_s"), ("rr", "p50_us")):
            on = _figure(cases, (mode, workload, metric))
            off = _figure(cases, (f"{mode}-noflows", workload, metric))
            if on is None or off is None or not off:
                continue
            loss = (off - on) / off if metric == "conn_per_s" else (on - off) / off
            row = {"mode": mode, "workload": workload, "metric": metric, "flows_on": on,
                   "flows_off": off, "loss_pct": round(100 * loss, 2),
                   # The agent's CPU per run (reading and counting the records), median.
                   "agent_cpu_s_on": _median_run(cases, mode, workload, "agent_cpu_s"),
                   "agent_cpu_s_off": _median_run(cases, f"{mode}-noflows", workload,
                                                  "agent_cpu_s")}
            for side, m in (("on", mode), ("off", f"{mode}-noflows")):
                ns = _median_run(cases, m, workload, "bpf_ns_per_op")
                if ns is not None:
                    # The socket programs' own time per connection (crr) or transaction
                    # (rr), by the kernel's BPF stats: the cost apart from the VM's noise.
                    row[f"bpf_ns_per_op_{side}"] = ns
            if workload == "crr":
                row["goal_pct"] = FLOWS_COST_GOAL_PCT
                row["met"] = 100 * loss <= FLOWS_COST_GOAL_PCT
            out.append(row)
    return out


def brief(row: dict[str, Any]) -> str:
    """One run in a few words, for progress lines."""
    if row.get("p50_us") is not None:
        text = f"p50 {row['p50_us']:.1f} us  p99 {row['p99_us']:.1f} us"
    elif row.get("gbps") is not None:
        text = f"{row['gbps']:.2f} Gbit/s"
    elif row.get("conn_per_s") is not None:
        text = f"{row['conn_per_s']:.0f} conn/s"
    else:
        text = "-"
    counters = row.get("accel_counters")
    if counters:
        text += (f"  [redirects {counters['msg_redirects']}, balanced "
                 f"{counters['connect_balanced']}, pod-routed {counters.get('pod_redirects', 0)}]")
    return text


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    cases = results["cases"]
    env = results.get("env", {})
    modes = list(dict.fromkeys(c["mode"] for c in cases))
    header = ["mode", "p50 us", "p90 us", "p99 us", "p99.9 us", "Gbit/s", "conn/s"]
    rows = []
    for mode in modes:
        def get(workload: str, metric: str, m: str = mode) -> float | None:
            return _figure(cases, (m, workload, metric))
        rows.append([mode, _fmt(get("rr", "p50_us")), _fmt(get("rr", "p90_us")),
                     _fmt(get("rr", "p99_us")), _fmt(get("rr", "p999_us")),
                     _fmt(get("stream", "gbps"), 2), _fmt(get("crr", "conn_per_s"), 0)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    placement = env.get("placement")
    if placement:
        lines.append(f"kernel {env.get('kernel')}, {env.get('cpu_model')}; CPUs "
                     + ", ".join(f"{k} {v}" for k, v in placement.items())
                     + f"; median of {env.get('repeats')} interleaved repeats of "
                     f"{env.get('seconds')} s")
    lines.append("  ".join(h.rjust(w) if i else h.ljust(w)
                           for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    targets = results.get("targets") or check_targets(cases)
    lines.append("")
    for t in targets:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  {t['target']:<40} ratio {_fmt(t['ratio'], 3):>6}  {verdict}")
    for label, a, b in RATIOS:
        _, _, ratio = _ratio(cases, a, b)
        if ratio is not None:
            lines.append(f"  {label:<40} ratio {ratio:>6.3f}")
    counters = env.get("accel_counters") or {}
    if counters:
        lines.append(f"  agent counters over the run: {counters.get('msg_redirects', 0)} "
                     f"redirected messages ({counters.get('redirected_bytes', 0)} bytes), "
                     f"{counters.get('connect_balanced', 0)} balanced connects, "
                     f"{counters.get('pod_redirects', 0)} packets pod-routed past the bridge, "
                     f"{counters.get('msg_peer_unknown', 0)} unpaired")
    for c in results.get("flows_cost") or flows_cost(cases):
        what = "conn/s given up" if c["workload"] == "crr" else "p50 added"
        goal = (f" (goal <= {c['goal_pct']:g}%: {'met' if c['met'] else 'MISSED'})"
                if "goal_pct" in c else "")
        lines.append(f"  connection records on {c['mode']} {c['workload']}: {c['loss_pct']:+.2f}% "
                     f"{what}{goal}")
    load = env.get("loadavg_end")
    if load and load[0] > 1.5:  # the bench itself keeps about one CPU busy
        lines.append(f"  NOTE: load {load[0]:.1f} at the end, the bench itself accounting for "
                     "about 1: other work shared the CPUs; rerun when idle for steady figures")
    if env.get("foreign_cgroup_programs"):
        lines.append(f"  WARNING: {env['foreign_cgroup_programs']} socket programs of others are "
                     "attached above the bench cgroups; figures may be skewed")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2, default=str) + "\n")


def plot(results: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    env = results.get("env", {})
    modes = list(dict.fromkeys(c["mode"] for c in cases))
    colours = [MODE_COLOURS.get(m, "#9467bd") for m in modes]
    fig, (ax_lat, ax_tp, ax_crr) = plt.subplots(
        1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2.2, 1, 1]})

    pcts = (("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"), ("p999_us", "p99.9"))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        values = [_figure(cases, (mode, "rr", key)) for key, _ in pcts]
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(pcts))]
        heights = [v if v is not None else math.nan for v in values]
        bars = ax_lat.bar(xs, heights, width, label=mode, color=colours[i])
        for bar, v in zip(bars, values, strict=True):
            if v is not None:
                ax_lat.annotate(f"{v:.0f}" if v >= 10 else f"{v:.1f}",
                                (bar.get_x() + bar.get_width() / 2, v), ha="center",
                                va="bottom", fontsize=7)
    ax_lat.set_xticks(range(len(pcts)), [label for _, label in pcts])
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("round trip, us (log)")
    ax_lat.set_title("request/response latency (sockperf ping-pong, 64 B)")
    ax_lat.legend(fontsize=8, loc="upper left", ncols=len(modes))
    ax_lat.margins(y=0.25)

    for ax, workload, metric, title, unit in (
            (ax_tp, "stream", "gbps", "throughput (iperf3)", "Gbit/s"),
            (ax_crr, "crr", "conn_per_s", "connection rate (crr)", "connections/s")):
        values = [_figure(cases, (m, workload, metric)) for m in modes]
        heights = [v if v is not None else 0 for v in values]
        bars = ax.bar(range(len(modes)), heights, color=colours)
        for bar, v in zip(bars, values, strict=True):
            if v is not None:
                ax.annotate(f"{v:.1f}" if metric == "gbps" else f"{v:.0f}",
                            (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                            fontsize=8)
        ax.set_xticks(range(len(modes)), modes, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(title)

    placement = env.get("placement") or {}
    fig.suptitle(
        f"meshaccel bench: kernel {env.get('kernel', '?')}, CPUs "
        + ", ".join(f"{k}={v}" for k, v in placement.items())
        + f"; median of {env.get('repeats', '?')} interleaved repeats", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
