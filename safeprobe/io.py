"""Atomic file output, output-directory locks and content hashing (one place for all three)."""
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import filelock

from .errors import UserError

LOCK_FILE = ".safeprobe.lock"


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path, obj) -> None:
    """Append one JSON line (a log: a torn last line is tolerated by readers)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, default=str) + "\n")


@contextlib.contextmanager
def output_lock(directory):
    """Hold `directory`/.safeprobe.lock while writing there; a second safeprobe process is refused at once.

    The lock is an OS file lock (flock, through `filelock`): the kernel releases it when its holder exits, even
    by kill -9, so a lock file left behind never blocks a later run.
    """
    path = Path(directory) / LOCK_FILE
    lock = filelock.FileLock(path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise UserError(f"{directory} is in use by another safeprobe run (it holds {path}); wait for it to finish "
                        "or choose another output directory") from None
    try:
        yield
    finally:
        lock.release()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
