"""What every method's trainer shares: TRL's `SFTTrainer` (its data formats, loss, PEFT and model loading), a
per-step JSONL log of method scalars, the guard against non-finite steps and checkpoints that carry the method's
own state."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments
from trl import SFTTrainer

from ..data.formats import encode_training_row, is_conversation
from ..data.sampling import LengthGroupedBatches
from ..errors import TrainingDiverged
from ..io import append_jsonl
from ..memory import keep_freed_memory
from . import checkpoint
from .config import SafeprobeConfig
from .losses import response_loss
from .registry import ALIGN, Method, register
from .weights import everywhere, local

log = logging.getLogger(__name__)


def all_finite(tensors) -> bool:
    """True if no tensor holds a NaN or an infinity (one device sync for the whole list; FSDP shards: on every
    rank, so that all ranks take the same decision)."""
    tensors = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in tensors]
    if not tensors:
        return True
    finite = torch.stack([torch.isfinite(local(t)).all() for t in tensors]).all()
    return bool(everywhere(finite, tensors))


class SafeprobeTrainer(SFTTrainer):
    """TRL's `SFTTrainer`, which is also the plain fine-tuning (SFT) every method is compared with, plus what every
    safeprobe method needs. It takes what `SFTTrainer` takes: a model or a model id, `peft_config`, datasets in
    TRL's formats (a list of already tokenised features too); `args` is the method's config (`config_class`; a
    `TrainingArguments` or `SFTConfig` is converted, the method's own knobs at their defaults).

    Conversational data (`messages`, or prompt and completion as message lists) is tokenised by safeprobe, with
    every assistant turn of the completion in the loss, through any chat template (TRL's `assistant_only_loss` needs
    `{% generation %}` markers, which most templates lack); everything else by TRL.

    Subclasses add their method by overriding `training_step` and report scalars with `record(**stats)`:
    they are averaged into the Trainer log and written, one line per optimiser step, to `step_log` (default
    OUTPUT_DIR/train_log.jsonl; None: no such file).

    Numerical faults: a step whose loss or gradient is not finite, or that a subclass flags with `flag_bad_step`
    (e.g. a non-finite auxiliary pass), is skipped: its update is dropped and the skip is logged. After
    `args.max_bad_steps` such steps in a row, training stops with `TrainingDiverged`; saved checkpoints are untouched.

    Checkpoints: besides the Trainer's files, each `checkpoint-<step>/` holds the method's state
    (`method_state()`, restored by `load_method_state()`), written last as the folder's completion marker;
    `train(resume_from_checkpoint=True)` resumes from the last complete checkpoint.
    """

    method_name = "sft"
    config_class = SafeprobeConfig
    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; Trainer divides by GA steps

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, *rest,
                 step_log: str | Path | None = "auto", **kwargs):
        args = self.method_config(args, model)
        if isinstance(train_dataset, list):  # already tokenised features
            train_dataset = Dataset.from_list(train_dataset)
        super().__init__(model, args, data_collator, train_dataset, *rest, **kwargs)
        if self.args.device.type == "cpu":
            keep_freed_memory()  # every step reallocates the same large buffers: keep them mapped
        self.model_accepts_loss_kwargs = False
        self.step_log = Path(self.args.output_dir) / "train_log.jsonl" if step_log == "auto" else \
            Path(step_log) if step_log else None
        self.max_bad_steps = self.args.max_bad_steps
        self._step_stats: dict[str, list[float]] = {}
        self._window_stats: dict[str, list[float]] = {}
        self._bad_reasons: list[str] = []  # what was non-finite in the current optimiser step
        self._skipped: str | None = None  # why the step being logged was skipped
        self._bad_steps = 0  # consecutive skipped steps
        self.wall_time_before_s = 0.0  # a resumed run: the training time before its checkpoint
        self._started = time.time()
        self.add_callback(_FlushStepStats(self))
        if self.args.fsdp and not self.is_fsdp_enabled:
            log.warning("fsdp is set but accelerate runs FSDP on GPUs (and other accelerators) only: this run is %s",
                        self.distribution()["sharding"])

    @classmethod
    def method_config(cls, args, model=None) -> SafeprobeConfig:
        """`args` as this method's config: as it is, converted from other training arguments, or (None) the
        defaults with TRL's output directory name."""
        if isinstance(args, cls.config_class):
            return args
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            return cls.config_class(output_dir=f"{Path(str(name) or 'model').name}-{cls.method_name}")
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a {cls.config_class.__name__} (or TrainingArguments), got "
                            f"{type(args).__name__}")
        known = {f.name for f in dataclasses.fields(cls.config_class) if f.init}
        return cls.config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)
                                   if f.init and f.name in known})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss; an fp64 model gets the same mean response loss in fp64 (TRL's fused head computes in fp32,
        which would cap the precision that fp64 runs exist for: checking the numerics of a method)."""
        if next(model.parameters()).dtype != torch.float64:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = response_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """Conversational rows are tokenised here (every assistant turn in the loss), the rest by TRL; TRL then
        truncates, drops rows without a target and packs as configured."""
        columns = dataset.column_names or []
        if "input_ids" not in columns and formatting_func is None and is_conversation(next(iter(dataset))):
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            dataset = dataset.map(
                lambda row, i: encode_training_row(tokenizer, row, args.max_length, f"{dataset_name} row {i}"),
                with_indices=True, remove_columns=columns, desc=f"Tokenizing {dataset_name} dataset")
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _get_train_sampler(self, train_dataset=None):
        """`group_by_length` batches similar lengths together in random order (see `LengthGroupedBatches`)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        lengths = [len(example["input_ids"]) for example in dataset]
        return LengthGroupedBatches(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    self.args.seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not all_finite([loss]):
            self.flag_bad_step("task loss")
        self.record(task_loss=float(loss) * self.current_gradient_accumulation_steps)
        return loss

    def record(self, **stats) -> None:
        for key, value in stats.items():
            if value is not None:
                self._step_stats.setdefault(key, []).append(float(value))

    def before_optimizer_step(self) -> None:
        """Hook for subclasses: gradients of the step are complete, the optimiser has not stepped yet."""

    # -- numerical faults ------------------------------------------------------------------------------
    def flag_bad_step(self, what: str) -> None:
        """Mark the current optimiser step as numerically broken (`what` was not finite): it will be skipped."""
        self._bad_reasons.append(what)

    def guard_step(self) -> bool:
        """Before the optimiser step: skip it if anything in it was not finite; stop after too many in a row.

        Returns whether the step goes ahead."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not all_finite([p.grad for p in params if p.grad is not None]):
            self.flag_bad_step("gradient")
        reasons, self._bad_reasons = list(dict.fromkeys(self._bad_reasons)), []
        if not self._all_ranks_agree_bad(bool(reasons)):
            self._bad_steps = 0
            return True
        for p in params:  # the optimiser leaves a parameter without gradient untouched: weights and moments
            p.grad = None
        self._bad_steps += 1
        step = self.state.global_step + 1
        self._skipped = ", ".join(reasons) or "non-finite on another rank"
        log.warning("step %d skipped: non-finite %s (%d in a row)", step, self._skipped, self._bad_steps)
        if self._bad_steps >= self.max_bad_steps:
            last = checkpoint.last_complete_checkpoint(self.args.output_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (see --save-steps)"
            raise TrainingDiverged(f"training stopped at step {step}: {self._bad_steps} steps in a row had a "
                                   f"non-finite {self._skipped}; {kept}. Lower the learning rate (or SAP's "
                                   "eps/beta) and rerun")
        return False

    def _all_ranks_agree_bad(self, bad: bool) -> bool:
        """Under DDP every rank must skip the same steps; one bad rank makes the step bad everywhere."""
        if self.accelerator.num_processes == 1:
            return bad
        flag = torch.tensor(float(bad), device=self.args.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0)

    @property
    def trainable_params(self) -> list:
        """The trainable weights as the model holds them now: under FSDP, after the Trainer prepared the model,
        its shards (new parameter objects)."""
        first = next(self.model.parameters())
        if getattr(self, "_trainable_of", None) is not first:
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
            self._trainable_of = first
        return self._trainable

    def gradient_sync_every_micro_batch(self, model) -> None:
        """Under FSDP2, reduce-scatter this micro-batch's gradients into the shards even inside the Trainer's
        accumulation `no_sync`: a method that takes an extra gradient from a backward (see `weights.gradient`) then
        finds only its own gradient in the shards' `.grad`, never unreduced ones held back for later."""
        if self.is_fsdp_enabled and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)

    def distribution(self) -> dict:
        """How the run was spread (recorded in run.json): processes and "single", "DDP", "FSDP1"/"FSDP2" or
        "DeepSpeed ZeRO-<stage>"."""
        state = self.accelerator.state
        if self.is_fsdp_enabled:
            kind = f"FSDP{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
        elif self.is_deepspeed_enabled:
            kind = f"DeepSpeed ZeRO-{getattr(state.deepspeed_plugin, 'zero_stage', '?')}"
        else:
            kind = "DDP" if self.accelerator.num_processes > 1 else "single"
        return {"processes": self.accelerator.num_processes, "sharding": kind}

    # -- checkpoints -----------------------------------------------------------------------------------
    def fast_paths(self) -> dict:
        """The method's optional fast paths, each "on" or why it was off (recorded in run.json); none here."""
        return {}

    def method_state(self) -> dict:
        """What a checkpoint must hold beyond the Trainer's files: tensors and JSON values, flat."""
        return {"bad_steps": self._bad_steps, "wall_time_s": self.wall_time_before_s + time.time() - self._started}

    def load_method_state(self, state: dict) -> None:
        self._bad_steps = state["bad_steps"]
        self.wall_time_before_s = float(state.get("wall_time_s", 0.0))  # absent in older checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        folder = checkpoint.checkpoint_folder(self._get_output_dir(trial), self.state.global_step)
        if self.args.should_save:
            checkpoint.mark_incomplete(folder)
        super()._save_checkpoint(model, trial)
        state = self.method_state()  # on every rank: FSDP shards are gathered whole
        if self.args.should_save:
            checkpoint.write_state(folder, state)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """As `Trainer.train`; `resume_from_checkpoint=True` means the last complete checkpoint of output_dir."""
        self._started = time.time()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoint.last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir}")
        if resume_from_checkpoint:
            self.load_method_state(checkpoint.read_state(resume_from_checkpoint))
            resume_from_checkpoint = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    # -- logging ---------------------------------------------------------------------------------------
    def end_of_step(self) -> dict:
        """Average this optimiser step's scalars, write them to the JSONL log and keep them for `log`."""
        row = {k: sum(v) / len(v) for k, v in self._step_stats.items() if v}
        notes = {"skipped": self._skipped} if self._skipped else {}
        self._step_stats, self._skipped = {}, None
        if (row or notes) and self.step_log is not None and self.is_world_process_zero():
            append_jsonl(self.step_log, {"step": self.state.global_step, "method": self.method_name, **row,
                                         **notes})
        for key, value in row.items():
            self._window_stats.setdefault(key, []).append(value)
        return row

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # training log: add the method's scalars averaged since the last log
            for key, values in self._window_stats.items():
                finite = [v for v in values if math.isfinite(v)]
                if finite and key != "task_loss":
                    logs[f"{self.method_name}/{key}"] = round(sum(finite) / len(finite), 6)
            self._window_stats = {}
        super().log(logs, *args, **kwargs)


register(Method("sft", SafeprobeTrainer, summary="plain fine-tuning: TRL's SFTTrainer"))
register(Method("plain", SafeprobeTrainer, stage=ALIGN, summary="plain alignment on refusals and self-answers"))


class _FlushStepStats(TrainerCallback):
    def __init__(self, trainer: SafeprobeTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.guard_step():
            self.trainer.before_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_of_step()


class EndlessBatches:
    """Seeded endless batches of an auxiliary dataset (safety pairs, alignment examples).

    Its own RNG leaves the task data order untouched; `drawn` counts the batches taken so that a resumed run,
    built with `skip=drawn`, continues with exactly the batches an unbroken run would have drawn. With
    `part=(rank, ranks)` every rank draws the same batch of `batch_size * ranks` rows and keeps every ranks-th row
    from its rank on: together the ranks see the batch one process would with the same global batch.
    """

    def __init__(self, dataset, batch_size: int, seed: int, collate, skip: int = 0, part: tuple[int, int] = (0, 1)):
        from torch.utils.data import DataLoader
        generator = torch.Generator().manual_seed(seed)
        rank, ranks = part
        loader = DataLoader(dataset, batch_size=batch_size * ranks, shuffle=True, generator=generator,
                            collate_fn=list)
        self._rows = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), skip, None)
        self._collate, self.drawn, self._part = collate, skip, part

    def __next__(self) -> dict:
        self.drawn += 1
        rows = next(self._rows)
        rank, ranks = self._part
        return self._collate(rows[rank::ranks] or rows)  # a batch shorter than the ranks: each takes it whole
