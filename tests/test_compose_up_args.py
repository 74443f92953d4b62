"""`accel compose up|status|down` without docker: which service is the agent and where its
pins and socket are (from its command line, as compose gives it), the project name
docker-compose would use, a container path seen from the host, and bad arguments (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from accel import compose_up

ROOT = Path(__file__).resolve().parents[1]


def test_the_agent_service_and_its_flags_come_from_its_command():
    config = {"services": {
        "controller": {"command": ["accel", "controller", "--docker"]},
        "agent": {"command": ["/usr/local/bin/accel", "agent", "--pin-dir", "/sys/fs/bpf/x",
                              "--api-socket=/run/accel/x.sock", "--keep"]},
        "app": {"command": "meshapp serve --name agent"}}}
    name, svc = compose_up.agent_service(config)
    assert name == "agent"
    assert compose_up.agent_flags(svc["command"]) == ("/sys/fs/bpf/x", "/run/accel/x.sock")
    from accel.kernel.loader import DEFAULT_PIN_DIR
    assert compose_up.agent_flags(["accel", "agent"]) == (DEFAULT_PIN_DIR,
                                                          "/run/accel/agent.sock")
    assert compose_up.is_agent(compose_up._argv("sh -c x accel agent --keep"))


def test_the_example_mesh_has_one_agent():
    doc = yaml.safe_load((ROOT / "compose" / "mesh.yml").read_text())
    assert compose_up.agent_service(doc)[0] == "agent"


def test_no_agent_or_two_agents_is_a_bad_file():
    for services in ({"a": {"command": ["true"]}},
                     {"a": {"command": ["accel", "agent"]}, "b": {"command": "accel agent"}}):
        try:
            compose_up.agent_service({"services": services})
        except compose_up.ComposeError as e:
            assert e.code == 2
        else:
            raise AssertionError(f"accepted {services}")


def test_project_name_is_docker_composes(monkeypatch):
    monkeypatch.delenv("COMPOSE_PROJECT_NAME", raising=False)
    assert compose_up.project_name([ROOT / "compose" / "mesh.yml"], None) == "compose"
    assert compose_up.project_name([Path("x.yml")], "My.Mesh_1") == "mymesh_1"
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", "fromenv")
    assert compose_up.project_name([Path("x.yml")], None) == "fromenv"


def test_a_container_path_seen_from_the_host():
    c = {"Mounts": [{"Source": "/run/accel", "Destination": "/run/accel"},
                    {"Source": "/srv/sock", "Destination": "/run/accel/sock"}]}
    assert compose_up.host_path(c, "/run/accel/agent.sock") == "/run/accel/agent.sock"
    assert compose_up.host_path(c, "/run/accel/sock/a") == "/srv/sock/a"  # the deepest mount
    assert compose_up.host_path(c, "/run/accelx/a") is None
    assert compose_up.host_path({}, "/run/accel/agent.sock") is None


def test_bad_arguments_exit_2(tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "accel.cli", "compose", *args],
                              capture_output=True, text=True, timeout=60,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    missing = str(tmp_path / "missing.yml")
    for args in (["up", "-f", missing], ["down", "-f", missing], ["status", "-f", missing],
                 ["up", "-f", str(ROOT / "compose" / "mesh.yml"), "--wait", "-1"], ["up"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
