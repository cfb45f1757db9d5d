"""Build-once model directories under `home_dir()/models/<name>/`, installed atomically.

A directory is built in a temporary sibling and renamed into place only when complete, so a crash or a
concurrent build never leaves a half-written checkpoint behind. A stamp file records what built it;
a directory whose stamp does not match the current one (format bumped, or written by another
transformers major version) is rebuilt.

Under a distributed launch each machine's first process builds while the others wait: transformers'
`save_pretrained` writes nothing on ranks other than 0, so a directory built by another rank would hold no weights.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import transformers

from ..io import write_json
from ..settings import home_dir

logger = logging.getLogger(__name__)

STAMP_FILE = "safeprobe_model.json"


def models_dir() -> Path:
    return home_dir() / "models"


def _stamp(name: str, fmt: int) -> dict:
    # Checkpoints written by transformers 5 use config keys (e.g. `rope_parameters`) that 4.x misreads,
    # so the cache is only trusted by the same major version that wrote it.
    return {"name": name, "format": fmt, "transformers_major": transformers.__version__.split(".")[0]}


def _is_current(directory: Path, stamp: dict) -> bool:
    try:
        found = json.loads((directory / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(found.get(k) == v for k, v in stamp.items())


def cached_model_dir(name: str, build: Callable[[Path], None], fmt: int) -> Path:
    """`home_dir()/models/<name>`, first calling `build(tmp_dir)` to fill it if it is missing or stale."""
    target = models_dir() / name
    stamp = _stamp(name, fmt)
    with _local_main_process_first():
        if not _is_current(target, stamp):
            _build_and_install(target, stamp, build)
    return target


_ordering = False  # inside the outermost ordered block: a nested build (a tiny model needs the embedded
# tokenizer) must not add barriers that the other processes, waiting at the outer one, would match


@contextlib.contextmanager
def _local_main_process_first():
    """Under torch.distributed, the block runs on each machine's first process before the others enter it."""
    global _ordering
    if _ordering or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield
        return
    local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    _ordering = True
    try:
        if not local_main:
            torch.distributed.barrier()  # until the first process has built
        yield
    finally:
        _ordering = False
        if local_main:
            torch.distributed.barrier()


def _build_and_install(target: Path, stamp: dict, build: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"building {target.name} wrote no config.json (saved on another rank?)")
        tmp.chmod(0o755)  # mkdtemp makes it private; the installed cache should read like any other directory
        write_json(tmp / STAMP_FILE, {**stamp, "transformers_version": transformers.__version__})
        _install(tmp, target, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, target: Path, stamp: dict) -> None:
    """Rename the finished `tmp` onto `target`, moving a stale `target` out of the way first."""
    if target.exists() and not _is_current(target, stamp):
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, trash / "stale")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process installed the same model between our check and our rename: keep theirs.
        if not _is_current(target, stamp):
            raise
        logger.debug("%s was built concurrently by another process; keeping that copy", target)
