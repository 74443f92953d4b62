"""Fixtures for tests on the real kernel: unique cgroups, lab pods, a loaded datapath.

Every fixture removes what it made, even when the test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from accel.datapath import cgroup as cg


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: tests load BPF programs into this kernel")
        for item in items:
            item.add_marker(skip)


@pytest.fixture
def uid() -> str:
    return secrets.token_hex(3)


@pytest.fixture
def test_cgroup(uid):
    """A fresh cgroup2 directory; the test process runs inside it for the test's duration,
    so the sockets it creates are seen by programs attached there (and nowhere else)."""
    root = cg.cgroup2_mount()
    path = root / f"accel-test-{uid}"
    path.mkdir()
    before = cg.process_cgroup()
    (path / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield path
    finally:
        (before / "cgroup.procs").write_text(str(os.getpid()))
        for proc in (path / "cgroup.procs").read_text().split():
            try:
                (before / "cgroup.procs").write_text(proc)
            except OSError:
                pass
        path.rmdir()


@pytest.fixture
def pin_dir(uid):
    path = f"/sys/fs/bpf/accel-test-{uid}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lab_factory(uid, test_cgroup):
    from accel.lab import Lab

    made: list[Lab] = []

    def make(n: int = 2, **kw) -> Lab:
        lab = Lab(n, prefix=f"at{uid}{len(made)}", cgroup=str(test_cgroup), **kw)
        made.append(lab)
        return lab.up()

    yield make
    for lab in made:
        lab.down()


@pytest.fixture
def lab(lab_factory):
    return lab_factory(2)


@pytest.fixture
def datapath(pin_dir, test_cgroup):
    from accel.datapath.datapath import Datapath

    dp = Datapath(pin_dir=pin_dir, cgroup_path=str(test_cgroup)).start()
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture
def side_agent(uid):
    """An Agent on a datapath of its own cgroup (the test process stays outside it): for
    tests that drive configuration and read the maps back, with no traffic of their own."""
    from accel.agent import Agent
    from accel.datapath.datapath import Datapath, lock_file

    group = cg.cgroup2_mount() / f"accel-side-{uid}"
    pin = f"/sys/fs/bpf/accel-side-{uid}"
    group.mkdir()
    dp = None
    try:
        dp = Datapath(pin_dir=pin, cgroup_path=str(group)).start()
        yield Agent(dp, source="xds")
    finally:
        if dp is not None:
            dp.close()
        group.rmdir()
        shutil.rmtree(pin, ignore_errors=True)
        lock_file(pin).unlink(missing_ok=True)


@pytest.fixture
def env():
    """An isolated place to run `accel agent` subprocesses for API tests (tests/api_harness)."""
    from tests.api_harness import Env

    e = Env()
    try:
        yield e
    finally:
        e.cleanup()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
