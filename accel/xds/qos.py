"""A service's Limits in xDS, both ways.

- connections: Envoy's network local rate limit (`envoy.filters.network.local_ratelimit`,
  LocalRateLimit.token_bucket {max_tokens, tokens_per_fill, fill_interval}) in the filter
  chain a plain connection to the service's listener takes. Envoy's bucket counts new
  connections per proxy, starts full, holds max_tokens and gains tokens_per_fill every
  fill_interval: connections = tokens_per_fill / fill_interval, burst = max_tokens.
- bandwidth: `bandwidth` in the listener's `meshaccel` filter metadata (Envoy has no L4
  bandwidth filter), a string such as "200Mbit" or a number of bit/s.
"""

from __future__ import annotations

from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.filters.network.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.type.v3 import token_bucket_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.any_pb2 import Any as AnyPb

from accel.model import (
    NO_LIMITS,
    Limits,
    ValidationError,
    bandwidth_text,
    parse_bandwidth,
)
from accel.xds.decode import typed

LOCAL_RATELIMIT = ("type.googleapis.com/"
                   + local_rate_limit_pb2.LocalRateLimit.DESCRIPTOR.full_name)
LOCAL_RATELIMIT_NAME = "envoy.filters.network.local_ratelimit"


def is_ratelimit(flt: listener_components_pb2.Filter) -> bool:
    return flt.HasField("typed_config") and flt.typed_config.type_url == LOCAL_RATELIMIT


def chain_connections(chain: listener_components_pb2.FilterChain, where: str
                      ) -> tuple[float, int]:
    """(connections per second, burst) of the chain's local rate limit; (0, 0): none.
    Several such filters: the strictest rate (each must admit a connection)."""
    best: tuple[float, int] = (0.0, 0)
    for i, flt in enumerate(chain.filters):
        if not is_ratelimit(flt):
            continue
        fw = f"{where}.filters[{i}].typed_config"
        lrl = typed(flt.typed_config, local_rate_limit_pb2.LocalRateLimit, fw)
        tb = lrl.token_bucket
        if not lrl.HasField("token_bucket") or tb.max_tokens < 1:
            raise ValidationError(f"{fw}.token_bucket.max_tokens", "must be at least 1")
        interval = tb.fill_interval.seconds + tb.fill_interval.nanos / 1e9
        if interval <= 0:
            raise ValidationError(f"{fw}.token_bucket.fill_interval", "must be positive")
        per_fill = tb.tokens_per_fill.value if tb.HasField("tokens_per_fill") else 1
        if per_fill < 1:
            raise ValidationError(f"{fw}.token_bucket.tokens_per_fill", "must be at least 1")
        rate = per_fill / interval
        if not best[0] or rate < best[0]:
            best = (rate, tb.max_tokens)
    return best


def meta_bandwidth(meta: struct_pb2.Struct, path: str) -> int:
    """bit/s from the `meshaccel` metadata's `bandwidth` (0: none)."""
    if "bandwidth" not in meta.fields:
        return 0
    v = meta.fields["bandwidth"]
    kind = v.WhichOneof("kind")
    raw: object = v.string_value if kind == "string_value" else \
        int(v.number_value) if kind == "number_value" and v.number_value.is_integer() else v
    return parse_bandwidth(raw, f"{path}.bandwidth")


def limits_of(chain: listener_components_pb2.FilterChain | None, where: str,
              bandwidth: int) -> Limits:
    rate, burst = chain_connections(chain, where) if chain is not None else (0.0, 0)
    if not rate and not bandwidth:
        return NO_LIMITS
    try:
        return Limits(bandwidth=bandwidth, connections=rate, burst=burst)
    except ValidationError as e:
        raise ValidationError(f"{where}.{e.path}", e.reason) from None


def ratelimit_filter(limits: Limits, stat_prefix: str) -> listener_components_pb2.Filter:
    """The local rate limit filter Envoy would apply for `limits.connections`."""
    fill_ns = round(1e9 / limits.connections)  # one token per interval
    per_fill = 1
    if fill_ns < 50_000_000:  # Envoy wants fill_interval >= 50 ms: fill several at once
        per_fill = round(limits.connections * 0.05)
        fill_ns = round(per_fill * 1e9 / limits.connections)
    lrl = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=stat_prefix,
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=limits.burst,
            tokens_per_fill=wrappers_pb2.UInt32Value(value=per_fill),
            fill_interval=duration_pb2.Duration(seconds=fill_ns // 1_000_000_000,
                                                nanos=fill_ns % 1_000_000_000)))
    packed = AnyPb()
    packed.Pack(lrl)
    return listener_components_pb2.Filter(name=LOCAL_RATELIMIT_NAME, typed_config=packed)


def bandwidth_meta(limits: Limits) -> dict[str, struct_pb2.Value]:
    return {"bandwidth": struct_pb2.Value(string_value=bandwidth_text(limits.bandwidth))} \
        if limits.bandwidth else {}
