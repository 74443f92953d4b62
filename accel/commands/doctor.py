"""`accel doctor`: can this host run the meshaccel datapath? Each check is ok or failed with
the fix. Program checks load the project's real programs (not attached) into a scratch
pin directory that is removed afterwards. Exit 0 only when everything the datapath needs
passed."""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
from dataclasses import dataclass

from accel.commands.common import add_json_arg, print_json

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check that this host can run the datapath")
    add_json_arg(p)
    p.set_defaults(func=run)


def _caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> Check:
    caps = _caps()
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    ok = os.geteuid() == 0 or ((has(CAP_BPF) or has(CAP_SYS_ADMIN)) and has(CAP_NET_ADMIN))
    return Check("privileges", ok, f"euid {os.geteuid()}, CapEff {caps:#x}",
                 "run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)")


def check_kernel() -> Check:
    rel = platform.release()
    try:
        major, minor = (int(x) for x in rel.split(".")[:2])
    except ValueError:
        return Check("kernel", False, rel, "cannot parse the kernel version")
    # sk_msg reading sk storage and netns cookies needs 5.15 or newer.
    ok = (major, minor) >= (5, 15)
    return Check("kernel", ok, rel, "needs Linux >= 5.15 (sk_msg netns cookie, socket storage)")


def check_bpffs() -> Check:
    with open("/proc/mounts") as f:
        ok = any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f)
    return Check("bpffs", ok, "/sys/fs/bpf" + (" mounted" if ok else " not mounted"),
                 "mount -t bpf bpf /sys/fs/bpf")


def check_cgroup2() -> Check:
    from accel.datapath import cgroup

    try:
        return Check("cgroup2", True, str(cgroup.cgroup2_mount()))
    except cgroup.CgroupError as e:
        return Check("cgroup2", False, str(e), "mount -t cgroup2 none /sys/fs/cgroup/unified")


def check_btf() -> Check:
    ok = os.path.exists("/sys/kernel/btf/vmlinux")
    return Check("btf", ok, "/sys/kernel/btf/vmlinux" + ("" if ok else " missing"),
                 "a kernel built with CONFIG_DEBUG_INFO_BTF (only needed for diagnostics)",
                 required=False)


def check_bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return Check("bcc", False, str(e),
                     "apt-get install python3-bpfcc, and run deploy/setup.sh for the venv link")
    build = f"/lib/modules/{platform.release()}/build"
    if not os.path.exists(os.path.join(build, "include")):
        return Check("bcc", False, f"bcc imports, but no kernel headers at {build}",
                     "deploy/setup.sh links Debian's linux-headers as a fallback")
    return Check("bcc", True, f"bcc imports; headers at {os.path.realpath(build)}")


def _scratch_pin_dir() -> str:
    path = f"/sys/fs/bpf/accel-doctor-{secrets.token_hex(4)}"
    os.makedirs(path)
    return path


def check_programs() -> list[Check]:
    """Compile and load every real program (no attach)."""
    from accel.kernel.kbtf import fastpath_offsets

    checks: list[Check] = []
    offsets = fastpath_offsets()
    # Optional: without it every service stays on TCP (the default, transparent mode).
    checks.append(Check("fastpath: redirect", offsets.available,
                        "kernel structure offsets from BTF found: services may ask for the "
                        "socket redirect" if offsets.available else offsets.missing,
                        "services with fastpath: redirect stay on TCP", required=False))
    from accel.datapath import policy
    from accel.kernel import attach, bpf, loader
    from accel.kernel.maps import Map

    pin = _scratch_pin_dir()
    loads: list[tuple[str, loader.Program]] = [
        ("sock_ops", loader.Program("sockops.c", "accel_sockops", "sock_ops",
                                    bpf.ATTACH["cgroup_sock_ops"])),
        ("sk_msg + sockhash", loader.Program("redirect.c", "accel_msg", "sk_msg")),
        ("cgroup sock_addr", loader.Program("connect.c", "accel_connect4", "cgroup_sock_addr",
                                            bpf.ATTACH["cgroup_inet4_connect"])),
        ("pod routing", loader.Program("pod_tc.c", "accel_pod_tc", "sched_cls")),
        ("policy: reset denied SYNs", policy.TC_PROGRAM),
        ("policy: cut denied connections (iter/tcp, bpf_sock_destroy)", policy.ITER_PROGRAM),
    ]
    try:
        for title, prog in loads:
            source, fn = prog.source, prog.function
            try:
                # The agent's own loader (a child process compiles), on a scratch pin dir.
                loaded = loader.ensure(loader.Unit(f"doctor-{fn}", (prog,), offsets.defines),
                                       pin)
                if source == "redirect.c":
                    p = attach.Program(loaded.programs[fn])
                    with Map.open(os.path.join(pin, "accel_sockhash")) as sockhash:
                        attach.sockmap_attach(p, sockhash.fd, bpf.ATTACH["sk_msg_verdict"])
                        attach.sockmap_detach(p.fd, sockhash.fd, bpf.ATTACH["sk_msg_verdict"])
                    p.close()
                checks.append(Check(title, True, f"{source}:{fn} loads"))
            except Exception as e:
                # The agent runs on without pod routing; without the policy programs it
                # refuses tables with policies (fail closed), so neither stops the rest.
                optional = source in ("pod_tc.c", "policy_tc.c", "policy_iter.c")
                why = {"pod_tc.c": "; the agent runs without pod routing",
                       "policy_tc.c": "; policies cannot be enforced on this host",
                       "policy_iter.c": "; policies cannot be enforced on this host"}
                checks.append(Check(title, False, f"{source}:{fn}: {_short(e)}",
                                    "this kernel lacks a feature the program needs; see detail"
                                    + why.get(source, ""), required=not optional))
        from bcc import BPF  # doctor is short-lived: compiling here costs the agent nothing

        for title, prog_type, text in (
            ("xdp", BPF.XDP, "int f(struct xdp_md *c) { return XDP_PASS; }"),
            ("tc (sched_cls)", BPF.SCHED_CLS, "int f(struct __sk_buff *s) { return 0; }"),
        ):
            try:
                b = BPF(text=("#include <uapi/linux/bpf.h>\n" + text).encode())
                b.load_func("f", prog_type)
                b.cleanup()
                checks.append(Check(title, True, "loads"))
            except Exception as e:
                checks.append(Check(title, False, _short(e), "kernel without XDP/cls_bpf"))
    finally:
        shutil.rmtree(pin, ignore_errors=True)
    return checks


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def check_qos() -> Check:
    """Which QoS mechanisms this kernel gives (accel/datapath/qos.py)."""
    from accel.datapath.qos import mechanisms

    m = mechanisms()
    return Check("qos", True, f"bandwidth: {m['bandwidth']} ({m['bandwidth_note']}); "
                 f"connections: {m['connections']}, refused with {m['refused_errno']}",
                 required=False)


def run_checks() -> list[Check]:
    checks = [check_privileges(), check_kernel(), check_bpffs(), check_cgroup2(), check_btf(),
              check_bcc(), check_qos()]
    if all(c.ok for c in checks if c.name in ("privileges", "bpffs", "bcc")):
        checks += check_programs()
    else:
        checks.append(Check("programs", False, "skipped: fix the checks above first"))
    return checks


def run(args: argparse.Namespace) -> int:
    checks = run_checks()
    ok = all(c.ok for c in checks if c.required)
    if args.json:
        print_json({"ok": ok, "checks": [c.__dict__ for c in checks]})
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            print(f"[{mark}] {c.name:18} {c.detail}")
            if not c.ok and c.fix:
                print(f"       fix: {c.fix}")
        print("datapath can run" if ok else "datapath cannot run here: fix the failures above")
    return 0 if ok else 1
