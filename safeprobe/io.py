"""Atomic file output, output-directory locks and content hashing (one place for all three)."""
import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import filelock

from .errors import UserError

LOCK_FILE = ".safeprobe.lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what a plain open() gives a new file (temporary files are made private)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def check_output_dir(path: str | Path) -> Path:
    """Fail before any model is loaded if the output directory cannot be written (train, eval, align, compare)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        shown = str(path) if str(path).isprintable() else repr(str(path))
        raise UserError(f"{shown}: output directory is not writable ({getattr(e, 'strerror', None) or e})") from None
    return path


def append_jsonl(path, obj) -> None:
    """Append one JSON line (a log: a torn last line is tolerated by readers)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def read_step_log(path) -> list[dict]:
    """The rows of a step log written by `append_jsonl` that carry an integer "step" ([] if there is no log); a
    torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]


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


def sha256_file(path) -> str:
    """The file's sha256, hashed once per version of the file (a plan of many runs names the same data often)."""
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, inode: int, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(values) -> dict[str, str]:
    """sha256 of each value that names an existing file (dataset names and other values are left out): what a
    cache key needs so that a file edited between two runs is not taken for the same input."""
    return {str(v): sha256_file(v) for v in values if isinstance(v, str) and v and Path(v).is_file()}


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
