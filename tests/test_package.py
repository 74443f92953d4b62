"""What a user installs, checked as CI builds it: a wheel from the repository's tracked files,
installed into a fresh venv (Debian's bcc visible through the system site-packages), run
from outside the checkout: `accel doctor` passes and `accel agent` balances a connect. And
the pure-Python tier of this suite, run as an unprivileged user from a copy of the tracked
files with that venv (nothing of the checkout, nothing of root)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_agent_lifecycle import assert_no_trace, write_config
from tests.traffic import EchoServer, roundtrip

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


def tracked_files() -> list[str]:
    r = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout: the wheel is built from tracked files")
    return [f for f in r.stdout.decode().split("\0") if f and (REPO / f).is_file()]


def clean_env() -> dict[str, str]:
    """The caller's environment without anything pointing at this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "ACCEL_BPF_DIR", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


@pytest.fixture(scope="module")
def installed():
    """(source copy, venv) under a world-readable directory outside the checkout."""
    top = Path(tempfile.mkdtemp(prefix="accel-pkg-", dir="/var/tmp"))
    try:
        src = top / "src"
        for f in tracked_files():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
        venv = top / "venv"
        run = {"check": True, "capture_output": True, "text": True, "env": clean_env()}
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                       **run)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "install", "setuptools>=68", "wheel"], **run, timeout=600)
        subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(top / "dist"), str(src)], **run, timeout=600)
        (wheel,) = (top / "dist").glob("meshaccel-*.whl")
        subprocess.run([*pip, "install", f"{wheel}[dev]"], **run, timeout=900)
        subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
        top.chmod(0o755)
        yield src, venv
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_wheel_runs_outside_the_checkout(installed, lab, pin_dir, test_cgroup, tmp_path):
    _, venv = installed
    accel = str(venv / "bin" / "accel")
    env = clean_env()
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import accel, pathlib; p = pathlib.Path(accel.__file__).parent; "
                            "print(p, (p / 'bpf' / 'lib' / 'common.h').exists())"],
                           cwd="/", env=env, capture_output=True, text=True, check=True)
    path, has_sources = where.stdout.split()
    assert path.startswith(f"{venv}/") and has_sources == "True", where.stdout
    doctor = subprocess.run([accel, "doctor"], cwd="/", env=env, capture_output=True, text=True,
                            timeout=300)
    assert doctor.returncode == 0 and "datapath can run" in doctor.stdout, doctor.stdout

    client, server = lab.pods
    cfg = write_config(tmp_path, [server])
    sock = f"/run/accel/pkg-{os.path.basename(pin_dir)}.sock"
    agent = subprocess.Popen([accel, "agent", "--config", str(cfg), "--pin-dir", pin_dir,
                              "--cgroup", str(test_cgroup), "--api-socket", sock], cwd="/",
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        ready = subprocess.run([accel, "status", "--wait", "120", "--api-socket", sock],
                               cwd="/", env=env, capture_output=True, text=True)
        assert ready.returncode == 0, ready.stderr
        payload = os.urandom(20_000)
        with EchoServer(server, 8080):
            assert roundtrip(client, "10.96.0.1", 80, payload) == payload
    finally:
        agent.send_signal(signal.SIGTERM)
        out = agent.communicate(timeout=60)[0]
    assert agent.returncode == 0, out
    assert_no_trace(pin_dir, test_cgroup)


def test_pure_tier_passes_as_an_unprivileged_user(installed):
    """`pytest -m "not kernel"` as nobody, in the copy, with the wheel venv's Python."""
    src, venv = installed
    home = src.parent / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    env = {**clean_env(), "HOME": str(home), "TMPDIR": str(home)}
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        str(venv / "bin" / "python"), "-m", "pytest", "tests", "-m",
                        "not kernel", "-q", "-p", "no:cacheprovider", "--basetemp",
                        str(home / "bt")],
                       cwd=src, env=env, capture_output=True, text=True, timeout=900)
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
