"""Vaccine (Huang et al., NeurIPS 2024, "Vaccine: Perturbation-aware Alignment for Large Language Models"):
an alignment-stage defense, a SAM-like step in the space of hidden states. Per batch of alignment data:

1. a first pass takes g_l = dL/dh_l, the gradient of the alignment loss with respect to the output h_l of every
   decoder layer l (weights frozen: no weight gradient is computed in this pass);
2. a second pass adds e_l = rho * g_l / ||g_l|| to each layer's output (forward hooks, removed right after), and
   the weight gradient of the step is taken under these perturbed hidden states.

The model thus learns refusals that survive the worst small drift of its hidden states, the drift that harmful
fine-tuning later causes. Both passes draw the same dropout masks. rho = 0 gives the plain gradient bit for bit.
Default rho = 2, the value of the authors' alignment script.

Where the authors' code differs: it hooks the attention modules of Llama/OPT, and normalises all layers' gradients
jointly. Here the hooks sit on decoder-layer outputs (any architecture whose layers can be found), and each layer's
perturbation has norm rho (`norm="layer"`, the per-layer reading of the method); `norm="global"` normalises all
layers jointly as their code does. The norm runs over the whole [batch, positions, hidden] tensor of a layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .base import SafeprobeTrainer, all_finite
from .config import SafeprobeConfig, _help, check_choice, check_minimum
from .registry import ALIGN, Method, register
from .losses import response_loss
from .sap.probe import Probe  # the same hidden-state hooks: Vaccine perturbs what SAP probes
from .weights import check_shardable, frozen, global_norm, same_randomness

NORMS = ("layer", "global")


@contextlib.contextmanager
def added_to_layer_outputs(model, tensors: list[torch.Tensor]):
    """Every decoder layer's output plus its tensor in `tensors` inside the block; the hooks are gone after."""
    hooks = _layer_hooks(model)
    try:
        with hooks.active(tensors):
            yield
    finally:
        hooks.remove()


def _layer_hooks(model) -> Probe:
    """Inactive hooks on every decoder layer (`module`: through a DDP wrapper). A probe's hooks add a tensor to a
    layer's output; a full [batch, positions, hidden] tensor works as well as its one vector per layer."""
    return Probe(getattr(model, "module", model), "all")


def hidden_state_gradients(model, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(g_l for every decoder layer, the alignment loss): gradients with respect to the layer outputs.

    Zeros added to each layer's output are differentiated instead of the outputs themselves: the gradient is the
    same, and the weights can stay frozen so the pass builds no weight graph.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    probe = _layer_hooks(model)
    try:
        shape = (*batch["input_ids"].shape, probe.hidden_size)
        zeros = [torch.zeros(shape, dtype=probe.dtype, device=batch["input_ids"].device, requires_grad=True)
                 for _ in probe.layers]
        with probe.active(zeros), frozen(params):
            loss = response_loss(model, batch)
            grads = torch.autograd.grad(loss, zeros, allow_unused=True)
    finally:
        probe.remove()
    return [torch.zeros_like(z) if g is None else g for z, g in zip(zeros, grads)], loss.detach()


def perturbations(grads: list[torch.Tensor], rho: float, norm: str = "layer") -> list[torch.Tensor]:
    """e_l = rho * g_l / ||g_l|| (norm="layer") or rho * g_l / ||(g_1..g_L)|| (norm="global"); 0 where g = 0."""
    if norm not in NORMS:
        raise ValueError(f"unknown Vaccine norm '{norm}'; valid choices: {', '.join(NORMS)}")
    norms = [global_norm([g]) for g in grads] if norm == "layer" else [global_norm(grads)] * len(grads)
    return [g * (rho / n) if n > 0 else torch.zeros_like(g) for g, n in zip(grads, norms)]


@dataclass
class VaccineConfig(SafeprobeConfig):
    """Every setting of a Vaccine alignment: `trl.SFTConfig`'s (see `SafeprobeConfig`) plus Vaccine's."""

    rho: float = _help("norm of the hidden-state perturbation (the authors' script: 2)", 2.0)
    vaccine_norm: str = _help("normalise each layer's perturbation (layer) or all layers jointly (global)", "layer")

    def __post_init__(self):
        super().__post_init__()
        check_minimum(self, "rho", 0)
        check_choice(self, "vaccine_norm", NORMS)


class VaccineTrainer(SafeprobeTrainer):
    method_name = "vaccine"
    config_class = VaccineConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_shardable(self, "Vaccine", fsdp2=False)
        self.rho, self.norm = self.args.rho, self.args.vaccine_norm

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = self._prepare_inputs(inputs)
        with self.accelerator.no_sync(model), same_randomness(None, inputs["input_ids"].device):
            grads, loss = hidden_state_gradients(model, inputs)  # draws the dropout masks the second pass will
        self.record(clean_loss=loss, hidden_grad_norm=global_norm(grads))
        if not all_finite([loss, *grads]):
            self.flag_bad_step("hidden-state gradient")  # the step is skipped; take it unperturbed meanwhile
            return super().training_step(model, inputs, num_items_in_batch)
        with added_to_layer_outputs(model, perturbations(grads, self.rho, self.norm)):
            return super().training_step(model, inputs, num_items_in_batch)


register(Method("vaccine", VaccineTrainer, stage=ALIGN, summary="perturbation-aware alignment (Huang et al. 2024)"))
