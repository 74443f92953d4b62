"""Fixtures for tests on the real kernel: unique cgroups, lab pods, a loaded datapath.

Every fixture removes what it made, even when the test fails.

Two tiers. A test that needs root, BPF, network namespaces, cgroups, docker or the compiled
datapath is marked `kernel`: by hand (a module's `pytestmark`, or the test's decorator) or
here, from the fixtures it uses (KERNEL_FIXTURES) and the `docker` marker. The rest is the
pure tier, `pytest -m "not kernel"`, which runs as any user and never imports bcc: modules
whose `pytestmark` says `kernel` are not even imported when the run leaves kernel tests out.
So that a kernel test cannot land in the pure tier unnoticed, a test that is not marked
`kernel` fails when it (the test process, from any thread) opens or lists anything under
bpffs, the cgroup2 hierarchy or the netns directories, loads libbcc, opens a netlink socket
or runs ip/tc/bpftool/nsenter/docker and the like; what a subprocess it starts does is
caught by running the pure tier as a user without root, which README's test section shows.
"""

from __future__ import annotations

import ast
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

import pytest

from accel.datapath import cgroup as cg

# Fixtures (here and in conftest_docker.py) that make a test a kernel test.
KERNEL_FIXTURES = frozenset({
    "test_cgroup", "pin_dir", "lab_factory", "lab", "datapath", "side_agent", "env",
    "docker_api", "compose_images", "privileged_ok", "docker_compose_project_name",
    "installed_package",  # root: setpriv tests run an unprivileged user with it
})


def _is_root() -> bool:
    return os.geteuid() == 0


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the markers added here count
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("kernel") is None and (
                item.get_closest_marker("docker") is not None
                or KERNEL_FIXTURES.intersection(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.kernel)
    if not _is_root():
        skip = pytest.mark.skip(reason="kernel test, needs root (BPF, network namespaces, "
                                "cgroups): run as root, or leave kernel tests out with "
                                "-m 'not kernel'")
        for item in items:
            if item.get_closest_marker("kernel") is not None:
                item.add_marker(skip)


# ---- not importing kernel-only modules when kernel tests are left out --------------------


def _marker_names(config) -> set[str]:
    names = {"kernel"}
    for line in config.getini("markers"):
        names.add(line.split(":")[0].split("(")[0].strip())
    return names


def _kernel_deselected(config) -> bool:
    """True when -m leaves out every kernel test, whatever other markers it carries."""
    expr_text = (config.option.markexpr or "").strip()
    if not expr_text:
        return False
    try:
        from _pytest.mark.expression import Expression

        expr = Expression.compile(expr_text)
    except Exception:  # pytest's internals moved, or a bad -m: collect as usual
        return False
    others = _marker_names(config)
    return not any(expr.evaluate(lambda name, /, _m=marks, **kw: name in _m)
                   for marks in ({"kernel"}, others))


def _module_is_kernel(path: Path) -> bool:
    """The module's own `pytestmark = ...` names the kernel marker (read without importing
    it: importing would load bcc and the datapath)."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError):
        return False
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return "mark.kernel" in ast.unparse(node.value)
    return False


def pytest_ignore_collect(collection_path: Path, config):
    if (collection_path.suffix == ".py" and collection_path.name.startswith("test_")
            and _kernel_deselected(config) and _module_is_kernel(collection_path)):
        return True
    return None


# ---- the guard: a test not marked kernel that uses the kernel fails ----------------------


class KernelUseError(RuntimeError):
    """A test that is not marked `kernel` used what only kernel tests may."""


def _kernel_dirs() -> tuple[str, ...]:
    dirs = ["/sys/fs/bpf", "/sys/fs/cgroup", "/run/netns", "/var/run/netns"]
    try:
        dirs.append(str(cg.cgroup2_mount()))
    except cg.CgroupError:
        pass
    return tuple(dict.fromkeys(dirs))


KERNEL_DIRS = _kernel_dirs()
KERNEL_TOOLS = frozenset({"ip", "tc", "bpftool", "nsenter", "unshare", "mount", "umount",
                          "iptables", "ip6tables", "nft", "sysctl", "modprobe", "docker",
                          "docker-compose", "haproxy"})
_PATH_EVENTS = frozenset({"open", "os.mkdir", "os.rmdir", "os.remove", "os.rename",
                          "os.listdir", "os.scandir", "os.chmod", "os.chown", "os.symlink",
                          "os.link", "os.truncate", "os.utime", "shutil.rmtree"})
_guarded: list = []  # [the running item] while a test not marked kernel runs
_uses: list[str] = []  # what it did


def _under_kernel_dir(path: object) -> str | None:
    if isinstance(path, int) or path is None:
        return None
    try:
        p = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return None
    for d in KERNEL_DIRS:
        if p == d or p.startswith(d + "/"):
            return p
    return None


def _kernel_use(event: str, args: tuple) -> str | None:
    if event in _PATH_EVENTS:
        for a in args[:2]:
            p = _under_kernel_dir(a)
            if p:
                return f"{event} {p}"
    elif event == "ctypes.dlopen":
        name = str(args[0] or "")
        if "bcc" in name or "bpf" in name:
            return f"loaded {name}"
    elif event == "socket.__new__":
        if len(args) > 1 and args[1] == socket.AF_NETLINK:
            return "opened a netlink socket"
    elif event == "subprocess.Popen":
        argv = args[1]
        if isinstance(argv, (str, bytes, os.PathLike)):
            argv = [argv]
        if argv and os.path.basename(os.fsdecode(argv[0])) in KERNEL_TOOLS:
            return f"ran {os.fsdecode(argv[0])}"
    return None


def _audit(event: str, args: tuple) -> None:
    if not _guarded:
        return
    what = _kernel_use(event, args)
    if what is None:
        return
    _uses.append(what)
    raise KernelUseError(f"{_guarded[0].nodeid} is not marked kernel but {what}: mark it "
                         "@pytest.mark.kernel (or use a kernel fixture)")


sys.addaudithook(_audit)


def _guard_phase(item):
    if item.get_closest_marker("kernel") is not None:
        return (yield)
    _guarded[:] = [item]
    try:
        return (yield)
    finally:
        _guarded.clear()


# Setup and the test itself; not teardown, where a module's kernel fixture can end after
# its last test, which need not be a kernel one.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guard_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guard_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail the phase even when the test caught the KernelUseError."""
    report = yield
    if _uses and call.when in ("setup", "call"):
        if report.passed or report.skipped:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} is not marked kernel but "
                               f"{'; '.join(dict.fromkeys(_uses))}: mark it @pytest.mark.kernel")
        _uses.clear()
    return report


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
    from accel.datapath.datapath import Datapath, lock_file
    from accel.runtime import Runtime

    group = cg.cgroup2_mount() / f"accel-side-{uid}"
    pin = f"/sys/fs/bpf/accel-side-{uid}"
    group.mkdir()
    dp = None
    try:
        dp = Datapath(pin_dir=pin, cgroup_path=str(group)).start()
        yield Runtime(datapath=dp)
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


@pytest.fixture(scope="session")
def installed_package():
    """(source copy, venv) of the wheel installed as a user would (tests/package.py), built
    once per run; removed after."""
    import tempfile

    from tests.package import build_installed

    top = Path(tempfile.mkdtemp(prefix="accel-pkg-", dir="/var/tmp"))
    try:
        yield build_installed(top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_stale_agent_sockets(request):
    """An agent a test SIGKILLs leaves its API socket file (as a real one would: `accel
    uninstall` removes those); the tests' own (/run/accel/test-*.sock) go after each test."""
    if request.node.get_closest_marker("kernel") is None or not _is_root():
        yield
        return
    run = Path("/run/accel")
    before = set(run.glob("test-*.sock"))
    yield
    for sock in set(run.glob("test-*.sock")) - before:
        sock.unlink(missing_ok=True)
