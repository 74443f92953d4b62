"""mesh.yaml's identities and `policies:` (Istio AuthorizationPolicy's terms): parsed into
the policy model, errors naming the field (the CLI exits 2), written back, compiled to the
same decisions as the reference; and served as workload API resources that an agent
decodes back into the same table and the same decisions."""

from __future__ import annotations

import ipaddress

import pytest

from accel import config
from accel.model import ValidationError
from accel.policy.from_table import verdicts_of
from accel.policy.rules import Action, Scope, Selector, StringMatch
from accel.xds.workload.decode import AddressProcessor, AuthorizationProcessor
from accel.xds.workload.from_table import workload_resources
from accel.xds.workload.kinds import ADDRESS, AUTHORIZATION
from accel.xds.workload.state import WorkloadState
from accel.xds.workload.to_table import to_table
from accel.xds.workload.to_verdicts import to_verdicts
from tests.test_bad_input import agent_cli  # noqa: F401 (a fixture)
from tests.test_workload_policy import compare

MESH = """
services:
  - name: pg
    vip: 10.96.0.20
    port: 5432
    endpoints:
      - {address: 10.0.2.10, port: 5432, namespace: db, service_account: postgres,
         name: pg-1, labels: {app: pg}}
      - {address: 10.0.2.11, port: 5433, namespace: db, service_account: postgres,
         name: pg-2, labels: {app: pg}, weight: 3}
  - name: web
    vip: 10.96.0.10
    port: 80
    endpoints:
      - {address: 10.0.1.10, port: 8080, namespace: shop, service_account: web, name: web-1}
      - {address: 10.0.1.20, port: 8080, namespace: shop, name: client-1}
  - name: admin
    vip: 10.96.0.30
    port: 22
    endpoints:
      - {address: 10.0.2.30, port: 22, namespace: db, service_account: admin}
policies:
  - name: pg-only-shop
    namespace: db
    selector: {labels: {app: pg}}
    rules:
      - from:
          - namespaces: [shop]
          - source: {serviceAccounts: [db/admin]}
        to: [{ports: [5432, "5433"]}]
  - name: no-lab
    namespace: istio-system
    action: DENY
    rules:
      - from: [{ip_blocks: [192.168.0.0/16], not_ip_blocks: [192.168.7.0/24]}]
  - name: web-from-clients
    namespace: shop
    selector: {endpoints: [web-1]}
    rules:
      - from: [{principals: ["cluster.local/ns/shop/sa/default", "*/sa/admin"]}]
      - when: [{key: source.namespace, values: ["d*"]},
               {key: destination.port, not_values: [9090]}]
  - name: audit
    namespace: db
    action: DENY
    dry_run: true
    rules:
      - from: [{not_namespaces: ["*"]}]
"""


def test_identities_and_policies_parse():
    t = config.load_text(MESH)
    pg1 = t.get("pg").endpoints[0]
    assert (pg1.namespace, pg1.service_account, pg1.name, pg1.labels) == \
        ("db", "postgres", "pg-1", (("app", "pg"),))
    client = t.get("web").endpoints[1]
    assert (client.namespace, client.service_account) == ("shop", "default")
    plain = config.load_text("services: [{name: a, vip: 10.96.0.1, port: 80, endpoints: "
                             "[{address: 10.0.0.1, port: 80}]}]").services[0].endpoints[0]
    assert (plain.namespace, plain.service_account) == ("default", "default")
    pols = {p.name: p for p in t.policies}
    assert pols["pg-only-shop"].scope == Scope.WORKLOAD_SELECTOR
    assert pols["pg-only-shop"].selector == Selector((("app", "pg"),))
    assert pols["no-lab"].scope == Scope.GLOBAL and pols["no-lab"].action == Action.DENY
    assert pols["audit"].scope == Scope.NAMESPACE and pols["audit"].dry_run
    from_, to = pols["pg-only-shop"].groups[0]
    assert from_[1].service_accounts == (("db", "admin"),)
    assert to[0].destination_ports == (5432, 5433)
    web = pols["web-from-clients"].groups
    assert web[0][0][0].principals == (StringMatch("exact", "cluster.local/ns/shop/sa/default"),
                                       StringMatch("suffix", "/sa/admin"))
    assert web[1][0][0].namespaces == (StringMatch("prefix", "d"),)
    assert web[1][1][0].not_destination_ports == (9090,)


def test_written_back_the_same():
    t = config.load_text(MESH)
    assert config.load_text(config.dump(t)) == t


BAD = [
    ("policies: [{name: deny-db, rules: [{from: [{namespaces: shop}]}]}]",
     "policies[deny-db].rules[0].from[0].namespaces: expected a list, got str"),
    ("policies: [{name: deny-db, rules: [{from: [{namespace: [shop]}]}]}]",
     "policies[deny-db].rules[0].from[0]: unknown field(s) namespace;"),
    ("policies: [{name: deny-db, rules: [{to: [{ports: [70000]}]}]}]",
     "policies[deny-db].rules[0].to[0].ports[0]: port 70000 is out of range 1-65535"),
    ("policies: [{name: deny-db, rules: [{from: [{ip_blocks: [10.0.0.300/8]}]}]}]",
     "policies[deny-db].rules[0].from[0].ip_blocks[0]: '10.0.0.300/8' is not a valid CIDR"),
    ("policies: [{name: deny-db, rules: [{from: [{service_accounts: [admin]}]}]}]",
     "policies[deny-db].rules[0].from[0].service_accounts[0]: expected namespace/name"),
    ("policies: [{name: deny-db, rules: [{from: [{principals: [a*b]}]}]}]",
     "policies[deny-db].rules[0].from[0].principals[0]: 'a*b': a wildcard goes"),
    ("policies: [{name: deny-db, rules: [{from: [{}]}]}]",
     "policies[deny-db].rules[0].from[0]: a source naming nothing matches nothing"),
    ("policies: [{name: deny-db, rules: [{when: [{key: request.path, values: [/]}]}]}]",
     "policies[deny-db].rules[0].when[0].key: 'request.path' is not an L4 attribute"),
    ("policies: [{name: deny-db, action: AUDIT}]",
     "policies[deny-db].action: 'AUDIT' is not ALLOW or DENY"),
    ("policies: [{name: deny-db, scope: WORKLOAD_SELECTOR}]",
     "policies[deny-db].scope: WORKLOAD_SELECTOR goes with a selector"),
    ("policies: [{name: deny-db, selector: {}}]",
     "policies[deny-db].selector: selects nothing"),
    ("policies: [{name: a}, {name: a}]", "policies[a]: default/a is also policies[0]"),
    ("policies: [{namespace: db}]", "policies[0].name: missing required field"),
    ("services: [{name: s, vip: 10.96.0.1, port: 80, endpoints: ["
     "{address: 10.0.0.1, port: 80, namespace: a}, {address: 10.0.0.1, port: 81, "
     "namespace: b}]}]",
     "services[s].endpoints[1].namespace: 'b', but services[s].endpoints[0] at the same "
     "address 10.0.0.1 says 'a'"),
    ("services: [{name: s, vip: 10.96.0.1, port: 80, endpoints: ["
     "{address: 10.0.0.1, port: 80, labels: [app]}]}]",
     "services[s].endpoints[0].labels: expected a mapping of strings to strings"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_errors_name_the_field(text, message):
    with pytest.raises(ValidationError) as e:
        config.load_text(text)
    assert str(e.value).startswith(message), str(e.value)


def test_cli_exits_2_on_a_bad_policy(tmp_path, agent_cli):  # noqa: F811
    f = tmp_path / "mesh.yaml"
    f.write_text(BAD[0][0])
    code, err, built = agent_cli("--config", str(f))
    assert code == 2 and BAD[0][1] in err and "Traceback" not in err and not built, err


def _served(table, node_of=lambda _: "n1"):
    served = workload_resources(table, node_of)
    a = AddressProcessor().decode_all({n: m.SerializeToString()
                                       for n, m in served.addresses.items()})
    p = AuthorizationProcessor().decode_all({n: m.SerializeToString()
                                             for n, m in served.authorizations.items()})
    return served, WorkloadState().apply(AUTHORIZATION, p).apply(ADDRESS, a)


def test_served_as_workload_api_and_read_back():
    """What `accel controller --xds-api workload` serves, decoded as an agent would, gives
    back the table's services and the same decisions for every connection."""
    t = config.load_text(MESH)
    served, state = _served(t)
    back = to_table(state, "n1").table
    for svc in t.services:
        got = back.get(f"default/{svc.name}:{svc.port}")
        assert got is not None and (got.vip, got.port) == (svc.vip, svc.port)
        assert sorted((e.address, e.port, e.weight) for e in got.endpoints) == \
            sorted((e.address, e.port, e.weight) for e in svc.endpoints)
    workloads = [m.workload for m in served.addresses.values() if m.HasField("workload")]
    direct = verdicts_of(t).verdicts
    via_api = to_verdicts(state, "n1").verdicts
    assert compare(workloads, list(served.authorizations.values()), "n1", direct) > 100
    assert compare(workloads, list(served.authorizations.values()), "n1", via_api) > 100


def test_mesh_policy_decisions_in_words():
    v = verdicts_of(config.load_text(MESH)).verdicts
    ip = ipaddress.ip_address

    def said(src, dst, port):
        d = v.decide(ip(src), ip(dst), port)
        return None if d is None else (d.verdict.name,
                                       v.policies[d.policy - 1] if d.policy else None)

    assert said("10.0.1.20", "10.0.2.10", 5432) == ("ALLOW", "db/pg-only-shop")
    assert said("10.0.2.30", "10.0.2.11", 5433) == ("ALLOW", "db/pg-only-shop")  # db/admin
    assert said("10.0.2.30", "10.0.2.11", 22)[0] == "DENY"  # not a listed port
    assert said("192.168.1.1", "10.0.2.10", 5432) == ("DENY", "istio-system/no-lab")
    assert said("192.168.7.1", "10.0.2.30", 22) == ("DRY_RUN_DENY", "db/audit")  # no identity
    assert said("10.0.1.20", "10.0.1.10", 8080) == ("ALLOW", "shop/web-from-clients")
    assert said("10.0.2.30", "10.0.1.10", 8080) == ("ALLOW", "shop/web-from-clients")
    assert said("10.0.2.30", "10.0.1.10", 9090) == ("ALLOW", "shop/web-from-clients")  # sa


def test_udp_and_second_ports_are_reported_not_served():
    t = config.load_text("""
services:
  - {name: dns, vip: 10.96.0.53, port: 53, protocol: UDP,
     endpoints: [{address: 10.0.0.53, port: 53}]}
  - {name: two, vip: 10.96.0.2, port: 80,
     endpoints: [{address: 10.0.0.7, port: 80}, {address: 10.0.0.7, port: 81}]}
""")
    served = workload_resources(t)
    assert "UDP" in served.skipped["services[dns]"]
    assert any("one port per service port" in why for why in served.skipped.values())
    assert "default/dns" not in served.addresses

