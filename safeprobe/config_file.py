"""Settings files: a YAML mapping whose keys are a dataclass's fields, read and type-checked key by key.

Every mistake is a one-line UserError naming the file and key. The command line (`cli.config`) adds flags on top.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from .errors import UserError


def _base_type(annotation):
    """int | None -> (int, True); str -> (str, False)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing})  # dataclasses under `from __future__ import annotations`
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _coerce(value, annotation, where: str):
    kind, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: must not be empty")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if kind in (int, float):
        accepted, word = ((int, str), "an integer") if kind is int else ((int, float, str), "a finite number")
        try:
            if isinstance(value, bool) or not isinstance(value, accepted):
                raise ValueError
            number = kind(value)
            if kind is float and not math.isfinite(number):  # nan / inf: never a meaningful setting
                raise ValueError
            return number
        except (ValueError, OverflowError):
            raise UserError(f"{where}: expected {word}, got {value!r}") from None
    if kind is str:
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value):
            return ",".join(str(v) for v in value)  # YAML lists for comma-separated options
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: config is not UTF-8 text") from None
    except RecursionError:
        raise UserError(f"{path}: config is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values")
    return data


def from_mapping(cls, values: dict, source: str):
    """Validated dataclass from a mapping; unknown keys and wrong types name the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UserError(f"{source}: unknown key '{key}'; valid keys: {', '.join(fields)}")
        out[name] = _coerce(value, fields[name].type, f"{source}: key '{key}'")
    try:
        return cls(**out)
    except TypeError as e:  # a required field missing
        missing = [n for n, f in fields.items() if n not in out and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise UserError(f"{source}: missing required key(s): {', '.join(missing) or e}") from None


def comma_separated(value, what: str, kind=str) -> list:
    """A key's comma-separated values (or a YAML list) as `kind`s; none, or one that is not a `kind`, is a
    one-line error naming the key."""
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        values = [kind(str(item).strip()) for item in items if str(item).strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated {kind.__name__} values, got {value!r}") from None
    if not values:
        raise UserError(f"{what}: give at least one value")
    return values
