"""Weight-space arithmetic shared by the methods that perturb weights (SAP, Vaccine, Booster): global norms in at
least fp32, a perturbation applied inside a block and restored bit-exactly, frozen weights, replayed randomness."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp16/fp32 tensors, unchanged for fp64: the perturbation arithmetic never loses bits."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def global_norm(tensors) -> torch.Tensor:
    """One L2 norm over all tensors, in at least fp32 (fused multi-tensor kernels: no per-tensor launches)."""
    tensors = [t.detach() for t in tensors]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)))


def check_unsharded(trainer, method: str) -> None:
    """A method that differentiates and perturbs the trainable weights directly needs them whole on every rank:
    under FSDP or DeepSpeed ZeRO-3 each rank holds shards, `autograd.grad` of a loss gives None for them and a new
    shard tensor never reaches the all-gathered copy, so the method would silently compute nothing. Refuse."""
    zero3 = trainer.is_deepspeed_enabled and getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
    if trainer.is_fsdp_enabled or zero3:
        raise ValueError(f"{method} does not run with sharded weights (FSDP or DeepSpeed ZeRO-3) yet: its "
                         "weight-space steps need every trainable weight whole on each rank; use DDP (accelerate "
                         "launch without FSDP), or ZeRO-2")


@dataclass(frozen=True)
class Scaled:
    """dW = scale * direction, kept factored: the product, as large as the trainable weights, is never stored."""

    direction: list
    scale: float


@contextlib.contextmanager
def perturbed(params: list, delta: Scaled | list):
    """W <- W + dW (in at least fp32) inside the block: each parameter holds a new tensor W + dW, and gets its
    own tensor back on exit, bit-exact and without a copy of the weights."""
    delta = delta if isinstance(delta, Scaled) else Scaled(delta, 1.0)
    originals = [p.data for p in params]
    if delta.scale != 0:
        for p, moved in zip(params, _moved(params, delta)):
            p.data = moved
    try:
        yield
    finally:
        for p, original in zip(params, originals):
            p.data = original


@torch.no_grad()
def _moved(params: list, delta: Scaled) -> list:
    """W + dW for every parameter, rounded once to its dtype (fused for the usual fp32/fp64 parameters)."""
    same = [i for i, (p, d) in enumerate(zip(params, delta.direction)) if p.dtype == d.dtype]
    fused = torch._foreach_add([params[i].detach() for i in same], [delta.direction[i] for i in same],
                               alpha=delta.scale) if same else []
    moved = dict(zip(same, fused))
    return [moved[i] if i in moved else (at_least_fp32(p) + delta.scale * d).to(p.dtype)  # bf16/fp16 weights
            for i, (p, d) in enumerate(zip(params, delta.direction))]


@contextlib.contextmanager
def frozen(params: list):
    """requires_grad off on `params` inside the block, restored exactly on exit.

    For the passes that differentiate only the probe: no graph is recorded for the weights, so the layers
    below the lowest probed layer build none at all and the backward stops there (time and memory).
    """
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def same_randomness(seed: int | None, device: torch.device):
    """Run a pass with a fixed RNG state (same dropout masks) without disturbing the global RNG stream.

    The state is that of `seed`, or with None the current one: the pass draws the masks the next pass will.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield
