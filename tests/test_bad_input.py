"""Bad input found by adversarial testing (issue 12, item 7): each is refused by the model or
config layer, so that a file, the API and xDS refuse it alike, with a message naming what to
fix; the CLI exits 2 having loaded nothing. Also: non-root `accel status` says permission
denied, and `accel uninstall` removes the API socket a SIGKILLed agent left.

No kernel work here: the agent's datapath is replaced by one that fails the test if built."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from accel import cli, config
from accel.api import convert
from accel.api.gen import agent_pb2 as pb
from accel.model import Endpoint, Service, ValidationError
from accel.xds import translate as tr
from accel.xds.shapes.builders import cla, eds_cluster, lbe, locality, tcp_listener

REPO = Path(__file__).resolve().parents[1]
GOOD = "services:\n- name: a\n  vip: 10.96.0.1\n  port: 80\n  endpoints:\n" \
       "  - {address: 10.0.0.1, port: 8080}\n"


def error(text: str) -> str:
    with pytest.raises(ValidationError) as e:
        config.load_text(text)
    return str(e.value)


class NoDatapath:
    """Stands in for Datapath in `accel agent`: bad input must be refused before one exists."""

    built = 0

    def __init__(self, *a, **kw) -> None:
        type(self).built += 1
        raise AssertionError("the datapath was built before the input was checked")


@pytest.fixture
def agent_cli(monkeypatch, capsys):
    """`accel agent ...` in this process: (exit code, stderr, whether a datapath was built)."""
    from accel.datapath import datapath

    monkeypatch.setattr(datapath, "Datapath", NoDatapath)
    NoDatapath.built = 0

    def run(*args: str) -> tuple[int, str, bool]:
        code = cli.main(["agent", *args, "--api-socket", "", "--pin-dir", "/nonexistent-wtin"])
        return code, capsys.readouterr().err, NoDatapath.built > 0

    return run


# --------------------------------------------------------------------------- VIPs

BAD_VIPS = {
    "0.0.0.0": "the unspecified address",
    "::": "the unspecified address",
    "::ffff:0.0.0.0": "the unspecified address",
    "255.255.255.255": "the broadcast address",
    "127.0.0.1": "a loopback address",
    "127.1.2.3": "a loopback address",
    "::1": "a loopback address",
    "::ffff:127.0.0.1": "a loopback address",
    "224.0.0.1": "a multicast address",
    "239.1.1.1": "a multicast address",
    "ff02::1": "a multicast address",
}


@pytest.mark.parametrize("vip", sorted(BAD_VIPS))
def test_vip_that_no_client_dials_is_refused_everywhere(vip) -> None:
    why = BAD_VIPS[vip]
    # mesh.yaml
    msg = error(f"services: [{{name: a, vip: '{vip}', port: 22}}]")
    assert msg.startswith("services[a].vip: ") and "cannot be a service VIP" in msg, msg
    assert why in msg, msg
    # the model, which the API and xDS build on
    with pytest.raises(ValidationError, match="cannot be a service VIP"):
        Service("a", vip, 22)
    # the API's table message: INVALID_ARGUMENT with this path
    with pytest.raises(ValidationError) as e:
        convert.table_from_proto(pb.ServiceTable(services=[pb.Service(name="a", vip=vip,
                                                                      port=22)]))
    assert str(e.value).startswith("table.services[a].vip: ") and why in str(e.value)
    # xDS: a listener on such an address is valid Envoy config (Kuma's and Consul's explicit
    # upstreams listen on 127.0.0.1:PORT in the app's pod): no NACK, no service, left to
    # the kernel path with the reason; the unspecified address is a wildcard listener
    # (Istio's 0.0.0.0_PORT), whose VIPs come from its routes.
    res = tr.Resources({"l": tcp_listener("l", vip, 22, "c")}, {}, {"c": eds_cluster("c")},
                       {"c": cla("c", locality(lbe("10.0.0.1", 8080)))})
    t = tr.to_table(res)
    assert not t.table.services and "l" not in t.left
    if vip in ("0.0.0.0", "::"):  # (::ffff:0.0.0.0 is no wildcard: a bad VIP)
        assert "wildcard" in t.skipped["l"]
        return
    assert "cannot be a service VIP" in t.skipped["l"] and why in t.skipped["l"]


def test_ordinary_vips_and_loopback_endpoints_still_work() -> None:
    for vip in ("10.96.0.1", "fd00:96::1", "192.168.1.255", "::ffff:10.96.0.2"):
        Service("a", vip, 80, endpoints=(Endpoint("127.0.0.1", 8080),))


# --------------------------------------------------------------------------- names

BAD_NAMES = {
    "ESC": ("a\x1b[2Jb", "U+001B (a control character)"),
    "BEL": ("a\x07", "U+0007 (a control character)"),
    "newline": ("a\nb", "U+000A (a control character)"),
    "DEL": ("a\x7f", "U+007F (a control character)"),
    "C1 CSI": ("a\x9bb", "U+009B (a control character)"),
    "right-to-left override": ("abc\u202etxt.exe", "U+202E (an invisible formatting"),
    "right-to-left isolate": ("a\u2067b", "U+2067 (an invisible formatting"),
    "zero-width space": ("a\u200bb", "U+200B (an invisible formatting"),
    "BOM": ("\ufeffa", "U+FEFF (an invisible formatting"),
    "line separator": ("a\u2028b", "U+2028 (a line separator)"),
}


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_control_and_bidi_characters_in_names_are_refused(case) -> None:
    name, what = BAD_NAMES[case]
    with pytest.raises(ValidationError) as e:
        Service(name, "10.96.0.1", 80)
    assert e.value.path == "name" and what in e.value.reason, e.value
    assert "\x1b" not in str(e.value) and "\u202e" not in str(e.value)  # shown escaped
    # In mesh.yaml (double-quoted, so that YAML carries the character), named by index.
    quoted = name.encode("unicode_escape").decode().replace('"', '\\"')
    msg = error(f'services: [{{name: "{quoted}", vip: 10.96.0.1, port: 80}}]')
    assert msg.startswith("services[0].name: ") and what in msg, msg
    # Over the API too.
    with pytest.raises(ValidationError, match="names must be printable"):
        convert.table_from_proto(pb.ServiceTable(services=[pb.Service(
            name=name, vip="10.96.0.1", port=80)]))


def test_letters_of_any_script_are_still_names() -> None:
    for name in ("café", "сервис", "服务", "a b", "a_b.c-d"):
        Service(name, "10.96.0.1", 80)


def test_accel_services_escapes_what_the_agent_holds(monkeypatch, capsys) -> None:
    """An older agent (or one fed before this check) may hold such a name: shown escaped."""
    from accel.api import client
    from accel.commands import services

    evil = "ok\x1b]0;owned\x07\x1b[2J\u202etxt"
    monkeypatch.setattr(client, "list_services", lambda _sock: {
        "config_version": "v\x1b[31m1", "services": [{
            "name": evil, "vip": "10.96.0.1", "port": 80, "protocol": "TCP", "edge": False,
            "fastpath": "route", "endpoints": [{"address": "10.0.0.1", "port": 8080,
                                                "weight": 1, "healthy": True}]}]})
    assert services.run(argparse.Namespace(json=False, api_socket=None)) == 0
    out = capsys.readouterr().out
    assert not [c for c in out if not (c.isprintable() or c == "\n")], repr(out)
    assert "ok\\x1b]0;owned\\x07\\x1b[2J\\u202etxt" in out and "v\\x1b[31m1" in out


# --------------------------------------------------------------------------- YAML

def test_duplicate_keys_are_refused_with_their_line() -> None:
    msg = error("services:\n- name: a\n  vip: 10.96.0.1\n  port: 80\n  vip: 10.96.0.2\n")
    assert msg.startswith("config: duplicate key 'vip' at line 5, column 3 (first at line 3, "
                          "column 3)"), msg
    msg = error("services: []\nguard: {syn_rate: 5}\nservices: []\n")
    assert msg.startswith("config: duplicate key 'services' at line 3"), msg
    msg = error("services: [{name: a, vip: 10.96.0.1, port: 80, endpoints: "
                "[{address: 10.0.0.1, port: 1, port: 2}]}]")
    assert msg.startswith("config: duplicate key 'port' at line 1"), msg
    # The same key in different mappings is no duplicate; a merge key's keys may be overridden.
    t = config.load_text("services:\n- {name: a, vip: 10.96.0.1, port: 80}\n"
                         "- {<<: {vip: 10.96.0.9, port: 1}, name: b, port: 81}\n")
    assert [(str(s.vip), s.port) for s in t.services] == [("10.96.0.1", 80), ("10.96.0.9", 81)]


def test_binary_file_is_a_clear_error(tmp_path, agent_cli) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_bytes(b"services: []\n# \x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ValidationError) as e:
        config.load(f)
    assert str(e.value).startswith(f"{f}: not UTF-8 text: byte 0x89 at offset 15"), e.value
    code, err, built = agent_cli("--config", str(f))
    assert code == 2 and "not UTF-8 text" in err and "Traceback" not in err, err
    assert not built


def test_binary_file_through_the_real_cli(tmp_path) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_bytes(bytes(range(256)))
    r = subprocess.run([sys.executable, "-m", "accel.cli", "agent", "--config", str(f),
                        "--api-socket", "", "--pin-dir", str(tmp_path / "pins-wtin")],
                       capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "not UTF-8 text" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "pins-wtin").exists()


# --------------------------------------------------------------------------- size

def test_oversized_file_is_refused_before_parsing(tmp_path, agent_cli) -> None:
    f = tmp_path / "mesh.yaml"
    # Valid YAML that would take long to parse: one flow mapping per line, past the limit.
    line = "- {name: s%07d, vip: 10.96.0.1, port: 80}\n"
    n = config.MAX_CONFIG_BYTES // len(line % 0) + 1
    with open(f, "w") as out:
        out.write("services:\n")
        out.writelines(line % i for i in range(n))
    size = f.stat().st_size
    start = time.process_time()
    with pytest.raises(ValidationError) as e:
        config.load(f)
    assert time.process_time() - start < 1.0  # not parsed: no 2 minutes, no 2 GB
    msg = str(e.value)
    assert msg.startswith(f"{f}: {size:,} bytes is over the limit of "
                          f"{config.MAX_CONFIG_BYTES:,} bytes (8 MiB)"), msg
    assert "ACCEL_MAX_CONFIG_BYTES" in msg and "split" in msg
    code, err, built = agent_cli("--config", str(f))
    assert code == 2 and "over the limit" in err and not built, err


def test_size_limit_is_the_same_for_api_text_and_can_be_raised(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ACCEL_MAX_CONFIG_BYTES", str(len(GOOD) - 1))
    assert error(GOOD).startswith(f"config: {len(GOOD)} bytes is over the limit of "
                                  f"{len(GOOD) - 1} bytes")
    f = tmp_path / "mesh.yaml"
    f.write_text(GOOD)
    with pytest.raises(ValidationError, match="over the limit"):
        config.load(f)
    with pytest.raises(ValidationError, match="over the limit"):  # no size: read, not stat'ed
        config.load(_fifo_with(tmp_path, GOOD))
    monkeypatch.setenv("ACCEL_MAX_CONFIG_BYTES", str(len(GOOD)))
    assert len(config.load(f).services) == 1 and len(config.load_text(GOOD).services) == 1
    monkeypatch.setenv("ACCEL_MAX_CONFIG_BYTES", "lots")
    assert error(GOOD).startswith("ACCEL_MAX_CONFIG_BYTES: 'lots': expected a size in bytes")


def _fifo_with(tmp_path: Path, text: str) -> str:
    import threading

    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)

    def feed() -> None:
        with open(path, "w") as w:
            w.write(text)

    threading.Thread(target=feed, daemon=True).start()
    return str(path)


# --------------------------------------------------------------------------- capacity

def test_check_fits_counts_as_the_maps_do() -> None:
    from accel.datapath.datapath import Capacities

    t = config.load_text("services:\n" + "".join(
        f"- {{name: s{i}, vip: 10.96.0.{i + 1}, port: 80, endpoints: [{{address: 10.0.0.1, "
        f"port: 80, weight: 1}}, {{address: 10.0.{i}.2, port: 80, weight: 2}}]}}\n"
        for i in range(3)))
    config.check_fits(t, Capacities(services=3, slots=9, mesh_nets=4))
    with pytest.raises(ValidationError, match=r"^services: 3 services exceed the capacity of "
                       r"2 \(--capacity services=N\)"):
        config.check_fits(t, Capacities(services=2))
    with pytest.raises(ValidationError, match=r"^services: 9 endpoint slots exceed the "
                       r"capacity of 8 \(--capacity slots=N\)"):
        config.check_fits(t, Capacities(slots=8))
    with pytest.raises(ValidationError, match=r"^services: 4 mesh addresses exceed the "
                       r"capacity of 3 \(--capacity mesh_nets=N\)"):
        config.check_fits(t, Capacities(mesh_nets=3))


def test_agent_checks_capacity_before_loading_the_datapath(tmp_path, agent_cli) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text("services:\n" + "".join(f"- {{name: s{i}, vip: 10.96.0.{i + 1}, port: 80}}\n"
                                         for i in range(5)))
    code, err, built = agent_cli("--config", str(f), "--capacity", "services=4")
    assert code == 2 and "5 services exceed the capacity of 4 (--capacity services=N)" in err
    assert not built, "the datapath was started before the capacity check"


def test_agent_refuses_each_bad_input_before_loading(tmp_path, agent_cli) -> None:
    for text, needle in [
        ("services: [{name: a, vip: 127.0.0.1, port: 22}]", "services[a].vip: 127.0.0.1 "
         "cannot be a service VIP"),
        ("services: [{name: a, vip: 10.96.0.1, port: 80, port: 81}]", "duplicate key 'port'"),
        ('services: [{name: "a\\e[2J", vip: 10.96.0.1, port: 80}]', "U+001B"),
    ]:
        f = tmp_path / "mesh.yaml"
        f.write_text(text)
        code, err, built = agent_cli("--config", str(f))
        assert code == 2 and needle in err and not built, err


# --------------------------------------------------------------------------- non-root status

def _as_nobody(installed: tuple[Path, Path], *args: str) -> subprocess.CompletedProcess:
    """`accel ARGS` as an unprivileged user, from the installed package (a checkout under a
    private directory, as /tmp can be, is not readable to that user)."""
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv")
    _, venv = installed
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           str(venv / "bin" / "accel"), *args],
                          capture_output=True, text=True, timeout=60, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "HOME": "/"})


def _listening(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    os.chmod(path, 0o600)
    return s


@pytest.mark.parametrize("where", ["root-only directory", "open directory"])
def test_non_root_status_says_permission_denied(where, installed_package) -> None:
    d = tempfile.mkdtemp(prefix="accel-wtin-")
    os.chmod(d, 0o700 if where == "root-only directory" else 0o755)  # as /run/accel, or not
    path = os.path.join(d, "agent.sock")
    s = _listening(path)
    try:
        for cmd in ("status", "services"):
            r = _as_nobody(installed_package, cmd, "--api-socket", path)
            assert r.returncode == 1, r.stderr
            assert f"permission denied on {path}: run as root" in r.stderr, r.stderr
            assert "running" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        s.close()
        shutil.rmtree(d)


# --------------------------------------------------------------------------- uninstall

@pytest.fixture
def uninstall_env():
    d = tempfile.mkdtemp(prefix="accel-wtin-")
    pin_dir = os.path.join(d, "pins")
    os.mkdir(pin_dir)
    yield d, pin_dir
    shutil.rmtree(d, ignore_errors=True)


def uninstall(pin_dir: str, sock: str) -> subprocess.CompletedProcess:
    # The agent's run dir (state, locks) beside the pins: no root needed, nothing shared.
    run_dir = os.path.join(os.path.dirname(pin_dir), "run")
    return subprocess.run([sys.executable, "-m", "accel.cli", "uninstall", "--pin-dir", pin_dir,
                           "--api-socket", sock], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO),
                                         "ACCEL_RUN_DIR": run_dir})


def test_uninstall_removes_the_socket_a_killed_agent_left(uninstall_env) -> None:
    d, pin_dir = uninstall_env
    sock = os.path.join(d, "agent.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock)  # as a SIGKILLed agent leaves it: bound, nobody listening
    stale.close()
    r = uninstall(pin_dir, sock)
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(sock), r.stdout
    assert f"API socket {sock} removed" in r.stdout and not os.path.exists(pin_dir)
    r = uninstall(pin_dir, sock)  # again: nothing left, still fine
    assert r.returncode == 0 and f"API socket {sock} absent" in r.stdout, r.stdout + r.stderr


def test_uninstall_never_removes_a_live_socket_or_another_file(uninstall_env) -> None:
    d, pin_dir = uninstall_env
    sock = os.path.join(d, "agent.sock")
    live = _listening(sock)  # an agent (of another pin dir) serving here
    try:
        r = uninstall(pin_dir, sock)
        assert r.returncode == 0, r.stderr
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert f"API socket {sock} left (an agent listens on it)" in r.stdout, r.stdout
    finally:
        live.close()
    os.unlink(sock)
    Path(sock).write_text("not a socket")
    r = uninstall(pin_dir, sock)
    assert r.returncode == 0 and Path(sock).read_text() == "not a socket"
    assert "left (not a socket)" in r.stdout, r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--xds", "127.0.0.1:1", "--node-meta", "NOVALUE"], "expected KEY=VALUE"),
    (["--xds", "127.0.0.1:1", "--node-meta", "=x"], "expected KEY=VALUE"),
    (["--xds", "127.0.0.1:1", "--node-meta", "LABELS={bad"], "LABELS: not JSON"),
    (["--config", "examples/mesh.yaml", "--node-meta", "A=b"], "go with --xds"),
])
def test_agent_refuses_bad_node_identity(args, needle) -> None:
    r = subprocess.run([sys.executable, "-m", "accel.cli", "agent", *args, "--api-socket", "",
                        "--pin-dir", "/nonexistent/accel-never"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
