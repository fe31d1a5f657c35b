"""Reports as JSON: writing floats JSON cannot hold, and reading a report back with every field
checked against its dataclass annotation (:meth:`omnicompile.report.Report.from_json`)."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from omnicompile.errors import ReportError

__all__ = ["type_name", "from_json_value", "json_value", "json_safe"]


def type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), f"a number ({v!r})" if isinstance(v, (int, float)) else type(v).__name__)


def from_json_value(cls, d: Any, where: str):
    """An instance of the dataclass ``cls`` from a JSON object, each field converted by its
    annotation (:func:`json_value`); fields with defaults may be absent, unknown keys are
    ignored."""
    if not isinstance(d, dict):
        raise ReportError(f"report field {where!r}: got {type_name(d)}; expected an object ({cls.__name__})")
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ReportError(f"report field {where + '.' + f.name!r} is missing")
            continue
        kw[f.name] = json_value(d[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**kw)


_FLOAT_WORDS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}   # what json_safe writes


def json_value(v: Any, hint: Any, where: str) -> Any:
    """``v`` checked against the annotation ``hint``: every int in a report is a count, index,
    id, FLOP or byte number (>= 0); a float may be ``"nan"``/``"inf"``/``"-inf"`` (as
    :func:`json_safe` writes them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad(want: str):
        raise ReportError(f"report field {where!r}: got {type_name(v) if not isinstance(v, str) else repr(v[:40])}; "
                          f"expected {want}")
    if origin is typing.Union:
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return json_value(v, inner[0], where)
    if dataclasses.is_dataclass(hint):
        return from_json_value(hint, v, where)
    if hint is Any:
        return v
    if hint is bool:
        return v if isinstance(v, bool) else bad("true or false")
    if hint is int:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else bad("an integer >= 0")
    if hint is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        return _FLOAT_WORDS[v] if isinstance(v, str) and v in _FLOAT_WORDS else bad('a number (or "nan"/"inf")')
    if hint is str:
        return v if isinstance(v, str) else bad("a string")
    if hint is dict or origin is dict:
        if not isinstance(v, dict):
            bad("an object")
        return {k: json_value(x, args[1], f"{where}.{k}") for k, x in v.items()} if args else v
    if hint is list or origin is list:
        if not isinstance(v, list):
            bad("a list")
        return [json_value(x, args[0], f"{where}[{i}]") for i, x in enumerate(v)] if args else v
    raise TypeError(f"report field {where}: no JSON reader for {hint!r}")   # a bug of ours


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)
