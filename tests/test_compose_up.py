"""`accel compose up|status|down` run as a user would: only the compose file and the
project's own settings (port, pin dir, socket, VIP CIDR) are given. The command itself must
find the cgroup2 mount and whether docker runs privileged containers (ACCEL_CGROUP2 is
removed from its environment, agent-caps.yml is not passed), generate the VIP override and
wait for the agent; a call through a VIP then works, status says ready, and down leaves no
container, network, pin or cgroup attachment behind, twice in a row."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys

import pytest

from accel.compose_hosts import vip_map
from tests.conftest_docker import (
    COMPOSE_DIR,
    PROJECT_LABEL,
    ROOT,
    compose_images,
    dexec,
    dexec_json,
    docker_api,
    free_port,
    remove_project,
    unreachable_route,
    wait_for,
)

__all__ = ["compose_images", "docker_api"]

pytestmark = [pytest.mark.kernel, pytest.mark.docker, pytest.mark.timeout(600)]

VIP_CIDR = os.environ.get("ACCEL_TEST_VIP_CIDR", "10.96.250.0/24")
# Projects are named <prefix>up<random>: a shared host can tell whose they are.
PREFIX = os.environ.get("ACCEL_TEST_PROJECT_PREFIX", "accelt")


def accel(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI of this source tree, in a child process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "accel.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def attached(cgroup: str, prog_ids: set[int]) -> set[int]:
    """Which of `prog_ids` are attached to any of the agent's hooks of `cgroup`."""
    from accel.datapath.datapath import CGROUP_ATTACH_TYPES
    from accel.kernel import bpf

    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {p for t in CGROUP_ATTACH_TYPES for p in bpf.prog_query(fd, t)} & prog_ids
    finally:
        os.close(fd)


def test_compose_up_status_down_as_one_command(docker_api, compose_images):
    from accel.datapath.datapath import state_file, uninstall

    uid = secrets.token_hex(3)
    project = f"{PREFIX}up{uid}"
    pin_dir = f"/sys/fs/bpf/accel-{project}"
    env = {k: v for k, v in os.environ.items() if k != "ACCEL_CGROUP2"}
    env.update(ACCEL_VIP_CIDR=VIP_CIDR, ACCEL_XDS_PORT=str(free_port()), ACCEL_PIN_DIR=pin_dir,
               ACCEL_API_SOCKET=f"/run/accel/{project}.sock",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(":"))
    base = COMPOSE_DIR / "mesh.yml"
    files = ["-f", str(base), "-p", project]
    frontend = f"{project}_frontend_1"
    label = f"{PROJECT_LABEL}={project}"
    with unreachable_route(VIP_CIDR):  # a connect() the agent did not rewrite fails here
        try:
            up = accel("compose", "up", *files, "--wait", "120", env=env)
            assert up.returncode == 0, f"accel compose up failed:\n{up.stdout}\n{up.stderr}"
            assert "ACCEL_CGROUP2=" in up.stdout and "agent ready" in up.stdout, up.stdout

            state = json.loads(state_file(pin_dir).read_text())
            cgroup, progs = state["cgroup"], set(state["prog_ids"].values())
            assert attached(cgroup, progs), "the agent's programs are on the cgroup2 root"

            # A call by name goes to the VIP the override gave, and the agent balances it.
            resolved = dexec(frontend, "getent", "hosts", "reviews").stdout.split()
            assert resolved and resolved[0] == str(vip_map([base], VIP_CIDR)["reviews"])

            def served() -> dict | None:
                r = dexec_json(frontend, "meshapp", "call", "reviews:9080", "--count", "5",
                               "--bytes", "4096", timeout=60)
                return r if r["ok"] == 5 and not r["errors"] else None
            wait_for(served, 60, pause=0.5, what="calls to reviews:9080 through its VIP")
            stats = accel("stats", "--json", "--pin-dir", pin_dir, env=env, timeout=30)
            assert json.loads(stats.stdout)["connect_balanced"] >= 5, stats.stdout

            st = accel("compose", "status", *files, "--json", env=env, timeout=60)
            report = json.loads(st.stdout)
            assert st.returncode == 0 and report["ok"], report
            assert report["agent"]["ready"] is True, report["agent"]
            assert {c["service"] for c in report["containers"]} == {
                "agent", "controller", "frontend", "reviews", "ratings"}
            text = accel("compose", "status", *files, env=env, timeout=60)
            assert text.returncode == 0 and ": ready," in text.stdout, text.stdout

            down = accel("compose", "down", *files, env=env)
            assert down.returncode == 0, f"accel compose down failed:\n{down.stdout}\n" \
                                         f"{down.stderr}"
            assert docker_api.containers(all=True, filters={"label": label}) == []
            assert docker_api.networks(filters={"label": label}) == []
            assert not os.path.exists(pin_dir), "the kept datapath's pins are gone"
            assert not state_file(pin_dir).exists()
            assert attached(cgroup, progs) == set(), "no program of the agent stays attached"
            assert "pins removed" in down.stdout, down.stdout

            again = accel("compose", "down", *files, env=env)
            assert again.returncode == 0, again.stderr
            assert "no datapath removed" in again.stdout, again.stdout
            after = accel("compose", "status", *files, env=env, timeout=60)
            assert after.returncode == 1 and "no containers" in after.stdout, after.stdout
        finally:  # also after a failed up: the command's own down, then by the label
            with contextlib.suppress(Exception):
                accel("compose", "down", *files, env=env)
            remove_project(docker_api, project)
            with contextlib.suppress(Exception):
                uninstall(pin_dir)
