"""`safeprobe train`: load model and data, fine-tune with one method, save the adapter and a manifest."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from transformers import set_seed

from ..data import fingerprint, load_examples, sample
from ..data.tokenize import collator, encode_all
from ..errors import UserError
from ..io import FILE_MODE, check_output_dir, output_lock, write_json
from ..method import TRAIN, get_method
from ..method.config import _help
from ..method.diagnostics import attach_diagnostics
from .harm_curve import attach_harm_curve, harmful_suites
from ..model import load_model, make_trainable
from ..model.identity import base_identity, write_record
from . import method_data
from .manifest import manifest
from .resume import finished_run, prepare_resume, resume_point, start_fresh
from .run_settings import RunSettings, load_options, method_arguments
from .script_arguments import ScriptArguments

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(RunSettings, ScriptArguments):
    """Every setting of `safeprobe train`: the data it fine-tunes on (`ScriptArguments`, as in TRL's scripts), the
    method's own data, the shared training keys of `RunSettings`, and the method's knobs in `method_settings`."""

    STAGE: ClassVar[str] = TRAIN
    MINIMUMS: ClassVar[dict] = {"n": 1, "n_safety": 1, "diagnostics_every": 0, "eval_harm_every": 0,
                                 "eval_harm_limit": 1}

    method: str = _help("fine-tuning method: sft, sap, safeinstr, lisa, a registered one, or a composition of one "
                        "optimiser-side method with data-side ones (sap+safeinstr)", "sft")
    output_dir: str = _help("where the adapter, run.json and logs go", "runs/train")
    safety_data: str = _help("safety pairs (prompt, safe, harmful) for SAP: a name or a file", "pku-saferlhf-pairs")
    n_safety: int = _help("number of safety pairs (SAP; paper: 50) or safety demonstrations (SafeInstr, Lisa)", 50)
    alignment_data: str = _help("SafeInstr/Lisa: harmful instruction -> refusal examples (a name or a file)",
                                "safety-tuned-llamas")
    resume: bool = _help("continue from the last complete checkpoint in output_dir (same settings); "
                         "a run that already finished is not repeated", False)
    diagnostics_every: int = _help("every K steps write per-layer cos(useful, harmful-answer gradient) and the "
                                   "losses on harmful and held-out useful data to diagnostics.jsonl (0: off)", 0)
    eval_harm_every: int = _help("every K steps answer the harmful suites (eval_harm_suites, keyword judge) and "
                                 "write their harmful score to train_log.jsonl (0: off); training is unchanged", 0)
    eval_harm_suites: str = _help("harmful suites for eval_harm_every, comma-separated", "jbb-harmful,advbench")
    eval_harm_limit: int = _help("prompts per suite for eval_harm_every (the first N)", 50)

    def __post_init__(self):
        super().__post_init__()
        self.check_data()
        if self.eval_harm_every:
            harmful_suites(self.eval_harm_suites)  # a typo fails now, not after the model is loaded


def train_config(shared: bool = False, **values) -> TrainConfig:
    """TrainConfig from keyword arguments under their YAML names, the method's knobs included (`eps=0.05`). With
    `shared` (settings written for several methods), the knobs of other methods are left out instead of refused."""
    return TrainConfig.from_values(values, "train settings", shared)


def data_fingerprints(cfg: TrainConfig) -> dict:
    """The datasets the run reads, by role, each with its file's sha256 (recorded with the run, checked on rerun)."""
    data = {"task": fingerprint(cfg.dataset_name, cfg.dataset_train_split, cfg.dataset_options(cfg.seed, cfg.n))}
    if round(cfg.n * cfg.poison_ratio):
        data["poison"] = fingerprint(cfg.poison_data, "train")
    return {**data, **method_data.fingerprints(get_method(cfg.method), cfg)}


def task_examples(cfg: TrainConfig) -> tuple[list, dict]:
    """n useful examples, a fraction replaced by harmful pairs when poisoning; and their counts."""
    n_poison = round(cfg.n * cfg.poison_ratio)
    task = load_examples(cfg.dataset_name, cfg.dataset_train_split, cfg.dataset_column_mapping,
                         cfg.dataset_options(cfg.seed, cfg.n))
    examples = sample(task, cfg.n - n_poison, cfg.seed)
    counts = {"n_task": len(examples), "n_poison": n_poison}
    if n_poison:
        harmful = load_examples(cfg.poison_data, "train")
        if len(harmful) < n_poison:
            raise UserError(f"poison_data '{cfg.poison_data}' has {len(harmful)} examples, {n_poison} needed")
        examples = sample(examples + sample(harmful, n_poison, cfg.seed), None, cfg.seed)
    return examples, counts


def load_base(cfg: RunSettings):
    """The base model (as cfg's dtype, revision, attention and quantisation keys say) and its tokenizer."""
    return load_model(cfg.model_name_or_path, cfg.dtype, options=load_options(cfg))


def prepare_model(cfg: TrainConfig):
    """The model to train, with its tokenizer."""
    model, tokenizer = load_base(cfg)
    return trainable(cfg, model), tokenizer


def trainable(cfg: RunSettings, model):
    """`model` made trainable as `cfg` says: LoRA adapters (on quantised weights: QLoRA), or every parameter."""
    if not cfg.use_peft:
        return make_trainable(model, 0)
    if load_options(cfg).quantised:  # casts norms to fp32, enables input gradients for checkpointing
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return make_trainable(model, cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules)


def method_records(cfg: TrainConfig) -> dict[str, list]:
    """The method's own data beyond the task, read before the model loads (a bad row should not cost a load)."""
    return method_data.records(get_method(cfg.method), cfg)


def build_trainer(cfg: TrainConfig, model, tokenizer, train_features, out: Path, records=None, encoded=None):
    """The method's trainer. Its own data: `encoded` (trainer keyword -> features) if given, else `records` (from
    `method_records`) encoded, else read from the config."""
    method = get_method(cfg.method)
    encoded = encoded if encoded is not None else method_data.features(method, cfg, tokenizer, records)
    try:
        return method.trainer(model=model, args=method_arguments(cfg, out), train_dataset=train_features,
                              data_collator=collator(tokenizer), processing_class=tokenizer,
                              step_log=out / "train_log.jsonl", **encoded)
    except ValueError as e:  # the Trainer's checks of its arguments (e.g. eval_strategy without eval data)
        raise UserError(str(e).strip().splitlines()[0]) from None


def _logged_mean_loss(out: Path) -> float | None:
    """Mean task loss over the steps of train_log.jsonl that were taken (what the Trainer reports for one run)."""
    losses = []
    for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "task_loss" in row and "skipped" not in row:
            losses.append(row["task_loss"])
    return sum(losses) / len(losses) if losses else None


def save_trained(trainer, out: Path) -> None:
    """The trained adapter (or full weights) into `out`: every rank calls this (under FSDP the weights are
    gathered from their shards), the main process writes."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if trainer.accelerator.is_main_process:
        save_model(trainer.accelerator.unwrap_model(trainer.model), out, state_dict)


def save_model(model, out: Path, state_dict: dict | None = None) -> None:
    """Write the adapter (or full weights) into `out` atomically: save to a temp dir, then rename each file."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        for name in os.listdir(tmp):
            target = out / name
            if (Path(tmp) / name).is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(Path(tmp) / name, target)
            if target.is_file():
                os.chmod(target, FILE_MODE)


def run_train(cfg: TrainConfig) -> dict:
    """Fine-tune and return the manifest (also written to OUTPUT_DIR/run.json, last).

    Holds OUTPUT_DIR's lock throughout. With `cfg.resume`, continues from the last complete checkpoint, or
    returns the manifest of a finished run of the same settings without training again.
    """
    out = check_output_dir(cfg.output_dir)
    method_data.check_sources(get_method(cfg.method), cfg)
    main_process = os.environ.get("RANK", "0") == "0"  # under DDP every rank runs this; one writes and locks
    data = data_fingerprints(cfg)  # a missing dataset fails here, before anything is loaded
    with output_lock(out) if main_process else contextlib.nullcontext():
        done = finished_run(cfg, out, data)
        if done is not None:
            log.warning("%s: this run already finished (run.json); nothing to do", out)
            return done
        checkpoint = resume_point(cfg, out, data)
        if main_process and checkpoint:
            prepare_resume(out, checkpoint)
        elif main_process:
            start_fresh(cfg, out, data)
        return _train(cfg, out, checkpoint, data)


def _train(cfg: TrainConfig, out: Path, checkpoint: Path | None, data: dict) -> dict:
    start = time.time()
    set_seed(cfg.seed)
    examples, counts = task_examples(cfg)
    records = method_records(cfg)
    model, tokenizer = load_base(cfg)
    base = base_identity(model, cfg.model_name_or_path)  # recorded with the adapter: it is checked wherever it is loaded
    model = trainable(cfg, model)
    encoded = encode_all(tokenizer, examples, cfg.max_length)
    if not encoded.features:
        sources = cfg.dataset_name + (f" + poison_data {cfg.poison_data}" if counts["n_poison"] else "")
        raise UserError(f"{sources}: every example is longer than max_length={cfg.max_length}")
    trainer = build_trainer(cfg, model, tokenizer, encoded.features, out, records=records)
    if cfg.diagnostics_every:
        attach_diagnostics(trainer, cfg.dataset_name, cfg.safety_data, cfg.diagnostics_every, out)
    if cfg.eval_harm_every:
        attach_harm_curve(trainer, cfg, out)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_trained(trainer, out)
    if cfg.use_peft:
        write_record(out, base)
    # a resumed run's figures cover its whole trajectory: the time and the logged steps before the checkpoint too
    info = manifest(cfg, method=trainer.method_name, seed=cfg.seed, data={**data, **counts},
                    dropped_examples=encoded.dropped, n_train=len(trainer.train_dataset),
                    train_loss=_logged_mean_loss(out) if checkpoint else result.training_loss,
                    global_steps=result.global_step, resumed_from=str(checkpoint) if checkpoint else None,
                    base_model={k: v for k, v in base.items() if k != "weights_signature"},
                    training_arguments=trainer.args.to_dict(), fast_paths=trainer.fast_paths(),
                    distributed=trainer.distribution(),
                    wall_time_s=round(time.time() - start + trainer.wall_time_before_s, 2))
    write_json(out / "run.json", info)
    return info
