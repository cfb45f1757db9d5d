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

import torch

from ..losses import response_loss, token_logprobs
from ..weights import Scaled, frozen, global_norm, gradient, perturbed, same_randomness
from .dropout_masks import DropoutMasks
from .safety_loss import contrastive_safety_loss, safety_counts
from .shared_forward import SharedLowerForward
from .shared_prompt import SharedPromptPass


def safety_direction(model, params: list, pair_batch: dict | list, loss_kind: str = "paper",
                     shared: SharedPromptPass | None = None):
    """Step 1: s = grad_W L_safety(W) over the trainable tensors (the gradients being accumulated in .grad are left as
    they are). Returns (s, L_safety).

    `pair_batch` may be a list of chunks of one safety batch: s is then the gradient of the whole batch's loss,
    one chunk's graph at a time (the memory of one chunk). With `shared`, each pair's prompt runs once for both
    answers (see `shared_prompt`)."""
    chunks = pair_batch if isinstance(pair_batch, list) else [pair_batch]
    counts, logprobs = safety_counts(chunks), shared.logprobs if shared else token_logprobs
    s, total = None, 0.0
    for chunk in chunks:
        loss = contrastive_safety_loss(model, chunk, loss_kind, logprobs, counts)
        grads = gradient(loss, params)
        s = grads if s is None else torch._foreach_add(s, grads)
        total = total + loss.detach()
    return s, total


def perturbation(params: list, s: list, eps: float, eps_mode: str) -> tuple[Scaled, float]:
    """dW = eps_abs * s / ||s|| in fp32, with eps_abs = eps or eps * ||W||."""
    s_norm = global_norm(s)
    eps_abs = eps * float(global_norm(params)) if eps_mode == "relative" else eps
    if eps_abs == 0 or s_norm == 0:
        return Scaled(s, 0.0), 0.0
    return Scaled(s, eps_abs / float(s_norm)), eps_abs


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
