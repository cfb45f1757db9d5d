"""Losses shared by every method: the teacher-forced response loss and per-token log-probabilities."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and the response mask, shape [batch, seq-1].

    The vocabulary head runs only at the positions that predict a response token (it dominates the cost of
    small models, and prompts, padding and short answers beside long ones would otherwise be scored too);
    the result is exact because the other positions carry no label.
    """
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    rows, cols = mask.nonzero(as_tuple=True)
    with head_only_at(model, rows, cols):
        # [labelled positions, vocab]; squeeze is a view both ways ([0] would zero-fill a logits-sized gradient)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**inputs, use_cache=False).logits.squeeze(0)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 softmax even under bf16
    logp = -F.cross_entropy(logits, targets[rows, cols], reduction="none")
    return logp.new_zeros(mask.shape).index_put((rows, cols), logp), mask


@contextlib.contextmanager
def head_only_at(model, rows: torch.Tensor, cols: torch.Tensor):
    """Feed the output head the hidden states at (rows, cols) only, as one sequence: logits [1, n, vocab].

    A pre-hook on the head rather than our own head call, so whatever the model applies after its head
    (logit scaling, soft-capping) still applies.
    """
    head = getattr(model, "module", model).get_output_embeddings()  # `module`: a DDP-wrapped model
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][rows, cols].unsqueeze(0), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def response_loss(model, batch: dict) -> torch.Tensor:
    """Mean token cross-entropy over the response tokens of the batch."""
    logp, mask = token_logprobs(model, batch)
    return -logp.sum() / mask.sum().clamp_min(1)
