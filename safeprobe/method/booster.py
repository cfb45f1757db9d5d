"""Booster (Huang et al., ICLR 2025, "Booster: Tackling Harmful Fine-tuning for Large Language Models via
Attenuating Harmful Perturbation"): an alignment-stage defense. The alignment loss gets a regulariser

    lambda * [h(w) - h(w - a * grad h(w) / ||grad h(w)||)]

where h is the loss on harmful (prompt, harmful answer) data: it penalises how much one normalised harmful
fine-tuning step would lower the harmful loss, so that later harmful fine-tuning makes slow progress.

The gradient is the paper's first-order one, as in the authors' code (no second derivatives):

    grad = grad L_align(w) + lambda * [grad h(w) - grad h(w')],   w' = w - a * grad h(w) / ||grad h(w)||

Per micro-batch: grad h at w on a harmful batch; w' simulated (each parameter holds w' inside the block and gets
its own tensor back after, bit-exact, no copy of the weights); grad h at w' on the same batch with the same dropout
masks. The two harmful passes use `torch.autograd.grad` and never touch `.grad`; the correction enters the ordinary
alignment backward as a term whose value is 0 and whose gradient is lambda * [grad h(w) - grad h(w')], so gradient
accumulation and DDP treat it like the loss. lambda = 0 gives the plain gradient bit for bit (no harmful pass is
run). Defaults lambda = 5, a = 0.1 (the paper's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tokenize import collator
from .base import EndlessBatches, SafeprobeTrainer, all_finite
from .config import SafeprobeConfig, _help, check_minimum
from .registry import ALIGN, DataRole, Method, register
from .losses import response_loss
from .weights import Scaled, at_least_fp32, check_shardable, global_norm, perturbed, same_randomness


def loss_gradient(model, params: list, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(h, grad h) on `batch` over `params`, in at least fp32, without touching `.grad`."""
    loss = response_loss(model, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [at_least_fp32(torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)]


def booster_correction(model, params: list, batch: dict, alpha: float) -> tuple[list[torch.Tensor], dict]:
    """grad h(w) - grad h(w - alpha * grad h(w) / ||grad h(w)||) and the scalars worth logging."""
    device = batch["input_ids"].device
    with same_randomness(None, device):
        h, grad_h = loss_gradient(model, params, batch)
    norm = global_norm(grad_h)
    step = Scaled(grad_h, -alpha / float(norm)) if norm > 0 else Scaled(grad_h, 0.0)
    with same_randomness(None, device), perturbed(params, step):  # the same dropout masks as the first pass
        h_after, grad_after = loss_gradient(model, params, batch)
    torch._foreach_sub_(grad_h, grad_after)  # in place: full fine-tuning keeps only two gradient-sized buffers
    return grad_h, {"harmful_loss": h, "harmful_loss_after_step": h_after, "booster_gap": h - h_after,
                    "harmful_grad_norm": norm}


def zero_valued_term(params: list, direction: list) -> torch.Tensor:
    """<W, d> - <W, d>.detach(): value 0, gradient d with respect to W (d is a constant)."""
    dot = sum((p * d.to(p.dtype)).sum() for p, d in zip(params, direction))
    return dot - dot.detach()


@dataclass
class BoosterConfig(SafeprobeConfig):
    """Every setting of a Booster alignment: `trl.SFTConfig`'s (see `SafeprobeConfig`) plus Booster's."""

    booster_lambda: float = _help("weight of the harmful-perturbation regulariser", 5.0)
    booster_alpha: float = _help("size of the simulated harmful step", 0.1)

    def __post_init__(self):
        super().__post_init__()
        check_minimum(self, "booster_lambda", 0)
        check_minimum(self, "booster_alpha", 0)


class BoosterTrainer(SafeprobeTrainer):
    method_name = "booster"
    config_class = BoosterConfig

    def __init__(self, *args, harmful_dataset=None, harmful_batch_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_shardable(self, "Booster", fsdp2=False)
        if not harmful_dataset:
            raise ValueError("BoosterTrainer needs a harmful_dataset (encoded prompt -> harmful answer examples)")
        self.lamb, self.alpha = self.args.booster_lambda, self.args.booster_alpha
        self._harmful_dataset = harmful_dataset
        self._harmful_batch_size = harmful_batch_size or self.args.per_device_train_batch_size
        self._harmful = self._harmful_stream()
        self._correction = None  # set for the duration of one training step

    def _harmful_stream(self, skip: int = 0) -> EndlessBatches:
        return EndlessBatches(self._harmful_dataset, self._harmful_batch_size, self.args.seed + 2,
                              collator(self.processing_class), skip)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.lamb > 0:
            batch = self._prepare_inputs(next(self._harmful))
            with self.accelerator.no_sync(model):
                correction, stats = booster_correction(model, self.trainable_params, batch, self.alpha)
            self.record(**stats)
            if all_finite([stats["harmful_loss"], stats["harmful_loss_after_step"], *correction]):
                self._correction = correction
            else:
                self.flag_bad_step("harmful-loss gradient")
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._correction = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self._correction is not None:
            loss = loss + self.lamb * zero_valued_term(self.trainable_params, self._correction)
        return (loss, None) if return_outputs else loss

    def method_state(self) -> dict:
        return {**super().method_state(), "harmful_batches_drawn": self._harmful.drawn}

    def load_method_state(self, state: dict) -> None:
        super().load_method_state(state)
        self._harmful = self._harmful_stream(skip=state["harmful_batches_drawn"])


register(Method("booster", BoosterTrainer, stage=ALIGN, summary="attenuating harmful perturbation (Huang et al. 2025)",
                data=(DataRole("harmful_dataset", "harmful_data", "n_harmful", "harmful examples", "harmful"),)))
