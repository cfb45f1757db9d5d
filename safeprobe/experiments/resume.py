"""Rerunning a command after an interruption: training resumes from its last complete checkpoint, and
pipeline stages that already finished are skipped.

A training run records its configuration in `run_config.json` when it starts; `--resume` only continues
checkpoints written under the same trajectory-relevant settings (everything except where and how often it
logs, saves or gives up).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..io import sha256_json, write_json, write_text
from ..method.checkpoint import checkpoint_folders, last_complete_checkpoint, step_of
from .harm_curve import KEYS as HARM_CURVE_KEYS

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
STAGE_FILE = "stage.json"
# Settings that may differ between a run and its resumption: they do not change the trained weights.
NOT_TRAJECTORY = frozenset({"output_dir", "resume", "logging_steps", "save_steps", "report_to", "max_bad_steps",
                            "diagnostics_every", "logging_first_step", "save_total_limit", "push_to_hub",
                            "hub_model_id", "hub_strategy", "hub_private_repo", "hub_revision", "run_name",
                            "eval_strategy", "eval_steps", "per_device_eval_batch_size", *HARM_CURVE_KEYS})


def trajectory(cfg) -> dict:
    """The settings that determine the trained weights, JSON-normalised (as they are read back)."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_TRAJECTORY}
    return json.loads(json.dumps(values, default=str))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished_run(cfg, out: Path, data: dict) -> dict | None:
    """With --resume: the manifest of a run of this configuration that already finished in `out` on `data` (the
    datasets' fingerprints by role)."""
    info = _read_json(out / "run.json") if cfg.resume else None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        return None
    done = {k: v for k, v in info["config"].items() if k not in NOT_TRAJECTORY}
    if done != trajectory(cfg):
        return None
    _check_same_data(out, info.get("data"), data, "a finished run")
    return info


def resume_point(cfg, out: Path, data: dict) -> Path | None:
    """With --resume: the last complete checkpoint in `out`, checked to belong to this configuration and data."""
    if not cfg.resume:
        return None
    saved, last = _read_json(out / RUN_CONFIG), last_complete_checkpoint(out)
    if isinstance(saved, dict):
        changed = sorted(k for k, v in trajectory(cfg).items() if saved.get(k) != v)
        if changed:
            raise UserError(f"{out} holds a run with different settings ({', '.join(changed)}); resume with the "
                            "same settings, or rerun without --resume to start over")
        _check_same_data(out, saved.get("data"), data, "a run")
    elif last is not None:
        raise UserError(f"{out / RUN_CONFIG} is missing or unreadable: cannot check that {last} belongs to this "
                        "configuration; rerun without --resume to start over")
    if last is None and saved is not None:  # an interrupted run that never reached a checkpoint
        log.warning("%s: no complete checkpoint to resume from; starting from scratch", out)
    return last


def _check_same_data(out: Path, recorded, data: dict, what: str) -> None:
    """A dataset file edited since the run in `out` was trained is not that run's data (roles the run did not
    record are not compared)."""
    recorded = recorded if isinstance(recorded, dict) else {}
    changed = [f"{role} {fp['path']}" for role, fp in data.items()
               if isinstance(recorded.get(role), dict) and recorded[role].get("sha256") != fp["sha256"]]
    if changed:
        raise UserError(f"{out} holds {what} on other data ({', '.join(changed)} changed since); rerun without "
                        "--resume to train again, or choose another output directory")


def start_fresh(cfg, out: Path, data: dict) -> None:
    """A new run in `out`: forget a previous run's log, manifest and checkpoints, record this configuration and
    its datasets' fingerprints."""
    for name in ("train_log.jsonl", "run.json"):
        (out / name).unlink(missing_ok=True)
    folders = checkpoint_folders(out)
    if folders:
        log.warning("%s: starting over, removing %d checkpoint(s) of an earlier run (--resume continues one)", out,
                    len(folders))
    for folder in folders:
        shutil.rmtree(folder)
    write_json(out / RUN_CONFIG, {**trajectory(cfg), "data": data})


def prepare_resume(out: Path, checkpoint: Path) -> None:
    """Before resuming: drop the log rows of steps after `checkpoint` (they are redone) and any torn last line."""
    (out / "run.json").unlink(missing_ok=True)
    path = out / "train_log.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step_of(checkpoint):
            kept.append(line + "\n")
    write_text(path, "".join(kept))


def run_stage(folder: str | Path, settings: dict, run: Callable[[], dict]) -> dict:
    """`run()`'s result, or the recorded one if this stage already finished in `folder` with the same settings.

    The record (`stage.json`) is written last and atomically: an interrupted stage is simply run again.
    """
    marker = Path(folder) / STAGE_FILE
    digest = sha256_json(settings)
    done = _read_json(marker)
    if isinstance(done, dict) and done.get("settings_sha256") == digest and "result" in done:
        log.warning("%s: already done, skipped (delete %s to redo it)", folder, marker)
        return done["result"]
    result = run()
    write_json(marker, {"settings_sha256": digest, "settings": settings, "result": result})
    return result
