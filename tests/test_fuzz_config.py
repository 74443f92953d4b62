"""Bad mesh.yaml, fuzzed (issue 7): config.load_text returns a ServiceTable or raises a
ValidationError whose path names the service (by name, or by index when it has no usable
name) and the field -- never another exception; `accel agent --config bad.yaml` says so
and exits 2 having loaded nothing."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accel import config
from accel.model import ServiceTable, ValidationError, check_name

pytestmark = pytest.mark.reliability

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS: Counter = Counter()
REPO = Path(__file__).resolve().parents[1]
# Where a mesh.yaml error can point: the document, a service, the table-wide settings.
TOP = re.compile(r"^(config|services|mesh_cidrs|guard)(\b|\[|\.|$)")
SERVICE_FIELDS = ("name", "vip", "port", "protocol", "endpoints", "edge")
ENDPOINT_FIELDS = ("address", "port", "weight", "healthy")


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


def summary(capsys, layer: str) -> None:
    n = {k[1]: v for k, v in COUNTS.items() if k[0] == layer}
    with capsys.disabled():
        print(f"\n[fuzz] {layer}: {sum(n.values())} inputs "
              f"({n.get('rejected', 0)} rejected, {n.get('accepted', 0)} accepted)")


def load(text: str, layer: str) -> ServiceTable | ValidationError:
    try:
        table = config.load_text(text)
    except ValidationError as e:
        COUNTS[layer, "rejected"] += 1
        assert e.path and TOP.match(e.path), f"path {e.path!r} names nothing: {e}"
        assert str(e).startswith(e.path) and e.reason
        str(e).encode()  # sendable: valid Unicode, whatever the input held
        m = re.match(r"^services\[([^\]]*)\]", e.path)
        if m:  # a service is named by a valid name or by its index
            label = m.group(1)
            if not label.isdigit():
                check_name(label, "")
        return e
    COUNTS[layer, "accepted"] += 1
    assert isinstance(table, ServiceTable)
    # Whatever was accepted survives its own round trip.
    assert config.load_text(config.dump(table)).canonical() == table.canonical()
    return table


# --------------------------------------------------------------------------- random documents

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-1, 70000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["10.0.0.1", "fd00::1", "10.0.0.0/8", "TCP", "UDP", "tcp", "", " ",
                     "::ffff:10.0.0.1", "fe80::1%eth0", "0.0.0.0", "services", "name"]))
keys = st.one_of(st.sampled_from(sorted({*SERVICE_FIELDS, *ENDPOINT_FIELDS, "services",
                                         "mesh_cidrs", "guard", "deny", "syn_rate",
                                         "syn_burst"})), st.text(max_size=8))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=25)


def test_random_documents(capsys) -> None:
    layer = "mesh.yaml (random documents)"

    @fuzz(400)
    @given(doc=st.one_of(documents, st.fixed_dictionaries(
        {"services": st.lists(st.dictionaries(keys, documents, max_size=6), max_size=3)})))
    def check(doc) -> None:
        load(yaml.safe_dump(doc, allow_unicode=True), layer)

    @fuzz(300)
    @given(text=st.text(max_size=200))
    def check_text(text) -> None:
        load(text, layer)

    check()
    check_text()
    summary(capsys, layer)


# --------------------------------------------------------------------------- mutated valid configs

names = st.from_regex(r"[a-z][a-z0-9.-]{0,15}", fullmatch=True)


@st.composite
def valid_docs(draw) -> dict:
    services = []
    for i, name in enumerate(draw(st.lists(names, min_size=1, max_size=4, unique=True))):
        v6 = draw(st.booleans())
        svc = {"name": name, "vip": f"fd00:96::{i + 1:x}" if v6 else f"10.96.0.{i + 1}",
               "port": draw(st.integers(1, 65535))}
        if draw(st.booleans()):
            svc["protocol"] = draw(st.sampled_from(["TCP", "UDP", "tcp", "udp"]))
        if draw(st.booleans()):
            svc["edge"] = draw(st.booleans())
        svc["endpoints"] = [
            {"address": f"fd00:200::{i + 1:x}:{j + 1:x}" if draw(st.booleans())
             else f"10.200.{i}.{j + 1}", "port": draw(st.integers(1, 65535)),
             **({"weight": draw(st.integers(1, 65535))} if draw(st.booleans()) else {}),
             **({"healthy": draw(st.booleans())} if draw(st.booleans()) else {})}
            for j in range(draw(st.integers(0, 3)))]
        services.append(svc)
    doc: dict = {"services": services}
    if draw(st.booleans()):
        doc["mesh_cidrs"] = ["10.200.0.0/16", "fd00:200::/32"]
    if draw(st.booleans()):
        doc["guard"] = {"deny": ["192.0.2.0/24"], "syn_rate": 100, "syn_burst": 200}
    return doc


BAD_VALUES = {
    "name": ["", " ", None, 7, True, [], {}, "n" * 254, "n" * 65536, "a\ud800"],
    "vip": ["", "10.0.0.256", "1.2.3.4.5", "fd00::1::1", "example.com", 167772161, None, [],
            "fe80::1%eth0", "10.0.0.1/32", "::ffff:10.0.0.300", "x" * 65536],
    "port": [0, 65536, -1, 2**32, 2**64, "80", 80.0, 80.5, None, True, [], "http"],
    "protocol": ["SCTP", "", 6, None, ["TCP"], "T CP", "ICMP"],
    "endpoints": ["10.0.0.1", 5, {"address": "10.0.0.1"}, [None], [[]], [1], True],
    "edge": ["yes", 1, "true", None, []],
    "address": ["", "10.0.0.256", "host", None, 5, [], "fe80::2%1", "10.0.0.1:80"],
    "weight": [0, -1, 65536, 2**40, 1.5, "1", True, None],
    "healthy": ["yes", 0, 1, "false", []],
}
# Optional fields, where None may mean "not set".
OPTIONAL = {"protocol", "endpoints", "edge", "weight", "healthy"}


def service_label(doc: dict, i: int) -> str:
    """How an error names services[i]: by its name if that is a valid one, else by index."""
    svc = doc["services"][i]
    try:
        return check_name(svc.get("name"), "") if isinstance(svc, dict) else str(i)
    except ValidationError:
        return str(i)


@st.composite
def mutated(draw) -> tuple[dict, str | None]:
    """A valid document with one thing broken, and the path prefix its error must have
    (None: the result may be valid)."""
    doc = draw(valid_docs())
    services = doc["services"]
    i = draw(st.integers(0, len(services) - 1))
    svc = services[i]
    how = draw(st.sampled_from(["service field", "endpoint field", "drop required",
                                "unknown field", "duplicate name", "duplicate vip",
                                "own vip", "other vip", "not a mapping", "top level",
                                "duplicate endpoint"]))
    if how == "endpoint field" and not svc["endpoints"]:
        how = "service field"
    if how == "service field":
        f = draw(st.sampled_from(sorted(BAD_VALUES.keys() & set(SERVICE_FIELDS))))
        v = draw(st.sampled_from(BAD_VALUES[f]))
        svc[f] = v
        if v is None and f in OPTIONAL:
            return doc, None
        return doc, rf"services\[{re.escape(service_label(doc, i))}\]\.{f}\b"
    if how == "endpoint field":
        j = draw(st.integers(0, len(svc["endpoints"]) - 1))
        f = draw(st.sampled_from(ENDPOINT_FIELDS))
        v = draw(st.sampled_from(BAD_VALUES[f]))
        svc["endpoints"][j][f] = v
        if v is None and f in OPTIONAL:
            return doc, None
        return doc, rf"services\[{re.escape(service_label(doc, i))}\]\.endpoints\[{j}\]\.{f}\b"
    if how == "drop required":
        f = draw(st.sampled_from(["name", "vip", "port"]))
        del svc[f]
        return doc, rf"services\[{re.escape(service_label(doc, i))}\]\.{f}: missing required"
    if how == "unknown field":
        where = draw(st.sampled_from(["service", "endpoint", "top", "guard"]))
        k = draw(st.sampled_from(["tls", "Name", "endpoint", "vips", "", "1", "weight "]))
        if where == "endpoint" and svc["endpoints"]:
            svc["endpoints"][0][k] = 1
            return doc, rf"services\[{re.escape(service_label(doc, i))}\]\.endpoints\[0\]: " \
                "unknown field"
        if where == "top":
            doc[k] = 1
            return doc, r"config: unknown field"
        if where == "guard":
            doc.setdefault("guard", {})[k] = 1
            return doc, r"guard: unknown field"
        svc[k] = 1
        return doc, rf"services\[{re.escape(service_label(doc, i))}\]: unknown field"
    if how == "duplicate name":
        dup = dict(svc, vip="10.96.9.9", endpoints=[])
        services.append(dup)
        return doc, rf"services\[{re.escape(svc['name'])}\]: duplicate service name"
    if how == "duplicate vip":
        vip = svc["vip"]
        if "." in vip and draw(st.booleans()):
            vip = f"::ffff:{vip}"  # the same key in the kernel
        services.append(dict(svc, name="dup-vip", vip=vip, endpoints=[]))
        return doc, r"services\[dup-vip\]: .* is already used by service"
    if how == "own vip":
        svc["endpoints"].append({"address": svc["vip"], "port": svc["port"]})
        return doc, rf"services\[{re.escape(svc['name'])}\]\.endpoints\[\d+\]: an endpoint " \
            "may not be its own VIP:port"
    if how == "other vip":
        other = {"name": "other-svc", "vip": "10.96.8.8", "port": 80,
                 "protocol": svc.get("protocol", "TCP"),
                 "endpoints": [{"address": svc["vip"], "port": svc["port"]}]}
        services.append(other)
        if draw(st.booleans()):  # and back: a loop
            svc["endpoints"].append({"address": "10.96.8.8", "port": 80})
        first = svc["name"] if len(svc["endpoints"]) and \
            svc["endpoints"][-1]["address"] == "10.96.8.8" else "other-svc"
        return doc, rf"services\[{re.escape(first)}\]\.endpoints\[\d+\]: .* is the VIP:port " \
            "of service"
    if how == "duplicate endpoint":
        if not svc["endpoints"]:
            svc["endpoints"].append({"address": "10.201.0.1", "port": 1})
        svc["endpoints"].append(dict(svc["endpoints"][0]))
        return doc, rf"services\[{re.escape(svc['name'])}\]\.endpoints\[\d+\]: duplicate endpoint"
    if how == "not a mapping":
        services[i] = draw(st.sampled_from([None, "svc", 5, [svc], True]))
        return doc, rf"services\[{i}\]: expected a mapping"
    key, value, path = draw(st.sampled_from([
        ("services", {"a": 1}, r"services: expected a list"),
        ("services", "x", r"services: expected a list"),
        ("mesh_cidrs", "10.0.0.0/8", r"mesh_cidrs: expected a list"),
        ("mesh_cidrs", ["10.0.0.0/33"], r"mesh_cidrs\[0\]: "),
        ("mesh_cidrs", [None], r"mesh_cidrs\[0\]: "),
        ("guard", {"deny": ["nope"]}, r"guard\.deny\[0\]: "),
        ("guard", {"deny": "10.0.0.0/8"}, r"guard\.deny: "),
        ("guard", {"syn_rate": -5}, r"guard\.syn_rate: "),
        ("guard", {"syn_rate": 100, "syn_burst": 0}, r"guard\.syn_burst: "),
        ("guard", {"syn_rate": 10**12}, r"guard\.syn_rate: "),
        ("guard", [1], r"guard: expected a mapping"),
    ]))
    doc[key] = value
    return doc, path


def test_mutated_configs(capsys) -> None:
    layer = "mesh.yaml (mutated valid configs)"

    @fuzz(450)
    @given(case=mutated())
    def check(case) -> None:
        doc, expect = case
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
        out = load(text, layer)
        if expect is None:
            return
        assert isinstance(out, ValidationError), f"accepted, expected /{expect}/:\n{text[:500]}"
        assert re.match(expect, str(out)), f"expected /{expect}/, got: {str(out)[:300]}"

    @fuzz(200)
    @given(doc=valid_docs(), data=st.data())
    def check_text_damage(doc, data) -> None:
        """Character-level damage to a valid file: deletions, insertions, replacements."""
        text = list(yaml.safe_dump(doc, sort_keys=False))
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(text) - 1))
            op = data.draw(st.sampled_from(["del", "ins", "rep"]))
            ch = data.draw(st.sampled_from(list(":-[]{}&*!|>'\"#%@`,? \n\t0a.") + ["\x00"]))
            if op == "del":
                del text[at]
            elif op == "ins":
                text.insert(at, ch)
            else:
                text[at] = ch
        load("".join(text), layer)

    check()
    check_text_damage()
    summary(capsys, layer)


# --------------------------------------------------------------------------- extremes

EXTREMES = {
    "deep lists": ("[" * 5000 + "]" * 5000, r"^config: nested too deeply"),
    "deep mappings": ("{x: " * 3000 + "1" + "}" * 3000, r"^config: nested too"),
    "deep inside a service": ("services:\n  - name: a\n    vip: " + "[" * 3000 + "]" * 3000,
                              r"^config: nested too deeply"),
    "alias bomb": ("a: &a [1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\n"
                   "c: &c [*b,*b,*b,*b,*b,*b,*b,*b]\nservices: [*c]\n", r"^config: unknown"),
    "aliased services": ("x: &s {name: a, vip: 10.0.0.1, port: 80}\nservices: [*s, *s]",
                         r"^config: unknown field\(s\) x"),
    "python tag": ("!!python/object/apply:os.system ['true']", r"^config: not valid YAML"),
    "binary vip": ("services: [{name: a, vip: !!binary aGVsbG8=, port: 80}]",
                   r"^services\[a\]\.vip: "),
    "date vip": ("services: [{name: a, vip: 2024-01-01, port: 80}]", r"^services\[a\]\.vip: "),
    "lone surrogate name": ('services: [{name: "a\\ud800", vip: 10.0.0.1, port: 80}]',
                            r"^services\[0\]\.name: .* is not valid Unicode"),
    "64 KiB name": (f"services: [{{name: {'n' * 65536}, vip: 10.0.0.1, port: 80}}]",
                    r"^services\[0\]\.name: name is longer than 253"),
    "NUL bytes": ("services: [{name: a\x00, vip: 10.0.0.1, port: 80}]", r"^config: not valid"),
    "two documents": ("services: []\n---\nservices: []\n", r"^config: not valid YAML"),
    "tabs": ("services:\n\t- name: a", r"^config: not valid YAML"),
    "endpoint loop": ("services:\n- {name: a, vip: 10.0.0.1, port: 80, endpoints: "
                      "[{address: 10.0.0.2, port: 80}]}\n- {name: b, vip: 10.0.0.2, port: 80, "
                      "endpoints: [{address: 10.0.0.1, port: 80}]}",
                      r"^services\[a\]\.endpoints\[0\]: 10\.0\.0\.2:80 is the VIP:port of "
                      r"service 'b'"),
    "v4-mapped duplicate VIP": ("services:\n- {name: a, vip: 10.0.0.1, port: 80}\n"
                                "- {name: b, vip: '::ffff:10.0.0.1', port: 80}",
                                r"^services\[b\]: 10\.0\.0\.1:80/TCP is already used by service"),
    "zoned VIP": ("services: [{name: a, vip: 'fe80::1%eth0', port: 80}]",
                  r"^services\[a\]\.vip: fe80::1%eth0 has a zone"),
}


@pytest.mark.parametrize("name", sorted(EXTREMES))
def test_extremes(name) -> None:
    text, expect = EXTREMES[name]
    out = load(text, "mesh.yaml (extremes)")
    assert isinstance(out, ValidationError), out
    assert re.match(expect, str(out)), str(out)[:300]


def test_big_valid_file() -> None:
    """A big file is a table, not an error."""
    doc = {"services": [{"name": f"s{i}", "vip": f"10.96.{i // 250}.{i % 250 + 1}", "port": 80,
                         "endpoints": [{"address": f"10.200.{i // 250}.{i % 250 + 1}",
                                        "port": 8080}]} for i in range(2_000)]}
    table = config.load_text(yaml.safe_dump(doc))
    COUNTS["mesh.yaml (extremes)", "accepted"] += 1
    assert len(table.services) == 2_000


def test_extremes_summary(capsys) -> None:
    summary(capsys, "mesh.yaml (extremes)")


# --------------------------------------------------------------------------- the CLI

CLI_CASES = {
    "deep": ("[" * 5000 + "]" * 5000, "config: nested too deeply"),
    "loop": (EXTREMES["endpoint loop"][0], "services[a].endpoints[0]: 10.0.0.2:80 is the "
             "VIP:port of service 'b'"),
}


@pytest.mark.kernel  # a cgroup of its own, and what is attached to it read back
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_agent_refuses_a_bad_file(tmp_path, case) -> None:
    from accel.datapath import cgroup as cg
    from accel.datapath.datapath import CGROUP_PROGRAMS, lock_file, state_file
    from accel.kernel import bpf as bpfsys

    text, needle = CLI_CASES[case]
    uid = secrets.token_hex(3)
    cgroup = cg.cgroup2_mount() / f"accel-hf-{uid}"
    pin_dir = f"/sys/fs/bpf/hf-{uid}"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    cgroup.mkdir()
    try:
        r = subprocess.run([sys.executable, "-m", "accel.cli", "agent", "--config", str(cfg),
                            "--pin-dir", pin_dir, "--cgroup", str(cgroup), "--api-socket", ""],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        COUNTS["cli", "rejected" if r.returncode == 2 else "accepted"] += 1
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not os.path.exists(pin_dir) and not state_file(pin_dir).exists()
        fd = cg.open_dir(cgroup)
        try:
            assert not [p for t in {t for _, _, t in CGROUP_PROGRAMS}
                        for p in bpfsys.prog_query(fd, t)]
        finally:
            os.close(fd)
    finally:
        cgroup.rmdir()
        shutil.rmtree(pin_dir, ignore_errors=True)
        lock_file(pin_dir).unlink(missing_ok=True)
