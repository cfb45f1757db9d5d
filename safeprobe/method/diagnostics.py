"""The paper's training diagnostics (see docs/sap.md), measured on a fixed probe set every k optimiser steps:

- per decoder layer, cos(grad_W L_useful, grad_W L_harmful) over that layer's trainable tensors (LoRA or full),
  where L_harmful is the loss of harmful answers: positive = descending the task loss also makes harmful answers
  likelier (the paper's Figure 3);
- the loss on harmful answers (falls under plain fine-tuning: their Figure 2) and on held-out useful examples.

Rows go to `diagnostics.jsonl` in the run's output directory, one per measurement (step 0 = before training).
Measuring never disturbs training: the model is put in eval mode (no dropout), gradients are taken with
`torch.autograd.grad` (no `.grad` is touched, the optimiser sees nothing), and every RNG state is restored, so the
trained weights are bit-identical with diagnostics on or off (tested).
"""
from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from ..data import REGISTRY, Example, load_examples, load_pairs, sample
from ..data.tokenize import collator, encode_all
from ..errors import UserError
from ..io import append_jsonl, read_step_log, write_text
from ..model.layers import decoder_layers
from .losses import response_loss

DIAGNOSTICS_FILE = "diagnostics.jsonl"
PROBE_EXAMPLES = 4  # per probe set: a fixed few keeps each measurement at about one training step's cost
PROBE_SEED = 0  # the same probe sets for every run (every method and seed) of a comparison
PROBE_MAX_LENGTH = 256  # independent of the training max_length, so that long safety prompts keep their answers


def held_out_split(name: str) -> str:
    """The registry's test side when the dataset has one (held out from training), else its train side."""
    spec = REGISTRY.get(name)
    return "test" if spec is not None and "test" in spec.files else "train"


def probe_sets(task: str, safety_data: str, tokenizer) -> dict[str, list[dict]]:
    """Encoded probe sets: useful training examples (gradient), held-out useful examples (loss), harmful
    answers of safety pairs from the SAP safety data, held-out side when it has one (gradient and loss)."""
    useful = sample(load_examples(task, "train"), 2 * PROBE_EXAMPLES, PROBE_SEED)
    held_split = held_out_split(task)
    held = load_examples(task, "test")[:PROBE_EXAMPLES] if held_split == "test" else useful[PROBE_EXAMPLES:]
    pairs = sample(load_pairs(safety_data, held_out_split(safety_data)), PROBE_EXAMPLES, PROBE_SEED)
    harmful = [Example(p.messages, p.harmful) for p in pairs]
    sets = {"useful": useful[:PROBE_EXAMPLES], "useful_heldout": held, "harmful": harmful}
    encoded = {name: encode_all(tokenizer, examples, PROBE_MAX_LENGTH, f"diagnostic {name} examples").features
               for name, examples in sets.items()}
    empty = [name for name, features in encoded.items() if not features]
    if empty:
        raise UserError(f"diagnostics: no {', '.join(empty)} example fits in {PROBE_MAX_LENGTH} tokens "
                        f"(task {task}, safety data {safety_data})")
    return encoded


def layer_groups(model) -> list[list[torch.nn.Parameter]]:
    """The trainable tensors of each decoder layer, in layer order."""
    return [[p for p in layer.parameters() if p.requires_grad] for layer in decoder_layers(model)]


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    """cos between two gradients given as lists of tensors (None if either is zero or empty)."""
    if not a:
        return None
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    norm_a = sum(float(x.double().square().sum()) for x in a) ** 0.5
    norm_b = sum(float(y.double().square().sum()) for y in b) ** 0.5
    return dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else None


@contextlib.contextmanager
def undisturbed(model):
    """Eval mode and saved RNG states inside; the model's mode and every RNG stream restored afterwards."""
    was_training = model.training
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def measure(model, batches: dict[str, dict], groups: list[list[torch.nn.Parameter]], autocast=None) -> dict:
    """One diagnostics row: per-layer gradient cosines and the probe losses (gradients via autograd.grad)."""
    params = [p for group in groups for p in group]
    autocast = autocast or contextlib.nullcontext
    grads, losses = {}, {}
    with undisturbed(model):
        for name in ("useful", "harmful"):
            with autocast():
                loss = response_loss(model, batches[name])
            found = torch.autograd.grad(loss, params, allow_unused=True)
            grads[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]
            losses[name] = float(loss.detach())
        with torch.no_grad(), autocast():
            losses["useful_heldout"] = float(response_loss(model, batches["useful_heldout"]))
    per_layer, start = [], 0
    for group in groups:
        end = start + len(group)
        per_layer.append(cosine(grads["useful"][start:end], grads["harmful"][start:end]))
        start = end
    return {"cos_useful_harmful": per_layer, "cos_useful_harmful_all": cosine(grads["useful"], grads["harmful"]),
            "loss_harmful": losses["harmful"], "loss_useful_train": losses["useful"],
            "loss_useful_heldout": losses["useful_heldout"]}


class GradientDiagnostics(TrainerCallback):
    """Every `every` optimiser steps (and once before the first), append a `measure` row to `path`."""

    def __init__(self, trainer, features: dict[str, list[dict]], every: int, path: str | Path):
        self.trainer, self.every, self.path = trainer, every, Path(path)
        pad = collator(trainer.processing_class)
        self.batches = {name: pad(rows) for name, rows in features.items()}
        self.groups = layer_groups(trainer.model)

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.trainer.is_world_process_zero():
            return
        self._forget_rows_after(state.global_step)  # a resumed run redoes the steps after its checkpoint
        if state.global_step == 0:
            self._measure(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.is_world_process_zero() and state.global_step % self.every == 0:
            self._measure(state.global_step)

    def _measure(self, step: int) -> None:
        # the unwrapped model: no DDP hooks fire, and only this rank measures
        model = self.trainer.model
        device = next(model.parameters()).device
        batches = {name: {k: v.to(device) for k, v in batch.items()} for name, batch in self.batches.items()}
        row = measure(model, batches, self.groups, self.trainer.compute_loss_context_manager)
        append_jsonl(self.path, {"step": step, **row})

    def _forget_rows_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [json.dumps(row) + "\n" for row in read_diagnostics(self.path.parent) if row["step"] <= step]
        write_text(self.path, "".join(kept))


def attach_diagnostics(trainer, task: str, safety_data: str, every: int, out: Path) -> None:
    """Switch the diagnostics on for `trainer`: rows go to out/diagnostics.jsonl every `every` steps."""
    features = probe_sets(task, safety_data, trainer.processing_class)
    trainer.add_callback(GradientDiagnostics(trainer, features, every, Path(out) / DIAGNOSTICS_FILE))


def read_diagnostics(folder: str | Path) -> list[dict]:
    """The rows of folder/diagnostics.jsonl (a torn last line is skipped)."""
    return read_step_log(Path(folder) / DIAGNOSTICS_FILE)
