"""Fixtures for the docker-compose tests (tests/test_compose_*.py, marked `docker`).

A test module imports what it uses from here. pytest-docker's own fixtures are overridden for
this host: compose v1 (`docker-compose`, Debian's), `up -d` (v1 has no --wait: readiness is
waited for by the tests), and a project-name fixture whose teardown removes the project's
containers and networks by the compose project label, which also runs when `up` failed
(pytest-docker then never runs `down`). Images are built locally by compose/build-images.sh.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
ACCEL = str(ROOT / ".venv" / "bin" / "accel")
PROJECT_LABEL = "com.docker.compose.project"


# ---- pytest-docker overrides ---------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return "docker-compose"


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    return ["up -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --remove-orphans -t 5"]


@pytest.fixture(scope="session")
def docker_compose_project_name(docker_api) -> Iterator[str]:
    name = f"accelt{secrets.token_hex(3)}"
    yield name
    remove_project(docker_api, name)


# ---- docker itself -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_api():
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as e:
        pytest.skip(f"dockerd is not reachable ({e}): `deploy/setup.sh --docker` starts it")
    yield client.api
    client.close()


@pytest.fixture(scope="session")
def compose_images(docker_api) -> None:
    """Every image the compose files use, built here (cached after the first build)."""
    r = subprocess.run([str(COMPOSE_DIR / "build-images.sh")], capture_output=True, text=True,
                       timeout=900)
    if r.returncode:
        pytest.fail(f"compose/build-images.sh failed:\n{r.stdout}\n{r.stderr}")


def remove_project(api, project: str) -> None:
    """Remove every container and network carrying the compose project label."""
    remove_labelled(api, f"{PROJECT_LABEL}={project}")


def remove_labelled(api, label: str) -> None:
    for c in api.containers(all=True, filters={"label": label}):
        with contextlib.suppress(Exception):
            api.remove_container(c["Id"], force=True, v=True)
    for n in api.networks(filters={"label": label}):
        with contextlib.suppress(Exception):
            api.remove_network(n["Id"])


@pytest.fixture(scope="session")
def privileged_ok(docker_api, compose_images) -> bool:
    """Can this docker start privileged containers? Not when the daemon's capability
    bounding set lacks one (then the agent runs with compose/agent-caps.yml)."""
    r = subprocess.run(["docker", "run", "--rm", "--privileged", "--network", "none",
                        "meshaccel/app:local", "true"], capture_output=True, timeout=60)
    return r.returncode == 0


def cgroup2_mount() -> str:
    for line in Path("/proc/mounts").read_text().splitlines():
        f = line.split()
        if len(f) > 2 and f[2] == "cgroup2":
            return f[1]
    pytest.skip("no cgroup2 hierarchy is mounted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose(files: list[Path | str], project: str, *args: str, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["docker-compose", "-p", project]
    for f in files:
        cmd += ["-f", str(f)]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd + list(args))} failed:\n{r.stdout}\n{r.stderr}")
    return r


def project_containers(api, project: str, service: str | None = None) -> list[dict]:
    labels = [f"{PROJECT_LABEL}={project}"]
    if service:
        labels.append(f"com.docker.compose.service={service}")
    return sorted(api.containers(all=True, filters={"label": labels}), key=lambda c: c["Names"])


def dexec(container: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "exec", container, *cmd], capture_output=True, text=True,
                          timeout=timeout)


def dexec_json(container: str, *cmd: str, timeout: float = 60) -> dict:
    r = dexec(container, *cmd, timeout=timeout)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"{cmd} in {container} gave no JSON (rc {r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}") from None


def wait_for(check, timeout: float, pause: float = 0.25, what: str = "condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = check()
        except Exception as e:  # not ready yet
            last = e
        else:
            if last:
                return last
        time.sleep(pause)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def health(api, cid: str) -> str:
    state = api.inspect_container(cid)["State"]
    if not state.get("Running"):
        return "stopped"
    return (state.get("Health") or {}).get("Status", "running")


@contextlib.contextmanager
def unreachable_route(cidr: str) -> Iterator[None]:
    """A connect() to a VIP the datapath did not rewrite fails here, on this host, instead
    of leaving it: VIPs are not routable addresses."""
    added = subprocess.run(["ip", "route", "add", "unreachable", cidr],
                           capture_output=True).returncode == 0
    try:
        yield
    finally:
        if added:
            subprocess.run(["ip", "route", "del", "unreachable", cidr], capture_output=True)


def accel_stats(pin_dir: str) -> dict:
    r = subprocess.run([ACCEL, "stats", "--json", "--pin-dir", pin_dir], capture_output=True,
                       text=True, timeout=30)
    if r.returncode:
        raise AssertionError(f"accel stats failed: {r.stderr}")
    return json.loads(r.stdout)


def uninstall(pin_dir: str) -> None:
    subprocess.run([ACCEL, "uninstall", "--pin-dir", pin_dir], capture_output=True, timeout=60)


def env_for(**kw: str) -> dict[str, str]:
    return {**os.environ, **kw}


@contextlib.contextmanager
def compose_services(api, command: str, files: list, project: str, setup, cleanup):
    """pytest-docker's docker_services for one project, plus removal by the project label
    afterwards, which also runs when `up` failed half way (pytest-docker runs no `down` then)."""
    from pytest_docker.plugin import get_docker_services

    try:
        with get_docker_services(command, [str(f) for f in files], project, setup,
                                 cleanup) as services:
            yield services
    finally:
        remove_project(api, project)
