"""The datasets a method reads beyond the task data, read, fingerprinted and encoded as its registry entry declares
them (`DataRole`): one code path for every method of `train` and `align`."""
from __future__ import annotations

import logging

from ..data import Example, fingerprint, load_examples, load_pairs, sample
from ..data.tokenize import encode_all, encode_pairs
from ..errors import UserError
from ..method.registry import DataRole, Method

log = logging.getLogger(__name__)

KIND_DESCRIPTIONS = {"pairs": "safety pairs (prompt, safe, harmful)", "examples": "examples",
                     "harmful examples": "harmful examples"}


def check_sources(method: Method, cfg) -> None:
    """Every dataset the method reads is named (before anything is loaded)."""
    for role in method.data:
        if not getattr(cfg, role.source):
            raise UserError(f"method '{method.name}' needs --{role.source.replace('_', '-')} "
                            f"({KIND_DESCRIPTIONS[role.kind]})")


def fingerprints(method: Method, cfg) -> dict:
    """role -> the name, file and sha256 of each dataset the method reads (a missing one fails here)."""
    return {role.role: fingerprint(getattr(cfg, role.source), role.split) for role in method.data}


def records(method: Method, cfg) -> dict[str, list]:
    """trainer keyword -> the seeded sample of records the method reads (before the model loads: a bad row should
    not cost a load)."""
    return {role.kwarg: _sample(role, cfg) for role in method.data}


def features(method: Method, cfg, tokenizer, read: dict[str, list] | None = None) -> dict[str, list]:
    """trainer keyword -> the method's records (`records` unless given) encoded within cfg.max_length."""
    read = records(method, cfg) if read is None else read
    return {role.kwarg: _encoded(role, cfg, tokenizer, read[role.kwarg]) for role in method.data}


def _sample(role: DataRole, cfg) -> list:
    source, wanted = getattr(cfg, role.source), getattr(cfg, role.count)
    loaded = load_examples(source, role.split) if role.kind == "examples" else load_pairs(source, role.split)
    if len(loaded) < wanted:
        log.warning("%s has %d records, %s asks for %d: using %d", source, len(loaded), role.count, wanted,
                    len(loaded))
    return sample(loaded, wanted, cfg.seed)


def _encoded(role: DataRole, cfg, tokenizer, read: list) -> list[dict]:
    if role.kind == "pairs":
        encoded = encode_pairs(tokenizer, read, cfg.max_length).features
    elif role.kind == "harmful examples":
        encoded = encode_all(tokenizer, [Example(p.messages, p.harmful) for p in read], cfg.max_length,
                             "harmful examples").features
    else:
        encoded = encode_all(tokenizer, read, cfg.max_length).features
    if not encoded:
        raise UserError(f"{getattr(cfg, role.source)}: no usable {KIND_DESCRIPTIONS[role.kind]} within "
                        f"max_length={cfg.max_length}")
    return encoded
