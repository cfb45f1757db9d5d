"""`safeprobe train`: load model and data, fine-tune with one method, save the adapter and a manifest."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import SchedulerType, set_seed

from ..data import fingerprint, load_examples, sample
from ..data.tokenize import collator, encode_all
from ..errors import UserError, check_seed
from ..io import FILE_MODE, check_output_dir, output_lock, write_json
from ..method import SafeprobeConfig, SAPConfig, get_method
from ..method.diagnostics import attach_diagnostics
from ..method.sap.config import MODES as SAP_MODES
from ..method.sap.config import default_safety_batch_size
from ..model import load_model, make_trainable
from ..model.identity import base_identity, write_record
from . import method_data
from .manifest import manifest
from .resume import finished_run, prepare_resume, resume_point, start_fresh

log = logging.getLogger(__name__)


def method_fields(config_class) -> list[str]:
    """The fields a method's config adds to SafeprobeConfig's: its own knobs."""
    shared = {f.name for f in dataclasses.fields(SafeprobeConfig)}
    return [f.name for f in dataclasses.fields(config_class) if f.name not in shared]


SAP_FIELDS = method_fields(SAPConfig)


REPORT_TO = ("none", "tensorboard", "wandb")
MINIMUMS = {"n": 1, "n_safety": 1, "batch_size": 1, "grad_accum": 1, "max_length": 1, "safety_batch_size": 1,
            "lisa_align_steps": 1, "lisa_task_steps": 1, "max_bad_steps": 1, "logging_steps": 1, "max_steps": -1,
            "save_steps": 0, "warmup_steps": 0, "weight_decay": 0, "lora_r": 0, "diagnostics_every": 0}


def check_run_settings(cfg) -> None:
    """What the train and align configs share beyond ranges: a seed, a step count, and a reporter that is installed."""
    check_seed(cfg.seed)
    if cfg.max_steps == 0:
        raise UserError("max_steps must be >= 1, or -1 to run `epochs` epochs; got 0")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(f"report_to '{cfg.report_to}' needs the {cfg.report_to} package (pip install "
                        f"{cfg.report_to}), or use 'none'")


def _help(text: str, default=None, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    method: str = _help("fine-tuning method: sft, sap, safeinstr, lisa or a registered one", "sft")
    model: str = _help("model spec: smollm2-135m-instruct, tiny-random-llama, a local directory or a Hub id",
                       "smollm2-135m-instruct")
    task: str = _help("useful fine-tuning data: a dataset name (sst2, agnews, gsm8k, alpaca...) or a file", "sst2")
    safety_data: str = _help("safety pairs (prompt, safe, harmful) for SAP: a name or a file", "pku-saferlhf-pairs")
    output_dir: str = _help("where the adapter, run.json and logs go", "runs/train")
    n: int = _help("number of useful examples used", 1000)
    n_safety: int = _help("number of safety pairs (SAP; paper: 50) or safety demonstrations (SafeInstr, Lisa)", 50)
    alignment_data: str = _help("SafeInstr/Lisa: harmful instruction -> refusal examples (a name or a file)",
                                "safety-tuned-llamas")
    poison_ratio: float = _help("fraction of the n examples replaced by harmful (prompt, harmful answer) pairs", 0.0)
    poison_data: str = _help("where the harmful pairs for poisoning come from (name or file)", "pure-bad")
    seed: int = _help("seed of everything (data sample, LoRA init, dropout, order)", 42)
    max_steps: int = _help("optimiser steps (-1: run `epochs` epochs)", -1)
    epochs: float = _help("epochs over the useful data when max_steps is -1", 1.0)
    lr: float = _help("learning rate", 1e-4)
    batch_size: int = _help("useful examples per device batch", 8)
    grad_accum: int = _help("gradient accumulation steps", 1)
    max_length: int = _help("maximum tokens per example (prompt + response)", 256)
    lr_scheduler: str = _help("learning-rate schedule (transformers names)", "constant")
    warmup_steps: int = _help("linear warm-up steps", 0)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    lora_r: int = _help("LoRA rank (0: full fine-tuning)", 8)
    lora_alpha: int = _help("LoRA alpha", 16)
    lora_dropout: float = _help("LoRA dropout", 0.05)
    target_modules: str | None = _help("comma-separated LoRA target modules (none given: per architecture)")
    bf16: bool = _help("compute in bf16 (trainable tensors stay fp32)", False)
    logging_steps: int = _help("log every N steps", 10)
    save_steps: int = _help("checkpoint every N steps into OUTPUT_DIR/checkpoint-N (0: only the final adapter)", 0)
    resume: bool = _help("continue from the last complete checkpoint in output_dir (same settings); "
                         "a run that already finished is not repeated", False)
    max_bad_steps: int = _help("stop after this many steps in a row with a non-finite loss or gradient "
                               "(each such step is skipped)", 5)
    report_to: str = _help("none, tensorboard or wandb", "none")
    diagnostics_every: int = _help("every K steps write per-layer cos(useful, harmful-answer gradient) and the "
                                   "losses on harmful and held-out useful data to diagnostics.jsonl (0: off)", 0)
    # SAP
    eps: float = _help("SAP: size of the harmful perturbation", SAPConfig.eps)
    eps_mode: str = _help("SAP: relative (eps * ||W_trainable||) or absolute", SAPConfig.eps_mode)
    beta: float = _help("SAP: probe step size", SAPConfig.beta)
    probe_layers: str = _help("SAP: middle, all, '3,9', '10:20' or '0.3:0.6'", SAPConfig.probe_layers)
    probe_norm: float | None = _help("SAP: rescale the probe to this norm instead of beta * g_V")
    safety_loss: str = _help("SAP: paper (difference of mean losses) or dpo (authors' code)", SAPConfig.safety_loss)
    safety_every: int = _help("SAP: recompute the safety direction every K steps", SAPConfig.safety_every)
    probe_every: int = _help("SAP: recompute the probe every K steps", SAPConfig.probe_every)
    sap_mode: str = _help("SAP: paper (Algorithm 1) or reference (the authors' lagged schedule)", SAPConfig.mode)
    probe_lr: float = _help("SAP reference mode: probe AdamW learning rate", SAPConfig.probe_lr)
    safety_batch_size: int | None = _help("SAP: safety pairs per safety batch (s is their gradient; default "
                                          "batch_size // 2, as many safety sequences as task examples; a batch "
                                          "larger than batch_size runs in chunks of batch_size pairs)")
    # Lisa
    rho: float = _help("Lisa: strength of the proximal term towards the other state's weights", 1.0)
    lisa_align_steps: int = _help("Lisa: optimiser steps on alignment data per cycle", 10)
    lisa_task_steps: int = _help("Lisa: optimiser steps on the task data per cycle", 90)

    def __post_init__(self):
        get_method(self.method)  # one-line error naming the registered methods
        for name, valid in (("lr_scheduler", [t.value for t in SchedulerType]),
                            ("report_to", REPORT_TO), ("sap_mode", SAP_MODES)):
            if getattr(self, name) not in valid:
                raise UserError(f"unknown {name} '{getattr(self, name)}'; valid choices: {', '.join(valid)}")
        if self.safety_batch_size is None:  # resolved here, so that run.json records what the run used
            self.safety_batch_size = default_safety_batch_size(self.batch_size)
        for name, low in MINIMUMS.items():
            if getattr(self, name) < low:
                raise UserError(f"{name} must be >= {low}, got {getattr(self, name)}")
        check_run_settings(self)
        if self.rho < 0:
            raise UserError(f"rho must be >= 0, got {self.rho}")
        for name in ("lr", "epochs", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.poison_ratio <= 1:
            raise UserError(f"poison_ratio must be in [0, 1], got {self.poison_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.sap_config()  # validates SAP's knobs

    def sap_config(self) -> SAPConfig:
        values = {name: getattr(self, name) for name in SAP_FIELDS if name != "mode"}
        return SAPConfig(output_dir=self.output_dir, mode=self.sap_mode, **values)


def data_fingerprints(cfg: TrainConfig) -> dict:
    """The datasets the run reads, by role, each with its file's sha256 (recorded with the run, checked on rerun)."""
    data = {"task": fingerprint(cfg.task, "train")}
    if round(cfg.n * cfg.poison_ratio):
        data["poison"] = fingerprint(cfg.poison_data, "train")
    return {**data, **method_data.fingerprints(get_method(cfg.method), cfg)}


def task_examples(cfg: TrainConfig) -> tuple[list, dict]:
    """n useful examples, a fraction replaced by harmful pairs when poisoning; and their counts."""
    n_poison = round(cfg.n * cfg.poison_ratio)
    examples = sample(load_examples(cfg.task, "train"), cfg.n - n_poison, cfg.seed)
    counts = {"n_task": len(examples), "n_poison": n_poison}
    if n_poison:
        harmful = load_examples(cfg.poison_data, "train")
        if len(harmful) < n_poison:
            raise UserError(f"poison_data '{cfg.poison_data}' has {len(harmful)} examples, {n_poison} needed")
        examples = sample(examples + sample(harmful, n_poison, cfg.seed), None, cfg.seed)
    return examples, counts


def prepare_model(cfg: TrainConfig):
    """The model to train, with its tokenizer."""
    model, tokenizer = load_model(cfg.model)
    return trainable(cfg, model), tokenizer


def trainable(cfg: TrainConfig, model):
    """`model` made trainable as `cfg` says: LoRA adapters, or every parameter."""
    targets = [t.strip() for t in cfg.target_modules.split(",")] if cfg.target_modules else None
    return make_trainable(model, cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets)


def training_arguments(cfg, out: Path, trainer_class=None):
    """The method's config (`trainer_class.config_class`, default that of `cfg.method`'s trainer) from `cfg`: the
    training arguments, and the method's own knobs under their names in `cfg`. The features are tokenised and
    truncated by safeprobe already, so TRL's dataset preparation is skipped."""
    config_class = (trainer_class or get_method(cfg.method).trainer).config_class
    names = {"mode": "sap_mode"}  # the config's name for a knob -> its name in cfg, where they differ
    values = {name: getattr(cfg, names.get(name, name)) for name in method_fields(config_class)
              if hasattr(cfg, names.get(name, name))}
    return config_class(
        **values, output_dir=str(out), seed=cfg.seed, data_seed=cfg.seed, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps, num_train_epochs=cfg.epochs, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, bf16=cfg.bf16,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False, max_length=cfg.max_length,
        max_bad_steps=cfg.max_bad_steps, dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=not torch.cuda.is_available())


def method_records(cfg: TrainConfig) -> dict[str, list]:
    """The method's own data beyond the task, read before the model loads (a bad row should not cost a load)."""
    return method_data.records(get_method(cfg.method), cfg)


def build_trainer(cfg: TrainConfig, model, tokenizer, train_features, out: Path, records=None, encoded=None):
    """The method's trainer. Its own data: `encoded` (trainer keyword -> features) if given, else `records` (from
    `method_records`) encoded, else read from the config."""
    method = get_method(cfg.method)
    encoded = encoded if encoded is not None else method_data.features(method, cfg, tokenizer, records)
    return method.trainer(model=model, args=training_arguments(cfg, out, method.trainer), train_dataset=train_features,
                          data_collator=collator(tokenizer), processing_class=tokenizer,
                          step_log=out / "train_log.jsonl", **encoded)


def _logged_mean_loss(out: Path) -> float | None:
    """Mean task loss over the steps of train_log.jsonl that were taken (what the Trainer reports for one run)."""
    losses = []
    for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "task_loss" in row and "skipped" not in row:
            losses.append(row["task_loss"])
    return sum(losses) / len(losses) if losses else None


def save_model(model, out: Path) -> None:
    """Write the adapter (or full weights) into `out` atomically: save to a temp dir, then rename each file."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
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
    model, tokenizer = load_model(cfg.model)
    base = base_identity(model, cfg.model)  # recorded with the adapter: it is checked wherever it is loaded
    model = trainable(cfg, model)
    encoded = encode_all(tokenizer, examples, cfg.max_length)
    if not encoded.features:
        raise UserError(f"{cfg.task}: every example is longer than max_length={cfg.max_length}")
    trainer = build_trainer(cfg, model, tokenizer, encoded.features, out, records=records)
    if cfg.diagnostics_every:
        attach_diagnostics(trainer, cfg.task, cfg.safety_data, cfg.diagnostics_every, out)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_model(trainer.model, out)
    if cfg.lora_r:
        write_record(out, base)
    # a resumed run's figures cover its whole trajectory: the time and the logged steps before the checkpoint too
    info = manifest(cfg, method=trainer.method_name, seed=cfg.seed, data={**data, **counts},
                    dropped_examples=encoded.dropped, n_train=len(trainer.train_dataset),
                    train_loss=_logged_mean_loss(out) if checkpoint else result.training_loss,
                    global_steps=result.global_step, resumed_from=str(checkpoint) if checkpoint else None,
                    base_model={k: v for k, v in base.items() if k != "weights_signature"},
                    wall_time_s=round(time.time() - start + trainer.wall_time_before_s, 2))
    write_json(out / "run.json", info)
    return info
