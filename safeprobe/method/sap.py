"""Safety-Aware Probing (SAP), Algorithm 1 of arXiv 2505.16737, one step per useful batch B:

    1. s = grad_W L_safety(W)            on a batch of safety pairs, probe off;  dW = eps * s / ||s||
    2. V = 0
    3. g_V = grad_V L(W + dW, V; B) - grad_V L(W, V; B)     (two passes, same dropout masks, grads of V only)
    4. V_safe = beta * g_V                                   (one ascent step on L_su = L(W+dW) - L(W))
    5. g_W = grad_W L(W, V_safe; B), then the optimiser step; the probe is gone afterwards.

To first order, g_W(V_safe) = g_W(0) + beta * eps * J J^T s_hat with J = d(grad_W L)/dV: the SFT step plus a
descent step on L_safety preconditioned by the PSD matrix J J^T. With eps = 0 or beta = 0, SAP is SFT.
Steps 1-4 live here; step 5 is the ordinary training step, taken by the trainer with the probe active.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .config import SafeprobeConfig, _help, check_choice, check_minimum
from .dropout_masks import DropoutMasks
from .losses import contrastive_safety_loss, response_loss, safety_counts, token_logprobs
from .probe import parse_layers
from .shared_forward import SharedLowerForward
from .shared_prompt import SharedPromptPass

EPS_MODES = ("relative", "absolute")
SAFETY_LOSSES = ("paper", "dpo")
MODES = ("paper", "reference")


def default_safety_batch_size(task_batch_size: int) -> int:
    """Safety pairs per step when none is given: as many safety sequences (a safe and a harmful answer per pair) as
    task examples, so that step 1 costs about one task batch."""
    return max(1, task_batch_size // 2)


@dataclass
class SAPConfig(SafeprobeConfig):
    """Every setting of an SAP run: `trl.SFTConfig`'s (see `SafeprobeConfig` for the defaults changed) plus SAP's."""

    eps: float = _help("size of the harmful perturbation dW (relative: a fraction of ||W_trainable||)", 0.01)
    eps_mode: str = _help("relative (eps * ||W_trainable||, the authors' code) or absolute (eps)", "relative")
    beta: float = _help("probe ascent step: V_safe = beta * g_V (paper default 0.05)", 0.05)
    probe_layers: str = _help("probed decoder layers: middle (the paper's 11..20 of 32, scaled), all, '3,9', "
                              "'10:20' or '0.3:0.6'", "middle")
    probe_norm: float | None = _help("rescale V_safe to this global L2 norm instead of beta * |g_V|")
    safety_loss: str = _help("paper (L(safe) - L(harmful), mean losses) or dpo (the authors' -logsigmoid margin)",
                             "paper")
    safety_every: int = _help("recompute the safety direction s every K steps, reuse it in between", 1)
    probe_every: int = _help("recompute V_safe every K steps, reuse it in between (amortised SAP)", 1)
    mode: str = _help("paper (Algorithm 1) or reference (the authors' lagged-probe schedule)", "paper")
    probe_lr: float = _help("reference mode only: AdamW learning rate of the probe", 0.05)
    safety_batch_size: int | None = _help("safety pairs per step (None: half the task batch, as many safety sequences "
                                          "as task examples; a larger batch runs in chunks of the task batch)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("eps", "beta", "probe_lr"):
            check_minimum(self, name, 0)
        for name in ("safety_every", "probe_every"):
            check_minimum(self, name, 1)
        for name, valid in (("eps_mode", EPS_MODES), ("safety_loss", SAFETY_LOSSES), ("mode", MODES)):
            check_choice(self, name, valid)
        if self.probe_norm is not None:
            check_minimum(self, "probe_norm", 0)
        if self.safety_batch_size is None:  # resolved here, so that the saved arguments record what the run used
            self.safety_batch_size = default_safety_batch_size(self.per_device_train_batch_size)
        check_minimum(self, "safety_batch_size", 1)
        parse_layers(self.probe_layers)  # the syntax now; the indices against the model's depth once it loads


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp16/fp32 tensors, unchanged for fp64: the perturbation arithmetic never loses bits."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def global_norm(tensors) -> torch.Tensor:
    """One L2 norm over all tensors, in at least fp32 (fused multi-tensor kernels: no per-tensor launches)."""
    tensors = [t.detach() for t in tensors]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)))


def safety_direction(model, params: list, pair_batch: dict | list, loss_kind: str = "paper",
                     shared: SharedPromptPass | None = None):
    """Step 1: s = grad_W L_safety(W) over the trainable tensors (no .grad is touched). Returns (s, L_safety).

    `pair_batch` may be a list of chunks of one safety batch: s is then the gradient of the whole batch's loss,
    one chunk's graph at a time (the memory of one chunk). With `shared`, each pair's prompt runs once for both
    answers (see `shared_prompt`)."""
    chunks = pair_batch if isinstance(pair_batch, list) else [pair_batch]
    counts, logprobs = safety_counts(chunks), shared.logprobs if shared else token_logprobs
    s, total = None, 0.0
    for chunk in chunks:
        loss = contrastive_safety_loss(model, chunk, loss_kind, logprobs, counts)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [at_least_fp32(torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)]
        s = grads if s is None else torch._foreach_add(s, grads)
        total = total + loss.detach()
    return s, total


@dataclass(frozen=True)
class Scaled:
    """dW = scale * direction, kept factored: the product, as large as the trainable weights, is never stored."""

    direction: list
    scale: float


def perturbation(params: list, s: list, eps: float, eps_mode: str) -> tuple[Scaled, float]:
    """dW = eps_abs * s / ||s|| in fp32, with eps_abs = eps or eps * ||W||."""
    s_norm = global_norm(s)
    eps_abs = eps * float(global_norm(params)) if eps_mode == "relative" else eps
    if eps_abs == 0 or s_norm == 0:
        return Scaled(s, 0.0), 0.0
    return Scaled(s, eps_abs / float(s_norm)), eps_abs


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


def probe_gradient(model, probe, params: list, delta: list, batch: dict, seed: int | None = None,
                   at: list | None = None, shared: SharedLowerForward | None = None,
                   masks: DropoutMasks | None = None):
    """Steps 2-3: g_V at V = 0 (or at `at`) from a perturbed and a clean pass that differentiate only the probe.

    Both passes draw the dropout masks of `seed` (None: of the current RNG state, those of step 5). With
    `shared`, the clean pass keeps its lower layers' forward for step 5 to reuse (see `shared_forward`); with
    `masks`, the perturbed pass keeps its dropout masks for the clean pass and step 5 (see `dropout_masks`).
    Returns (g_V, L(W, V), L(W + dW, V)); the two losses give the L_su estimate for free.
    """
    device = batch["input_ids"].device
    masks = masks or DropoutMasks(model, enabled=False)
    V = [v.detach().clone().requires_grad_(True) for v in at] if at is not None \
        else probe.zeros(batch["input_ids"], requires_grad=True)
    with probe.active(V):
        with same_randomness(seed, device), frozen(params), perturbed(params, delta), masks.recorded(batch):
            loss_perturbed = response_loss(model, batch)
            g_perturbed = torch.autograd.grad(loss_perturbed, V)
        # the clean pass comes second: a graph it keeps for step 5 forbids changing the weights in place after it
        with same_randomness(seed, device), masks.replayed(batch), _clean_pass(params, batch, shared):
            loss_clean = response_loss(model, batch)
            g_clean = torch.autograd.grad(loss_clean, V)
    g_V = [a - b for a, b in zip(g_perturbed, g_clean)]
    return g_V, loss_clean.detach(), loss_perturbed.detach()


def _clean_pass(params: list, batch: dict, shared: SharedLowerForward | None):
    """No graph for the weights, unless the lower layers' graph is kept for step 5 (the upper layers' graph is
    then recorded too, and freed by the probe's backward)."""
    return shared.record(batch) if shared is not None and shared.supported else frozen(params)


def safe_probe(g_V: list, beta: float, probe_norm: float | None = None) -> list:
    """Step 4: V_safe = beta * g_V (optionally rescaled to a fixed global norm)."""
    if probe_norm is not None:
        norm = global_norm(g_V)
        return [g * (probe_norm / norm) if norm > 0 else torch.zeros_like(g) for g in g_V]
    return [beta * g for g in g_V]
