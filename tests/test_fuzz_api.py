"""Bad API requests, fuzzed (issue 7), against a real `accel agent`: ApplyConfig and SetGuard
answer INVALID_ARGUMENT with the offending field's path first in the details, and
ListServices, GetStatus (version, counts, map fill) are unchanged afterwards; valid requests
among them are accepted."""

from __future__ import annotations

import ipaddress
import re
import tempfile
from collections import Counter
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from accel.api.gen import agent_pb2 as pb
from accel.api.gen import agent_pb2_grpc as pb_grpc
from accel.api.server import MAX_MESSAGE
from accel.datapath import cgroup as cg
from tests import api_harness
from tests.api_harness import REPO, Env

pytestmark = [pytest.mark.kernel, pytest.mark.reliability]

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS: Counter = Counter()
INVALID = grpc.StatusCode.INVALID_ARGUMENT
U32 = 2**32 - 1


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


def summary(capsys, layer: str) -> None:
    n = {k[1]: v for k, v in COUNTS.items() if k[0] == layer}
    with capsys.disabled():
        print(f"\n[fuzz] {layer}: {sum(n.values())} requests "
              f"({n.get('rejected', 0)} rejected, {n.get('accepted', 0)} accepted)")


def free_port() -> int:
    return api_harness.free_port(range(18600, 18700))


class HfEnv(Env):
    """api_harness.Env under this helper's names: accel-hf-* cgroup, /sys/fs/bpf/hf-* pins,
    /run/accel/hf-*.sock, a metrics port in 18600-18699."""

    def __post_init__(self) -> None:
        self.cgroup = cg.cgroup2_mount() / f"accel-hf-{self.uid}"
        self.pin_dir = f"/sys/fs/bpf/hf-{self.uid}"
        self.socket = f"/run/accel/hf-{self.uid}.sock"
        self.metrics_port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"hf-{self.uid}-"))
        self.cgroup.mkdir()
        self.agents = []
        self.before = cg.process_cgroup()


@pytest.fixture(scope="module")
def stub():
    env = HfEnv()
    try:
        env.agent(REPO / "examples" / "mesh.yaml")
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE)]
        yield pb_grpc.AgentStub(grpc.insecure_channel(f"unix:{env.socket}", options=opts))
    finally:
        env.cleanup()


def snapshot(s: pb_grpc.AgentStub) -> tuple:
    listed = s.ListServices(pb.ListServicesRequest(), timeout=10)
    st_ = s.GetStatus(pb.GetStatusRequest(), timeout=10)
    return (listed, st_.config_version, st_.services, st_.applied,
            {k: (v.used, v.capacity) for k, v in st_.maps.items() if k != "sockets"})


def call(rpc, req, layer: str, expect: str | None) -> object:
    """`expect`: the field path the details must start with; None: may be valid."""
    try:
        out = rpc(req, timeout=30)
    except grpc.RpcError as e:
        COUNTS[layer, "rejected"] += 1
        assert e.code() == INVALID, (e.code(), e.details()[:300])
        d = e.details()
        assert len(d.encode()) < 4096, len(d)  # fits a trailer, whatever the input was
        if expect is not None:
            assert re.match(re.escape(expect) + ": ", d), f"expected {expect!r}: {d[:300]}"
        else:
            assert re.match(r"^(table|mesh_yaml|guard|config)\b", d), d[:300]
        return e
    COUNTS[layer, "accepted"] += 1
    assert expect is None, f"accepted, expected INVALID_ARGUMENT at {expect}"
    return out


# --------------------------------------------------------------------------- ApplyConfig

BAD_ADDRESSES = ["", " ", "1.2.3.4.5", "256.0.0.1", "10.0.0", "fd00::1::2", "gggg::1", ":::",
                 "example.com", "10.0.0.1/32", "[fd00::1]", "fe80::1%eth0", "::ffff:1.2.3.300",
                 "1.2.3.04", "١.٢.٣.٤", "x" * 20000, "é" * 9000]
BAD_PORTS = [0, 65536, 70000, U32]
BAD_WEIGHTS = [0, 65536, U32]


def not_an_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s.strip())
        return False
    except ValueError:
        return True


def not_a_net(s: str) -> bool:
    try:
        ipaddress.ip_network(s.strip(), strict=False)
        return False
    except ValueError:
        return True


bad_address = st.one_of(st.sampled_from(BAD_ADDRESSES), st.text(max_size=30).filter(not_an_ip))


@st.composite
def valid_table(draw) -> pb.ServiceTable:
    t = pb.ServiceTable()
    for i in range(draw(st.integers(1, 3))):
        v6 = draw(st.booleans())
        svc = t.services.add(name=f"f{i}", vip=f"fd00:97::{i + 1:x}" if v6 else f"10.97.0.{i + 1}",
                             port=draw(st.integers(1, 65535)),
                             protocol=draw(st.sampled_from(["", "TCP", "UDP"])),
                             edge=draw(st.booleans()))
        for j in range(draw(st.integers(1, 3))):
            ep = svc.endpoints.add(address=f"10.201.{i}.{j + 1}", port=draw(st.integers(1, 65535)))
            if draw(st.booleans()):
                ep.weight = draw(st.integers(1, 65535))
            if draw(st.booleans()):
                ep.healthy = draw(st.booleans())
    return t


@st.composite
def bad_apply(draw) -> tuple[pb.ApplyConfigRequest, str]:
    """A valid table with one thing wrong, and the path the error must start with."""
    t = draw(valid_table())
    i = draw(st.integers(0, len(t.services) - 1))
    svc = t.services[i]
    at = f"table.services[{svc.name}]"
    ep = svc.endpoints[0]
    how = draw(st.sampled_from(["vip", "port", "protocol", "name", "ep address", "ep port",
                                "ep weight", "dup name", "dup vip", "own vip", "other vip",
                                "dup endpoint", "mesh_cidrs", "guard", "no config",
                                "mesh_yaml"]))
    req = pb.ApplyConfigRequest(version=f"bad-{how}")
    if how == "vip":
        svc.vip = draw(bad_address)
        where = f"{at}.vip"
    elif how == "port":
        svc.port = draw(st.sampled_from(BAD_PORTS))
        where = f"{at}.port"
    elif how == "protocol":
        svc.protocol = draw(st.sampled_from(["SCTP", "tcp ", "ICMP", "ÜDP", "T", "udp6"]))
        where = f"{at}.protocol"
    elif how == "name":
        svc.name = draw(st.sampled_from(["", " ", "\t", "n" * 254, "n" * 65536]))
        where = f"table.services[{i}].name"
    elif how == "ep address":
        ep.address = draw(bad_address)
        where = f"{at}.endpoints[0].address"
    elif how == "ep port":
        ep.port = draw(st.sampled_from(BAD_PORTS))
        where = f"{at}.endpoints[0].port"
    elif how == "ep weight":
        ep.weight = draw(st.sampled_from(BAD_WEIGHTS))
        where = f"{at}.endpoints[0].weight"
    elif how == "dup name":
        t.services.add(name=svc.name, vip="10.97.9.9", port=1)
        where = at
    elif how == "dup vip":
        vip = svc.vip if ":" in svc.vip or draw(st.booleans()) else f"::ffff:{svc.vip}"
        t.services.add(name="dup", vip=vip, port=svc.port, protocol=svc.protocol)
        where = "table.services[dup]"
    elif how == "own vip":
        svc.endpoints.add(address=svc.vip, port=svc.port)
        where = f"{at}.endpoints[{len(svc.endpoints) - 1}]"
    elif how == "other vip":
        t.services.add(name="zz", vip="10.97.8.8", port=80, protocol=svc.protocol,
                       endpoints=[pb.Endpoint(address=svc.vip, port=svc.port)])
        where = "table.services[zz].endpoints[0]"
    elif how == "dup endpoint":
        svc.endpoints.add().CopyFrom(ep)
        where = f"{at}.endpoints[{len(svc.endpoints) - 1}]"
    elif how == "mesh_cidrs":
        bad = draw(st.one_of(st.sampled_from(["10.0.0.0/33", "fd00::/129", "", "10.0.0.1/-1",
                                              "10.0.0.0/8/8", "x" * 20000]),
                             st.text(max_size=20).filter(not_a_net)))
        t.mesh_cidrs.extend(["10.200.0.0/16", bad])
        where = "table.mesh_cidrs[1]"
    elif how == "guard":
        which = draw(st.sampled_from(["deny", "syn_rate", "syn_burst"]))
        if which == "deny":
            t.guard.deny.extend(["192.0.2.0/24", draw(st.text(max_size=20).filter(not_a_net))])
            where = "table.guard.deny[1]"
        elif which == "syn_rate":
            t.guard.syn_rate = draw(st.integers(10_000_001, U32))
            where = "table.guard.syn_rate"
        else:
            t.guard.syn_rate, t.guard.syn_burst = 10, draw(st.integers(100_000_001, U32))
            where = "table.guard.syn_burst"
    elif how == "no config":
        return pb.ApplyConfigRequest(version="bad-empty",
                                     validate_only=draw(st.booleans())), "config"
    else:
        text, where = draw(st.sampled_from([
            ("services: [{name: y, port: 80}]", "mesh_yaml.services[y].vip"),
            ("services: {name: y}", "mesh_yaml.services"),
            ("[" * 3000 + "]" * 3000, "mesh_yaml.config"),
            ("services: [{name: a, vip: 10.0.0.1, port: 80, endpoints: [{address: 10.0.0.2, "
             "port: 80}]}, {name: b, vip: 10.0.0.2, port: 80}]",
             "mesh_yaml.services[a].endpoints[0]"),
            ("services:\n\t- x", "mesh_yaml.config"),
            ('services: [{name: "a\\ud800", vip: 10.0.0.1, port: 80}]',
             "mesh_yaml.services[0].name"),
            ("guard: {deny: [300.0.0.0/8]}", "mesh_yaml.guard.deny[0]"),
        ]))
        req.mesh_yaml = text
        return req, where
    req.table.CopyFrom(t)
    req.validate_only = draw(st.booleans())
    return req, where


@st.composite
def garbage_table(draw) -> pb.ServiceTable:
    """Any values at all in every field the table has."""
    t = pb.ServiceTable(mesh_cidrs=draw(st.lists(st.text(max_size=12), max_size=2)))
    t.guard.deny.extend(draw(st.lists(st.text(max_size=12), max_size=2)))
    t.guard.syn_rate = draw(st.sampled_from([0, 10, 10_000_000, 10_000_001, U32]))
    t.guard.syn_burst = draw(st.sampled_from([0, 1, 100_000_001, U32]))
    for _ in range(draw(st.integers(0, 3))):
        svc = t.services.add(name=draw(st.text(max_size=8)),
                             vip=draw(st.one_of(st.text(max_size=16),
                                                st.sampled_from(["10.97.1.1", "fd00::1"]))),
                             port=draw(st.integers(0, U32)), protocol=draw(st.text(max_size=4)),
                             edge=draw(st.booleans()))
        for _ in range(draw(st.integers(0, 2))):
            ep = svc.endpoints.add(address=draw(st.text(max_size=16)),
                                   port=draw(st.integers(0, U32)))
            if draw(st.booleans()):
                ep.weight = draw(st.integers(0, U32))
            if draw(st.booleans()):
                ep.healthy = draw(st.booleans())
    return t


def test_apply_config_fuzzed(stub, capsys) -> None:
    layer = "API ApplyConfig"
    before = snapshot(stub)

    @fuzz(350)
    @given(case=bad_apply())
    def bad(case) -> None:
        req, where = case
        call(stub.ApplyConfig, req, layer, where)

    @fuzz(200)
    @given(t=garbage_table())
    def garbage(t) -> None:
        # validate_only: the odd garbage table that is valid is checked, never applied
        out = call(stub.ApplyConfig, pb.ApplyConfigRequest(table=t, validate_only=True),
                   layer, None)
        if isinstance(out, pb.ApplyConfigResponse):
            assert not out.applied

    @fuzz(150)
    @given(text=st.text(max_size=120))
    def yaml_text(text) -> None:
        out = call(stub.ApplyConfig, pb.ApplyConfigRequest(mesh_yaml=text, validate_only=True),
                   layer, None)
        if isinstance(out, grpc.RpcError):
            assert out.details().startswith("mesh_yaml"), out.details()[:200]

    bad()
    garbage()
    yaml_text()
    assert snapshot(stub) == before  # nothing changed: table, version, counts, map fill
    summary(capsys, layer)


# --------------------------------------------------------------------------- SetGuard


@st.composite
def bad_guard(draw) -> tuple[pb.SetGuardRequest, str]:
    g = pb.Guard(deny=draw(st.lists(st.sampled_from(["192.0.2.0/24", "2001:db8::/32",
                                                     "10.0.0.1"]), max_size=2)))
    how = draw(st.sampled_from(["deny", "deny", "syn_rate", "syn_burst", "missing"]))
    if how == "deny":
        g.deny.append(draw(st.one_of(
            st.sampled_from(["", "300.1.1.0/24", "10.0.0.0/33", "fd00::/200", "10.0.0.0/8 x",
                             "10.0.0.0//8", "fe80::/10%eth0", "any", "*", "x" * 20000]),
            st.text(max_size=24).filter(not_a_net))))
        where = f"guard.deny[{len(g.deny) - 1}]"
    elif how == "syn_rate":
        g.syn_rate = draw(st.integers(10_000_001, U32))
        where = "guard.syn_rate"
    elif how == "syn_burst":
        g.syn_rate, g.syn_burst = draw(st.integers(1, 10_000_000)), \
            draw(st.integers(100_000_001, U32))
        where = "guard.syn_burst"
    else:
        return pb.SetGuardRequest(), "guard"
    return pb.SetGuardRequest(guard=g), where


def test_set_guard_fuzzed(stub, capsys) -> None:
    layer = "API SetGuard"
    before = snapshot(stub)

    @fuzz(250)
    @given(case=bad_guard())
    def bad(case) -> None:
        req, where = case
        call(stub.SetGuard, req, layer, where)

    bad()
    assert snapshot(stub) == before
    summary(capsys, layer)


# --------------------------------------------------------------------------- and valid ones


def test_valid_requests_are_accepted(stub, capsys) -> None:
    layer = "API valid"
    before = snapshot(stub)
    original = before[0].table

    @fuzz(12)
    @given(t=valid_table(), data=st.data())
    def valid(t, data) -> None:
        # The same shapes as the bad ones, minus the damage: accepted and in force.
        assume(len({(s.vip, s.port, s.protocol or "TCP") for s in t.services})
               == len(t.services))
        version = f"fz-{COUNTS[layer, 'accepted']}"
        out = call(stub.ApplyConfig, pb.ApplyConfigRequest(table=t, version=version), layer,
                   None)
        assert out.applied and out.services == len(t.services)
        listed = stub.ListServices(pb.ListServicesRequest(), timeout=10)
        assert listed.config_version == version
        assert sorted(s.name for s in listed.table.services) == \
            sorted(s.name for s in t.services)
        guard = pb.Guard(deny=data.draw(st.lists(st.sampled_from(
            ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]), max_size=3, unique=True)),
            syn_rate=data.draw(st.integers(0, 10_000_000)))
        r = call(stub.SetGuard, pb.SetGuardRequest(guard=guard), layer, None)
        assert r.guard.syn_rate == guard.syn_rate and len(r.guard.deny) == len(guard.deny)

    valid()
    # Back to where the module started; the table is the same as before the valid ones.
    stub.ApplyConfig(pb.ApplyConfigRequest(table=original, version=before[1]), timeout=30)
    after = snapshot(stub)
    assert after[0] == before[0] and after[4] == before[4]
    summary(capsys, layer)
