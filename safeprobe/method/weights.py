"""Weight-space arithmetic shared by the methods that perturb weights (SAP, Vaccine, Booster): gradients, global
norms and dot products in at least fp32, a perturbation applied inside a block and restored bit-exactly, frozen
weights, replayed randomness.

Under FSDP2 the trainable weights are `DTensor` shards: the forward all-gathers them into unsharded copies, so
`autograd.grad` of a loss gives None for the shards and a new tensor assigned to a shard never reaches the copy.
Each function here therefore has a sharded path: gradients come from a backward into the shards' `.grad` (FSDP
reduce-scatters them, averaged over ranks; the `.grad` being accumulated is set aside and put back), a
perturbation is written into the local shards in place (and copied back exactly), and norms and dot products add
the local shards' squares and products over the ranks."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp16/fp32 tensors, unchanged for fp64: the perturbation arithmetic never loses bits."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def is_sharded(tensors) -> bool:
    """True if the tensors are FSDP2 shards (`DTensor`s)."""
    return any(isinstance(t, DTensor) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: its local shard for a `DTensor`, `t` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a `DTensor` (a collective call), `t` itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(tensors: list | None, params: list) -> list | None:
    """`tensors` (whole, one per parameter) placed as `params` are: each rank's shard where they are sharded."""
    if tensors is None or not is_sharded(params):
        return tensors
    return [t if isinstance(t, DTensor) or not isinstance(p, DTensor) else
            distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            for t, p in zip(tensors, params)]


def global_norm(tensors) -> torch.Tensor:
    """One L2 norm over all tensors, in at least fp32 (fused multi-tensor kernels: no per-tensor launches)."""
    tensors = [t.detach() for t in tensors]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    if is_sharded(tensors):
        return _summed_over_shards(tensors, lambda ts: torch.stack(torch._foreach_norm(ts, 2, dtype=dtype))
                                   .square().sum()).sqrt()
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)))


def global_dot(a: list, b: list) -> torch.Tensor:
    """sum_i <a_i, b_i> over two lists of same-shaped tensors, in fp32 at least."""
    if is_sharded(a):
        return _summed_over_shards(list(zip(a, b)), lambda pairs: _dot([x for x, _ in pairs], [y for _, y in pairs]))
    return _dot(a, b)


def _dot(a: list, b: list) -> torch.Tensor:
    return sum((at_least_fp32(x) * at_least_fp32(y)).sum() for x, y in zip(a, b))


def _summed_over_shards(items: list, partial_sum) -> torch.Tensor:
    """partial_sum over this rank's local parts, summed over the ranks for the sharded items (each rank holds a
    distinct shard of a `DTensor`) and counted once for the others (the same on every rank)."""
    first = lambda item: item[0] if isinstance(item, tuple) else item  # noqa: E731
    sharded = [item for item in items if isinstance(first(item), DTensor)]
    whole = [item for item in items if not isinstance(first(item), DTensor)]
    locals_ = [tuple(local(t) for t in item) if isinstance(item, tuple) else local(item) for item in sharded]
    total = partial_sum(locals_)
    dist.all_reduce(total, group=_shard_group(first(sharded[0])))
    return total + partial_sum(whole) if whole else total


def everywhere(flag: torch.Tensor, tensors: list) -> torch.Tensor:
    """A boolean `flag` computed on this rank's shards of `tensors`, true only if it holds on every rank."""
    if not is_sharded(tensors):
        return flag
    flag = flag.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_shard_group(next(t for t in tensors if isinstance(t, DTensor))))
    return flag.bool()


def _shard_group(t: DTensor):
    if t.device_mesh.ndim != 1 or not all(p.is_shard() for p in t.placements):
        raise NotImplementedError("weights sharded over a multi-dimensional mesh (HSDP) or replicated are not "
                                  "supported; use FSDP2's fully_shard over one mesh dimension")
    return t.device_mesh.get_group()


def gradient(loss: torch.Tensor, params: list) -> list:
    """d loss / d params in at least fp32 (zeros where unused), leaving the gradients being accumulated in `.grad`
    as they are. Sharded weights: from a backward into the shards (averaged over ranks by FSDP)."""
    if not is_sharded(params):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [at_least_fp32(torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)]
    accumulated = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        return [at_least_fp32(torch.zeros_like(p) if p.grad is None else p.grad) for p in params]
    finally:
        for p, g in zip(params, accumulated):
            p.grad = g


def check_shardable(trainer, method: str, fsdp2: bool = True) -> None:
    """The weight-space steps run on FSDP2's shards (see above). Under FSDP1 (flat parameters) they would compute
    nothing, and DeepSpeed's engine keeps the gradients in its own partitioned buffers and runs its reduction hooks
    after any backward, `autograd.grad` included. Refuse those (and FSDP2 where `fsdp2` is False), naming the
    supported ways."""
    version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) if trainer.is_fsdp_enabled else 0
    refused = "DeepSpeed" if trainer.is_deepspeed_enabled else {1: "FSDP1", 2: None if fsdp2 else "FSDP2"}.get(version)
    if refused:
        ways = "FSDP2 (fsdp_config: fsdp_version: 2) or DDP" if fsdp2 else "DDP"
        raise ValueError(f"{method} does not run under {refused}: its weight-space steps need {ways}")


@dataclass(frozen=True)
class Scaled:
    """dW = scale * direction, kept factored: the product, as large as the trainable weights, is never stored."""

    direction: list
    scale: float


@contextlib.contextmanager
def perturbed(params: list, delta: Scaled | list):
    """W <- W + dW (in at least fp32) inside the block: each parameter holds a new tensor W + dW, and gets its
    own tensor back on exit, bit-exact and without a copy of the weights. Sharded weights: W + dW is written into
    each local shard and the shard copied back on exit (a copy of this rank's shards only)."""
    delta = delta if isinstance(delta, Scaled) else Scaled(delta, 1.0)
    if is_sharded(params):
        with _perturbed_in_place([local(p) for p in params], Scaled([local(d) for d in delta.direction],
                                                                    delta.scale)):
            yield
        return
    originals = [p.data for p in params]
    if delta.scale != 0:
        for p, moved in zip(params, _moved(params, delta)):
            p.data = moved
    try:
        yield
    finally:
        for p, original in zip(params, originals):
            p.data = original


@contextlib.contextmanager
def _perturbed_in_place(shards: list, delta: Scaled):
    if delta.scale == 0:
        yield
        return
    with torch.no_grad():
        saved = [t.clone() for t in shards]
        for t, moved in zip(shards, _moved(shards, delta)):
            t.copy_(moved)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, original in zip(shards, saved):
                t.copy_(original)


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
