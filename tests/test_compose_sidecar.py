"""compose/sidecar.yml, the baseline `accel bench --compose` compares with: it must work on
its own (no agent): calls by name go app -> sidecar -> sidecar -> app, over every replica,
bytes intact."""

from __future__ import annotations

import secrets

import pytest

from tests.conftest_docker import (
    COMPOSE_DIR,
    compose_images,
    compose_services,
    dexec_json,
    docker_api,
    docker_cleanup,
    docker_compose_command,
    docker_setup,
    wait_for,
)

__all__ = ["compose_images", "docker_api", "docker_cleanup", "docker_compose_command",
           "docker_setup"]

pytestmark = [pytest.mark.kernel, pytest.mark.docker, pytest.mark.timeout(300)]


def test_sidecar_baseline_serves_every_replica_through_haproxy(
        docker_api, compose_images, docker_compose_command, docker_setup, docker_cleanup):
    project = f"acceltside{secrets.token_hex(3)}"
    with compose_services(docker_api, docker_compose_command, [COMPOSE_DIR / "sidecar.yml"],
                          project, docker_setup, docker_cleanup):
        frontend = f"{project}_frontend_1"

        def all_replicas() -> dict:
            r = dexec_json(frontend, "meshapp", "call", "reviews:9080", "--count", "30",
                           "--bytes", "16", "--timeout", "1")
            return r if not r["errors"] and len(r["replicas"]) == 3 else None
        wait_for(all_replicas, 60, pause=0.5, what="reviews through the sidecars")
        r = dexec_json(frontend, "meshapp", "call", "reviews:9080", "--count", "30",
                       "--bytes", str(256 * 1024), "--log")
        assert r["ok"] == 30 and not r["errors"], r
        assert all(" > ratings/" in g for _, g, _ in r["log"])  # the second hop, via sidecars
        assert min(r["replicas"].values()) >= 8, r["replicas"]  # haproxy round-robin
        peers = dexec_json(frontend, "python3", "-c",
                           "import json,socket; print(json.dumps("
                           "{'reviews': socket.gethostbyname('reviews')}))")
        assert peers == {"reviews": "127.0.0.1"}  # the app talks to its own sidecar
