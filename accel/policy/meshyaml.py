"""mesh.yaml's `policies:` <-> accel.policy.rules.Policy, in Istio AuthorizationPolicy's
terms, mapped the way istiod maps an AuthorizationPolicy for ztunnel:

    policies:
      - name: pg-only-shop
        namespace: db              # default "default"; in istio-system: mesh-wide
        selector:                  # optional: labels (matchLabels) and/or endpoint names
          labels: {app: pg}
          endpoints: [pg-1]
        action: ALLOW              # or DENY
        dry_run: false
        rules:                     # OR-ed; a rule's from, to and each when AND-ed
          - from:                  # OR-ed (Istio's `- source: {...}` is read too)
              - namespaces: [shop]             # "*", "prefix*", "*suffix" wildcards
                not_principals: ["cluster.local/ns/shop/sa/bot"]
                service_accounts: [db/admin]   # namespace/name
                ip_blocks: [10.0.0.0/8]        # and not_ip_blocks
            to:
              - ports: [5432]                  # and not_ports (`- operation:` read too)
            when:
              - key: destination.ip            # source.ip, source.namespace,
                values: [10.0.2.0/24]          # source.principal, destination.port
                not_values: [10.0.2.9]

Scope: with a selector WORKLOAD_SELECTOR, else GLOBAL in the root namespace (istio-system)
and NAMESPACE elsewhere; `scope:` may say so explicitly. Errors name the field:
``policies[deny-db].rules[0].from[0].namespaces: expected a list of strings``.
"""

from __future__ import annotations

from typing import Any

from accel.config import _mapping, _required
from accel.model import ValidationError, check_name, check_port, parse_network
from accel.policy.rules import (
    DEFAULT_NAMESPACE,
    ROOT_NAMESPACE,
    Action,
    Group,
    IPNetwork,
    Match,
    Policy,
    Rule,
    Scope,
    Selector,
    StringMatch,
)

POLICY_KEYS = {"name", "namespace", "scope", "selector", "action", "rules", "dry_run"}
SELECTOR_KEYS = {"labels", "endpoints"}
RULE_KEYS = {"from", "to", "when"}
# Istio's camelCase spellings are read as the snake_case ones.
CAMEL = {"notNamespaces": "not_namespaces", "notPrincipals": "not_principals",
         "serviceAccounts": "service_accounts", "notServiceAccounts": "not_service_accounts",
         "ipBlocks": "ip_blocks", "notIpBlocks": "not_ip_blocks", "notPorts": "not_ports",
         "notValues": "not_values", "dryRun": "dry_run"}
SOURCE_KEYS = {"namespaces", "not_namespaces", "principals", "not_principals",
               "service_accounts", "not_service_accounts", "ip_blocks", "not_ip_blocks"}
OPERATION_KEYS = {"ports", "not_ports"}
CONDITION_KEYS = {"key", "values", "not_values"}
# when: key -> (positive field, negative field, kind of value)
CONDITIONS = {"source.ip": ("source_ips", "not_source_ips", "cidr"),
              "source.namespace": ("namespaces", "not_namespaces", "string"),
              "source.principal": ("principals", "not_principals", "string"),
              "destination.ip": ("destination_ips", "not_destination_ips", "cidr"),
              "destination.port": ("destination_ports", "not_destination_ports", "port")}


def _snake(d: dict[str, Any]) -> dict[str, Any]:
    return {CAMEL.get(str(k), k): v for k, v in d.items()}


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(path, f"expected a list, got {type(value).__name__}")
    return value


def string_match(value: Any, path: str) -> StringMatch:
    """Istio's wildcards: "*" any non-empty value, "x*" a prefix, "*x" a suffix."""
    if not isinstance(value, str) or not value:
        raise ValidationError(path, f"expected a non-empty string, got {value!r}")
    if value == "*":
        return StringMatch("presence")
    if value.startswith("*"):
        return StringMatch("suffix", value[1:])
    if value.endswith("*"):
        return StringMatch("prefix", value[:-1])
    if "*" in value:
        raise ValidationError(path, f"{value!r}: a wildcard goes at the start or the end")
    return StringMatch("exact", value)


def _strings(value: Any, path: str) -> tuple[StringMatch, ...]:
    return tuple(string_match(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))


def _cidrs(value: Any, path: str) -> tuple[IPNetwork, ...]:
    return tuple(parse_network(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))


def _ports(value: Any, path: str) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(_list(value, path)):
        if isinstance(v, str) and v.isdigit():
            v = int(v)  # Istio writes ports as strings
        out.append(check_port(v, f"{path}[{i}]"))
    return tuple(out)


def _accounts(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    out = []
    for i, v in enumerate(_list(value, path)):
        ns, _, sa = v.partition("/") if isinstance(v, str) else ("", "", "")
        if not ns or not sa or "/" in sa:
            raise ValidationError(f"{path}[{i}]", f"expected namespace/name, got {v!r}")
        out.append((ns, sa))
    return tuple(out)


def _entry(raw: Any, path: str, keys: set[str], wrapper: str) -> tuple[dict[str, Any], str]:
    """A from/to entry's fields and path, flat or in Istio's shape (`- source: {...}`)."""
    d = _snake(_mapping(raw, path, keys | {wrapper} | set(CAMEL)))
    if wrapper in d:
        path = f"{path}.{wrapper}"
        d = _snake(_mapping(d[wrapper], path, keys | set(CAMEL)))
    return d, path


def _some(m: Match, path: str, what: str) -> Match:
    if m.empty():
        raise ValidationError(path, f"{what} matches nothing; name a field or remove it")
    return m


def _source(raw: Any, path: str) -> Match:
    d, path = _entry(raw, path, SOURCE_KEYS, "source")
    m = Match(namespaces=_strings(d.get("namespaces"), f"{path}.namespaces"),
              not_namespaces=_strings(d.get("not_namespaces"), f"{path}.not_namespaces"),
              principals=_strings(d.get("principals"), f"{path}.principals"),
              not_principals=_strings(d.get("not_principals"), f"{path}.not_principals"),
              service_accounts=_accounts(d.get("service_accounts"), f"{path}.service_accounts"),
              not_service_accounts=_accounts(d.get("not_service_accounts"),
                                             f"{path}.not_service_accounts"),
              source_ips=_cidrs(d.get("ip_blocks"), f"{path}.ip_blocks"),
              not_source_ips=_cidrs(d.get("not_ip_blocks"), f"{path}.not_ip_blocks"))
    return _some(m, path, "a source naming nothing")


def _operation(raw: Any, path: str) -> Match:
    d, path = _entry(raw, path, OPERATION_KEYS, "operation")
    return _some(Match(destination_ports=_ports(d.get("ports"), f"{path}.ports"),
                       not_destination_ports=_ports(d.get("not_ports"), f"{path}.not_ports")),
                 path, "an operation naming no port")


def _condition(raw: Any, path: str) -> Match:
    d = _snake(_mapping(raw, path, CONDITION_KEYS | set(CAMEL)))
    key = _required(d, "key", path)
    if key not in CONDITIONS:
        raise ValidationError(f"{path}.key", f"{key!r} is not an L4 attribute; one of "
                              f"{', '.join(sorted(CONDITIONS))}")
    pos, neg, kind = CONDITIONS[key]
    parse = {"cidr": _cidrs, "string": _strings, "port": _ports}[kind]
    values = parse(d.get("values"), f"{path}.values")
    not_values = parse(d.get("not_values"), f"{path}.not_values")
    if not values and not not_values:
        raise ValidationError(path, "give values or not_values")
    return Match(**{pos: values, neg: not_values})


def _rule(raw: Any, path: str) -> Group:
    d = _mapping(raw if raw is not None else {}, path, RULE_KEYS)
    rules: list[Rule] = []
    if d.get("from") is not None:
        src = _list(d["from"], f"{path}.from")
        rules.append(tuple(_source(s, f"{path}.from[{i}]") for i, s in enumerate(src)))
    if d.get("to") is not None:
        dst = _list(d["to"], f"{path}.to")
        rules.append(tuple(_operation(o, f"{path}.to[{i}]") for i, o in enumerate(dst)))
    for i, c in enumerate(_list(d.get("when"), f"{path}.when")):
        rules.append((_condition(c, f"{path}.when[{i}]"),))
    return tuple(rules)


def _selector(raw: Any, path: str) -> Selector:
    d = _mapping(raw, path, SELECTOR_KEYS)
    labels = d.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise ValidationError(f"{path}.labels", "expected a mapping of strings to strings")
    names = _list(d.get("endpoints"), f"{path}.endpoints")
    for i, n in enumerate(names):
        check_name(n, f"{path}.endpoints[{i}]")
    if not labels and not names:
        raise ValidationError(path, "selects nothing: give labels or endpoints")
    return Selector(tuple(sorted(labels.items())), tuple(names))


def parse_policy(raw: Any, index: int) -> Policy:
    where = f"policies[{index}]"
    if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"].strip():
        where = f"policies[{raw['name']}]"
    d = _snake(_mapping(raw, where, POLICY_KEYS | set(CAMEL)))
    name = check_name(_required(d, "name", where), f"{where}.name")
    namespace = check_name(d.get("namespace", DEFAULT_NAMESPACE), f"{where}.namespace")
    action_raw = str(d.get("action", "ALLOW")).upper()
    if action_raw not in Action.__members__:
        raise ValidationError(f"{where}.action", f"{d.get('action')!r} is not ALLOW or DENY")
    dry_run = d.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise ValidationError(f"{where}.dry_run", f"expected true or false, got {dry_run!r}")
    selector = _selector(d["selector"], f"{where}.selector") \
        if d.get("selector") is not None else None
    scope = (Scope.WORKLOAD_SELECTOR if selector else
             Scope.GLOBAL if namespace == ROOT_NAMESPACE else Scope.NAMESPACE)
    if d.get("scope") is not None:
        given = str(d["scope"]).upper()
        if given not in Scope.__members__:
            raise ValidationError(f"{where}.scope", f"{d['scope']!r} is not one of "
                                  f"{', '.join(Scope.__members__)}")
        if (Scope[given] == Scope.WORKLOAD_SELECTOR) != (selector is not None):
            raise ValidationError(f"{where}.scope", "WORKLOAD_SELECTOR goes with a selector, "
                                  "and a selector with WORKLOAD_SELECTOR")
        scope = Scope[given]
    rules = _list(d.get("rules"), f"{where}.rules")
    groups = tuple(_rule(r, f"{where}.rules[{i}]") for i, r in enumerate(rules))
    return Policy(name, namespace, scope, Action[action_raw], groups, dry_run, selector)


def parse_policies(raw: Any) -> tuple[Policy, ...]:
    out = [parse_policy(p, i) for i, p in enumerate(_list(raw, "policies"))]
    seen: dict[str, int] = {}
    for i, p in enumerate(out):
        if p.key in seen:
            raise ValidationError(f"policies[{p.name}]", f"{p.key} is also policies[{seen[p.key]}]")
        seen[p.key] = i
    return tuple(out)


def _string_text(m: StringMatch) -> str:
    return {"exact": "{}", "prefix": "{}*", "suffix": "*{}", "presence": "*"}[m.kind] \
        .format(m.value)


def match_to_dict(m: Match) -> dict[str, Any]:
    """One Match, in the words of the `from` entry, `to` entry or `when` that makes it."""
    out: dict[str, Any] = {}
    for f, key in (("namespaces", "namespaces"), ("not_namespaces", "not_namespaces"),
                   ("principals", "principals"), ("not_principals", "not_principals")):
        if getattr(m, f):
            out[key] = [_string_text(s) for s in getattr(m, f)]
    for f in ("service_accounts", "not_service_accounts"):
        if getattr(m, f):
            out[f] = [f"{ns}/{sa}" for ns, sa in getattr(m, f)]
    for f, key in (("source_ips", "ip_blocks"), ("not_source_ips", "not_ip_blocks")):
        if getattr(m, f):
            out[key] = [str(n) for n in getattr(m, f)]
    for f, key in (("destination_ports", "ports"), ("not_destination_ports", "not_ports")):
        if getattr(m, f):
            out[key] = list(getattr(m, f))
    return out


def policy_to_dict(p: Policy) -> dict[str, Any]:
    """A Policy as mesh.yaml writes it (parse_policy of it gives it back). A rule whose
    matches are neither pure sources nor pure ports becomes `when` conditions."""
    out: dict[str, Any] = {"name": p.name, "namespace": p.namespace, "scope": p.scope.name,
                           "action": p.action.name}
    if p.dry_run:
        out["dry_run"] = True
    if p.selector is not None:
        sel: dict[str, Any] = {}
        if p.selector.labels:
            sel["labels"] = dict(p.selector.labels)
        if p.selector.endpoints:
            sel["endpoints"] = list(p.selector.endpoints)
        out["selector"] = sel
    out["rules"] = [_group_to_dict(g) for g in p.groups]
    return out


def _group_to_dict(g: Group) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    for ms in g:
        kinds = {_kind(m) for m in ms}
        if kinds == {"from"} and "from" not in rule:
            rule["from"] = [match_to_dict(m) for m in ms]
        elif kinds == {"to"} and "to" not in rule:
            rule["to"] = [match_to_dict(m) for m in ms]
        elif len(ms) == 1 and (cond := _when_to_dict(ms[0])) is not None:
            rule.setdefault("when", []).append(cond)
        else:
            raise ValidationError("policies", "a rule mesh.yaml cannot write (OR across "
                                  "sources and destinations)")
    return rule


def _kind(m: Match) -> str:
    dst_ip = m.destination_ips or m.not_destination_ips
    src = any(getattr(m, f) for f in ("namespaces", "not_namespaces", "principals",
                                      "not_principals", "service_accounts",
                                      "not_service_accounts", "source_ips", "not_source_ips"))
    ports = m.destination_ports or m.not_destination_ports
    if dst_ip or (src and ports):
        return "when"
    return "from" if src else "to"


def _when_to_dict(m: Match) -> dict[str, Any] | None:
    """The `when` condition a match is, None when it is no single condition."""
    found = [(key, pos, neg, kind) for key, (pos, neg, kind) in CONDITIONS.items()
             if getattr(m, pos) or getattr(m, neg)]
    if len(found) != 1 or m.service_accounts or m.not_service_accounts:
        return None
    key, pos, neg, kind = found[0]
    text = _string_text if kind == "string" else str if kind == "cidr" else int
    out: dict[str, Any] = {"key": key}
    if getattr(m, pos):
        out["values"] = [text(v) for v in getattr(m, pos)]  # type: ignore[operator]
    if getattr(m, neg):
        out["not_values"] = [text(v) for v in getattr(m, neg)]  # type: ignore[operator]
    return out
