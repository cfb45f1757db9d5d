"""YAML configs whose keys are a dataclass's fields, overridden by command-line flags (TRL's convention).

Precedence: dataclass defaults < YAML file < flags given on the command line.
Every mistake is a one-line UserError naming the file and key.
"""
from __future__ import annotations

import argparse
import dataclasses

import yaml

from ..config_file import _base_type, _coerce, from_mapping, read_yaml
from ..errors import UserError


def _flags(name: str) -> list[str]:
    """--name-with-dashes, and TRL's --name_with_underscores where it differs."""
    return list(dict.fromkeys(["--" + name.replace("_", "-"), "--" + name]))


def add_arguments(parser: argparse.ArgumentParser, cls, extra: list = (), hidden: list = ()) -> None:
    """One --flag per dataclass field (dashes for underscores, or TRL's underscores); unset flags stay absent.
    `extra`: more dataclass fields (a method config's), given as text and converted by the config; `hidden`: names
    accepted but not shown (the config rejects them with a better message than argparse's)."""
    parser.add_argument("--config", help="YAML file with these keys (flags override it)")
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("no_flag"):
            continue
        kind, _ = _base_type(f.type)
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(*_flags(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*_flags(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{help_text} (default: {f.default})" if help_text else f"default: {f.default}")
    group = parser.add_argument_group("the method's config (TRL's SFTConfig and the method's knobs)") if extra else None
    for f in extra:
        help_text = str(f.metadata.get("help", "")).replace("%", "%%")
        boolean = str(f.type).replace("typing.", "") in ("bool", "<class 'bool'>", "Optional[bool]", "bool | None")
        group.add_argument(*_flags(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                           help=help_text, **({"nargs": "?", "const": "true"} if boolean else {}))

    taken = {option for action in parser._actions for option in action.option_strings}
    for name in hidden:  # accepted, so that the config's check gives its one-line error
        for flag in _flags(name):
            if flag not in taken:
                parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, nargs="?", const="true",
                                    help=argparse.SUPPRESS)


NOT_SETTINGS = frozenset({"config", "handler", "command", "subcommand", "verbose"})


def resolve(cls, args: argparse.Namespace):
    """Defaults < YAML (--config) < flags. A mapping flag (`--base '{lr: 1e-4}'`) overrides only the keys it
    names in the file's mapping, and a key it sets to null is removed (JSON Merge Patch)."""
    values = read_yaml(args.config) if getattr(args, "config", None) else {}
    if hasattr(cls, "from_values"):  # a config that routes keys itself (a method's keys beside its own)
        if values:
            cls.from_values(values, str(args.config))  # the file's own mistakes name the file
        flags = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
        own = {f.name: f for f in dataclasses.fields(cls)}
        for name in set(flags) & set(own):  # a flag's type error names the flag
            flags[name] = _coerce(flags[name], own[name].type, _flags(name)[0])
        return cls.from_values({**values, **flags}, "command line")
    fields = [f for f in dataclasses.fields(cls) if hasattr(args, f.name)]
    flags = {f.name: _coerce(getattr(args, f.name), f.type, "--" + f.name.replace("_", "-")) for f in fields}
    try:
        merged = from_mapping(cls, values, str(args.config)) if values else None
    except UserError as e:  # a nested section's check may not know the file: name it
        raise UserError(str(e) if str(e).startswith(str(args.config)) else f"{args.config}: {e}") from None
    base = dataclasses.asdict(merged) if merged else {}
    base = {k: v for k, v in base.items() if k in values or k.replace("_", "-") in values}
    for f in dataclasses.fields(cls):
        if _base_type(f.type)[0] is dict and isinstance(base.get(f.name), dict) and f.name in flags:
            flags[f.name] = _merged_mapping(base[f.name], flags[f.name])
    return from_mapping(cls, {**base, **flags}, "command line")


def _merged_mapping(file_value: dict, flag_value):
    """The file's mapping with the flag's keys replaced and those it sets to null removed, when the flag is a YAML
    mapping (else the flag as is): `--settings '{p10: null}'` runs the file's other settings."""
    try:
        parsed = yaml.safe_load(flag_value) if isinstance(flag_value, str) else flag_value
    except yaml.YAMLError:
        return flag_value  # its own one-line error comes later
    if not isinstance(parsed, dict):
        return flag_value
    return {k: v for k, v in {**file_value, **parsed}.items() if k not in parsed or v is not None}
