"""The method's own state inside the Trainer's `checkpoint-<step>/` folders, and which folders are complete.

The Trainer writes a checkpoint file by file, so a kill in the middle leaves a folder that looks like one.
The method's state is written after everything else, its JSON file last (atomically), so a checkpoint is
complete exactly when `safeprobe_state.json` is present. Only safetensors and JSON are read back.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import UserError
from .weights import whole
from ..io import atomic_path, write_json

STATE_TENSORS = "safeprobe_state.safetensors"
STATE_JSON = "safeprobe_state.json"  # written last: marks the checkpoint complete
_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def step_of(folder: str | Path) -> int:
    return int(_FOLDER.match(Path(folder).name).group(1))


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Every `checkpoint-<step>` folder of `run_dir`, complete or not, by step."""
    run_dir = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _FOLDER.match(p.name)) and p.is_dir()] \
        if run_dir.is_dir() else []
    return [p for _, p in sorted(found)]


def last_complete_checkpoint(run_dir: str | Path) -> Path | None:
    complete = [p for p in checkpoint_folders(run_dir) if (p / STATE_JSON).is_file()]
    return complete[-1] if complete else None


def mark_incomplete(folder: Path) -> None:
    """Called before the Trainer (re)writes `folder`: until `write_state`, it is not a usable checkpoint."""
    (folder / STATE_JSON).unlink(missing_ok=True)


def write_state(folder: Path, state: dict) -> None:
    """Tensors of `state` to safetensors, everything else (JSON values) to the completion marker, last."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    with atomic_path(folder / STATE_TENSORS) as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / STATE_JSON, {k: v for k, v in state.items() if k not in tensors})


def read_state(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"{folder}: not a complete safeprobe checkpoint ({type(e).__name__})") from None
    return {**meta, **tensors}


def numbered(name: str, tensors: list | None) -> dict:
    """[t0, t1] -> {'name.0': t0, 'name.1': t1} (nothing for None): lists of tensors in a flat state. FSDP shards
    are gathered whole (every rank calls this), so a checkpoint does not depend on the number of ranks."""
    return {f"{name}.{i}": whole(t) for i, t in enumerate(tensors or [])}


def unnumbered(state: dict, name: str, device) -> list | None:
    """The inverse of `numbered`, on `device`; None if the list was not saved."""
    keys = sorted((k for k in state if k.rsplit(".", 1)[0] == name and k.rsplit(".", 1)[-1].isdigit()),
                  key=lambda k: int(k.rsplit(".", 1)[1]))
    return [state[k].to(device) for k in keys] or None
