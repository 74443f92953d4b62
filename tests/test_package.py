"""What a user installs, checked as CI builds it: a wheel from the repository's tracked files,
installed into a fresh venv (Debian's bcc visible through the system site-packages), run
from outside the checkout: `accel doctor` passes and `accel agent` balances a connect. And
the pure-Python tier of this suite, run as an unprivileged user from a copy of the tracked
files with that venv (nothing of the checkout, nothing of root)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.package import NOBODY, clean_env
from tests.test_agent_lifecycle import assert_no_trace, write_config
from tests.traffic import EchoServer, roundtrip

pytestmark = pytest.mark.kernel



def test_wheel_runs_outside_the_checkout(installed_package, lab, pin_dir, test_cgroup, tmp_path):
    _, venv = installed_package
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


def test_pure_tier_passes_as_an_unprivileged_user(installed_package):
    """`pytest -m "not kernel"` as nobody, in the copy, with the wheel venv's Python."""
    src, venv = installed_package
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
