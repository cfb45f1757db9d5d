"""The settings `safeprobe train` and `safeprobe align` share, under TRL's names (`learning_rate`,
`per_device_train_batch_size`, ... as in `trl.SFTConfig`; `model_name_or_path`, `use_peft`, `lora_*` as in
`trl.ModelConfig`), so that a `trl sft` YAML plus `method:` runs as it is.

A run's settings are safeprobe's own keys (the fields below and the stage's) plus `method_settings`: any other
field of the method's config class (its own knobs such as SAP's `eps`, and every `SFTConfig`/`TrainingArguments`
field such as `eval_strategy` or `push_to_hub`), written at the top level of the YAML or as a flag like the rest.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import contextlib
import functools
import io
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import HfArgumentParser, SchedulerType

from ..config_file import from_mapping
from ..errors import UserError, check_seed
from ..method import SafeprobeConfig, get_method, methods
from ..method.config import _help
from ..model.loading import LoadOptions, resolve_dtype

REPORT_TO = ("none", "tensorboard", "wandb")
# Old safeprobe keys -> TRL's names: a config that still uses one gets a one-line error naming the new key.
RENAMED = {"lr": "learning_rate", "batch_size": "per_device_train_batch_size",
           "grad_accum": "gradient_accumulation_steps", "epochs": "num_train_epochs",
           "lr_scheduler": "lr_scheduler_type", "sap_mode": "mode", "model": "model_name_or_path",
           "task": "dataset_name", "target_modules": "lora_target_modules", "torch_dtype": "dtype"}
# TRL's ModelConfig / ScriptArguments keys that safeprobe does not read yet: their default value is accepted, any
# other is a one-line error saying what safeprobe does instead.
_LORA = "safeprobe trains plain LoRA adapters on lora_target_modules"
_DATA = "safeprobe fine-tunes on dataset_train_split of dataset_name and evaluates on its own suites"
NOT_YET = {"use_rslora": (False, _LORA), "use_dora": (False, _LORA), "lora_modules_to_save": (None, _LORA),
           "lora_target_parameters": (None, _LORA), "lora_task_type": ("CAUSAL_LM", _LORA),
           "dataset_test_split": ("test", _DATA), "ignore_bias_buffers": (False, _DATA)}
# Fields of the method's config that safeprobe derives from its own keys (see `method_arguments`), never set directly.
DERIVED = frozenset({"output_dir", "data_seed", "save_strategy", "dataset_kwargs", "remove_unused_columns", "use_cpu",
                     "dataloader_num_workers", "disable_tqdm"})
MINIMUMS = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 1, "max_steps": -1,
            "warmup_steps": 0, "weight_decay": 0, "logging_steps": 1, "save_steps": 0, "max_bad_steps": 1,
            "lora_r": 1, "lora_alpha": 1}


@dataclass
class RunSettings:
    """Keys shared by every training stage. Subclasses set `STAGE` and may change a default by redefining a field."""

    STAGE: ClassVar[str | None] = None  # the registry stage whose methods this config runs (TRAIN or ALIGN)
    MINIMUMS: ClassVar[dict] = {}  # the stage's own keys' lower bounds

    method: str = _help("the method (see `safeprobe train --help` for the registered ones)", "sft")
    model_name_or_path: str = _help("model spec: smollm2-135m-instruct, tiny-random-llama, a local directory or a "
                                    "Hub id", "smollm2-135m-instruct")
    seed: int = _help("seed of everything (data sample, LoRA init, dropout, order)", 42)
    max_steps: int = _help("optimiser steps (-1: run num_train_epochs epochs)", -1)
    num_train_epochs: float = _help("epochs over the training data when max_steps is -1", 1.0)
    learning_rate: float = _help("AdamW learning rate", 1e-4)
    per_device_train_batch_size: int = _help("training examples per device batch", 8)
    gradient_accumulation_steps: int = _help("batches accumulated into one optimiser step", 1)
    max_length: int = _help("maximum tokens per example (prompt + response)", 256)
    lr_scheduler_type: str = _help("learning-rate schedule (transformers names)", "constant")
    warmup_steps: int = _help("linear warm-up steps", 0)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    dtype: str = _help("dtype of the loaded weights: float32, bfloat16, float16 or auto (as saved); LoRA adapters "
                       "and SAP's perturbation arithmetic stay in float32", "float32")
    model_revision: str = _help("branch, tag or commit of a Hub model", "main")
    attn_implementation: str | None = _help("eager, sdpa, flash_attention_2... (none: transformers' choice)")
    trust_remote_code: bool = _help("run the model code a Hub repository ships (only for repositories you trust)",
                                    False)
    load_in_4bit: bool = _help("QLoRA: load the base weights in 4 bits (bitsandbytes, CUDA; needs use_peft)", False)
    load_in_8bit: bool = _help("load the base weights in 8 bits (bitsandbytes, CUDA; needs use_peft)", False)
    bnb_4bit_quant_type: str = _help("4-bit quantisation: nf4 or fp4", "nf4")
    use_bnb_nested_quant: bool = _help("quantise the 4-bit quantisation constants too (saves ~0.4 bit a weight)",
                                       False)
    bnb_4bit_quant_storage: str | None = _help("dtype the 4-bit weights are stored in (none: uint8; FSDP wants the "
                                               "compute dtype)")
    use_peft: bool = _help("train LoRA adapters (false: every parameter)", True)
    lora_r: int = _help("LoRA rank", 8)
    lora_alpha: int = _help("LoRA alpha", 16)
    lora_dropout: float = _help("LoRA dropout", 0.05)
    lora_target_modules: str | None = _help("comma-separated LoRA target modules, or all-linear (none given: the "
                                            "attention and MLP projections of the architecture)")
    gradient_checkpointing: bool = _help("recompute activations in the backward pass (less memory, more time)", False)
    bf16: bool = _help("compute in bf16 (trainable tensors stay fp32)", False)
    logging_steps: int = _help("log every N steps", 10)
    save_steps: int = _help("checkpoint every N steps into OUTPUT_DIR/checkpoint-N (0: only the final result)", 0)
    max_bad_steps: int = _help("stop after this many steps in a row with a non-finite loss or gradient (each such "
                               "step is skipped)", 5)
    report_to: str = _help("none, tensorboard or wandb", "none")
    method_settings: dict = field(default_factory=dict, metadata={
        "help": "the method's own knobs and any other field of its config (TRL's SFTConfig), by name"})

    def __post_init__(self):
        method = get_method(self.method, self.STAGE)  # one-line error naming the registered methods
        for name, valid in (("lr_scheduler_type", [t.value for t in SchedulerType]), ("report_to", REPORT_TO)):
            if getattr(self, name) not in valid:
                raise UserError(f"unknown {name} '{getattr(self, name)}'; valid choices: {', '.join(valid)}")
        for name, low in {**MINIMUMS, **self.MINIMUMS}.items():
            if getattr(self, name) < low:
                raise UserError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("learning_rate", "num_train_epochs"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check_seed(self.seed)
        if self.max_steps == 0:
            raise UserError("max_steps must be >= 1, or -1 to run num_train_epochs epochs; got 0")
        resolve_dtype(self.dtype)
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise UserError(f"unknown bnb_4bit_quant_type '{self.bnb_4bit_quant_type}'; valid choices: nf4, fp4")
        if load_options(self).quantised and not self.use_peft:
            raise UserError("quantised weights cannot be trained: set use_peft (QLoRA trains LoRA adapters on them)")
        load_options(self).check()
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise UserError(f"report_to '{self.report_to}' needs the {self.report_to} package (pip install "
                            f"{self.report_to}), or use 'none'")
        self.method_settings = dict(self.method_settings or {})
        for key in self.method_settings:
            check_method_key(method, key, "method_settings")
        self.method_args = method_arguments(self, "output")  # validates the method's knobs now, with its messages

    @classmethod
    def from_values(cls, values: dict, source: str, shared: bool = False):
        """The config from a mapping of YAML keys (see `split_keys`); every mistake is a one-line error."""
        return from_mapping(cls, split_keys(cls, values, source, shared), source)

    def value(self, name: str):
        """A setting by name: one of the fields, else the method's config (its knobs with their defaults)."""
        if name in own_keys(type(self)):
            return getattr(self, name)
        if name not in method_keys(get_method(self.method, self.STAGE)):
            raise UserError(f"unknown key '{name}' for method '{self.method}'")
        return getattr(self.method_args, name)

    def to_dict(self) -> dict:
        """Every key as it is written in a YAML config: the fields, the method's knobs (given or at their defaults:
        a run is the same run whether a default was written out or not; as resolved) and the rest of method_settings."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_settings"}
        knobs = {k: getattr(self.method_args, k) for k in knob_names(get_method(self.method, self.STAGE))}
        return {**values, **self.method_settings, **knobs}


def load_options(cfg: RunSettings) -> LoadOptions:
    """How `load_model` loads cfg's model (TRL's ModelConfig keys)."""
    return LoadOptions(**{f.name: getattr(cfg, f.name if f.name != "revision" else "model_revision")
                          for f in dataclasses.fields(LoadOptions)})


def non_default_loading(values: dict) -> dict:
    """`values` without the loading keys (dtype, revision, attention, quantisation) that are at their defaults:
    those load what safeprobe loaded before it had the keys, so caches keyed on settings stay valid."""
    defaults = {name: RunSettings.__dataclass_fields__[name].default
                for name in ("dtype", "model_revision", "attn_implementation", "trust_remote_code", "load_in_4bit",
                             "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")}
    return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}


def own_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "method_settings"]


def method_keys(method) -> list[str]:
    """The keys a method's config takes beyond safeprobe's own: its knobs and TRL's training arguments."""
    config_class = method.trainer.config_class
    return [f.name for f in dataclasses.fields(config_class) if f.init and f.name not in DERIVED]


def knob_names(method) -> list[str]:
    """A method's own knobs: the fields its config adds to SafeprobeConfig's."""
    shared = {f.name for f in dataclasses.fields(SafeprobeConfig)}
    return [f.name for f in dataclasses.fields(method.trainer.config_class) if f.name not in shared]


def hidden_flags(cls) -> list[str]:
    """Keys that are not flags of this method but should get their one-line error rather than argparse's: the old
    names, TRL's keys not read yet, and the other methods' knobs."""
    knobs = {k for m in methods(cls.STAGE).values() for k in knob_names(m)}
    return sorted(set(RENAMED) | set(NOT_YET) | knobs)


def flag_fields(cls, method_name: str) -> list:
    """The method's config fields that are flags beside `cls`'s own (none for an unknown method: its error comes
    when the config is built)."""
    try:
        method = get_method(method_name, cls.STAGE)
    except UserError:
        return []
    accepted, own = set(method_keys(method)), set(own_keys(cls))
    return [f for f in dataclasses.fields(method.trainer.config_class) if f.name in accepted and f.name not in own]


def check_method_key(method, key: str, where: str) -> None:
    if key not in method_keys(method) or key in RunSettings.__dataclass_fields__:
        raise UserError(f"{where}: unknown key '{key}' for method '{method.name}'")


def method_arguments(cfg: RunSettings, output_dir):
    """The method's config (an `SFTConfig`) for `cfg`: safeprobe's keys under their TRL names, then
    `method_settings`. Features are tokenised and truncated by safeprobe, so TRL's dataset preparation is off."""
    method = get_method(cfg.method, cfg.STAGE)
    names = {f.name for f in dataclasses.fields(method.trainer.config_class)}
    derived = dict(output_dir=str(output_dir), data_seed=cfg.seed, save_strategy="steps" if cfg.save_steps else "no",
                   save_steps=cfg.save_steps or 500, report_to=[] if cfg.report_to == "none" else [cfg.report_to],
                   remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
                   dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=not torch.cuda.is_available())
    written = {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, **cfg.method_settings}
    given = {k: v for k, v in written.items() if k in names and k not in derived}
    if given.pop("gradient_checkpointing", False):  # TRL's key; transformers' current name takes it without a warning
        given["activation_checkpointing"] = True
    try:
        return method.trainer.config_class(**given, **derived)
    except (TypeError, ValueError) as e:  # TrainingArguments' own checks: their first line is the message
        raise UserError(str(e).strip().splitlines()[0]) from None


def split_keys(cls, values: dict, source: str, shared: bool = False) -> dict:
    """`values` (a YAML mapping or flags) as `cls`'s keyword arguments: its own keys as they are, every other key of
    the method's config into `method_settings`. A renamed key or one that no config knows is a one-line error;
    with `shared` (a section that applies to several methods), another method's knob is left out instead."""
    method = get_method(str(values.get("method", cls.method)), cls.STAGE)
    own, extra = {}, {}
    accepted = set(method_keys(method))
    others = {k for m in methods(cls.STAGE).values() for k in knob_names(m)} - accepted
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in own_keys(cls) or name == "method_settings":
            own[name] = value
        elif name in accepted:
            extra[name] = value
        elif shared and name in others:
            continue
        elif name in RENAMED:
            raise UserError(f"{source}: key '{key}' is now '{RENAMED[name]}' (TRL's name); rename it")
        elif name in NOT_YET:
            if value != NOT_YET[name][0]:
                raise UserError(f"{source}: key '{key}' is not supported yet ({NOT_YET[name][1]}); remove it")
        elif name in others:
            raise UserError(f"{source}: key '{key}' is a setting of another method, not of '{method.name}'")
        else:
            raise UserError(f"{source}: unknown key '{key}'; valid keys: {', '.join(own_keys(cls))} and the "
                            f"fields of {method.trainer.config_class.__name__}")
    if extra:
        own["method_settings"] = {**(own.get("method_settings") or {}), **typed(method, extra, source)}
    return own


def _is_text(annotation) -> bool:
    """A `str` or `str | None` field, its annotation a string or (once transformers' parser resolved it) a type."""
    return annotation in ("str", "str | None", "Optional[str]", str) or annotation == (str | None)


@functools.lru_cache(maxsize=None)
def _parser(config_class) -> HfArgumentParser:
    return HfArgumentParser(config_class)


def typed(method, settings: dict, source: str) -> dict:
    """Text values (flags, and YAML's `1e-4`, which YAML reads as text) converted to the field's type by
    transformers' parser, as `trl sft` would."""
    out, fields = {}, {f.name: f for f in dataclasses.fields(method.trainer.config_class)}
    for key, value in settings.items():
        if isinstance(value, (list, tuple)) and _is_text(fields[key].type):
            value = ",".join(str(v) for v in value)  # YAML lists for comma-separated options (`probe_layers`)
        elif isinstance(value, str):
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    parsed, _ = _parser(method.trainer.config_class).parse_known_args([f"--{key}", value])
            except SystemExit:
                raise UserError(f"{source}: key '{key}': invalid value {value!r}") from None
            value = getattr(parsed, key)
        out[key] = value
    return out
