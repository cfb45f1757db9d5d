"""What every method's trainer shares: the response loss and a per-step JSONL log of method scalars."""
from __future__ import annotations

import math
from pathlib import Path

from transformers import Trainer, TrainerCallback

from ..io import append_jsonl
from .losses import response_loss


class SafeprobeTrainer(Trainer):
    """A `transformers.Trainer` whose loss is the mean token cross-entropy on response tokens.

    Subclasses add their method by overriding `training_step` and report scalars with `record(**stats)`:
    they are averaged into the Trainer log and written, one line per optimiser step, to `step_log`.
    """

    method_name = "sft"
    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; Trainer divides by GA steps

    def __init__(self, *args, step_log: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.step_log = Path(step_log) if step_log else None
        self._step_stats: dict[str, list[float]] = {}
        self._window_stats: dict[str, list[float]] = {}
        self.add_callback(_FlushStepStats(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = response_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.record(task_loss=float(loss) * self.current_gradient_accumulation_steps)
        return loss

    def record(self, **stats) -> None:
        for key, value in stats.items():
            if value is not None:
                self._step_stats.setdefault(key, []).append(float(value))

    def before_optimizer_step(self) -> None:
        """Hook for subclasses: gradients of the step are complete, the optimiser has not stepped yet."""

    def end_of_step(self) -> dict:
        """Average this optimiser step's scalars, write them to the JSONL log and keep them for `log`."""
        row = {k: sum(v) / len(v) for k, v in self._step_stats.items() if v}
        self._step_stats = {}
        if row and self.step_log is not None and self.is_world_process_zero():
            append_jsonl(self.step_log, {"step": self.state.global_step, "method": self.method_name, **row})
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


class _FlushStepStats(TrainerCallback):
    def __init__(self, trainer: SafeprobeTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.before_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_of_step()
