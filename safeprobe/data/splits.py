"""Deterministic, seeded subsets and splits (grouped splits keep every copy of a prompt on one side)."""
from __future__ import annotations

import hashlib
import random
from typing import Callable, Sequence


def sample(records: Sequence, n: int | None, seed: int) -> list:
    """n records drawn without replacement, reproducibly (all of them, shuffled, if n is None)."""
    records = list(records)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[: n if n is not None else len(records)]]


def split(records: Sequence, holdout: float, seed: int, key: Callable = lambda r: r.prompt) -> tuple[list, list]:
    """(train, held-out) by a stable hash of key(record): records sharing a key land on the same side."""
    def bucket(record) -> float:
        digest = hashlib.sha256(f"{seed}:{key(record)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    train = [r for r in records if bucket(r) >= holdout]
    held = [r for r in records if bucket(r) < holdout]
    return train, held
