"""google.protobuf.Struct to plain data, for the places a Struct carries our figures: xDS
cluster metadata (mesh CIDRs, guard rates) and the API's edge and pod-routing reports."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, message


def struct_to_data(msg: message.Message) -> Any:
    """The Struct as dicts, lists and scalars, integral numbers as ints: a Struct holds
    every number as a double, and 1000.0 means 1000 (counts, ports, rates)."""
    return _whole(json_format.MessageToDict(msg))


def _whole(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _whole(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_whole(x) for x in v]
    return v
