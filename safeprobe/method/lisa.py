"""Lisa (Huang et al., NeurIPS 2024, "Lazy Safety Alignment"): bi-state optimisation during fine-tuning.

The run alternates `align_steps` optimiser steps on alignment data (harmful prompt -> refusal) with `task_steps`
steps on the user's data. In each state the loss gets a proximal term rho/2 * ||W - W_anchor||^2, where W_anchor
are the weights at the end of the other state (at the start: the weights fine-tuning began from), so neither
state drifts far from what the other has reached. The paper's default is rho = 1 with 100 alignment steps per 900
task steps; the defaults here keep that 1:9 ratio at a scale that fits short runs.

Under FSDP2 the anchor is held as the weights are, in shards (taken at the first step, once the Trainer has
sharded the model), and the proximal term's norm is reduced over the ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tokenize import collator
from .base import EndlessBatches, SafeprobeTrainer
from .checkpoint import numbered, unnumbered
from .config import SafeprobeConfig, _help, check_minimum
from .registry import DataRole, Method, register
from .weights import check_shardable, global_norm, like


@dataclass
class LisaConfig(SafeprobeConfig):
    """Every setting of a Lisa run: `trl.SFTConfig`'s (see `SafeprobeConfig`) plus Lisa's."""

    rho: float = _help("strength of the proximal term towards the other state's weights", 1.0)
    lisa_align_steps: int = _help("optimiser steps on alignment data per cycle", 10)
    lisa_task_steps: int = _help("optimiser steps on the task data per cycle", 90)

    def __post_init__(self):
        super().__post_init__()
        check_minimum(self, "rho", 0)
        check_minimum(self, "lisa_align_steps", 1)
        check_minimum(self, "lisa_task_steps", 1)


class LisaTrainer(SafeprobeTrainer):
    method_name = "lisa"
    config_class = LisaConfig

    def __init__(self, *args, alignment_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        check_shardable(self, "Lisa")  # the proximal term goes into .grad, which DeepSpeed's engine does not read
        if not alignment_dataset:
            raise ValueError("LisaTrainer needs an alignment_dataset (encoded harmful prompt -> refusal examples)")
        self.rho, self.align_steps, self.task_steps = self.args.rho, self.args.lisa_align_steps, \
            self.args.lisa_task_steps
        self._alignment_dataset = alignment_dataset
        self._alignment = self._alignment_stream()
        self._anchor = None  # W_0, taken at the first step
        self._state = "task"  # the state the anchor was taken at the end of; the first state anchors to W_0

    def _alignment_stream(self, skip: int = 0) -> EndlessBatches:
        # under DDP or FSDP the ranks share one global alignment batch, as they share the task batch
        return EndlessBatches(self._alignment_dataset, self.args.per_device_train_batch_size, self.args.seed + 1,
                              collator(self.processing_class), skip,
                              part=(self.args.process_index, self.args.world_size))

    def state_at(self, step: int) -> str:
        return "align" if step % (self.align_steps + self.task_steps) < self.align_steps else "task"

    def training_step(self, model, inputs, num_items_in_batch=None):
        state = self.state_at(self.state.global_step)
        if self._anchor is None or (state != self._state and self.state.global_step > 0):
            self._anchor = [p.detach().clone() for p in self.trainable_params]  # W_0, or the other state just ended
        self._anchor = like(self._anchor, self.trainable_params)  # resumed under FSDP: this rank's shards
        self._state = state
        if state == "align":  # this step's task batch is set aside; the alignment batch takes its place
            inputs = self._prepare_inputs(next(self._alignment))
        self.record(align_state=float(state == "align"))
        return super().training_step(model, inputs, num_items_in_batch)

    def before_optimizer_step(self) -> None:
        """Add the proximal gradient rho * (W - W_anchor) once per optimiser step (after accumulation)."""
        if self.rho == 0:
            return
        with torch.no_grad():
            diffs = [p - anchor for p, anchor in zip(self.trainable_params, self._anchor)]
            for p, diff in zip(self.trainable_params, diffs):
                p.grad = self.rho * diff if p.grad is None else p.grad.add_(diff, alpha=self.rho)
        self.record(proximal=0.5 * self.rho * float(global_norm(diffs)) ** 2)

    def method_state(self) -> dict:
        return {**super().method_state(), "lisa_state": self._state, "alignment_batches_drawn":
                self._alignment.drawn, **numbered("anchor", self._anchor)}

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        self._state = state["lisa_state"]
        self._alignment = self._alignment_stream(skip=state["alignment_batches_drawn"])
        self._anchor = unnumbered(state, "anchor", self.trainable_params[0].device)  # whole; sharded at the next step


register(Method("lisa", LisaTrainer, summary="bi-state optimisation with a proximal term (Huang et al. 2024)",
                data=(DataRole("alignment_dataset", "alignment_data", "n_safety", "examples", "alignment", None),)))
