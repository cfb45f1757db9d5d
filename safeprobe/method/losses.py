"""Losses shared by every method: teacher-forced response loss and the contrastive safety losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


def token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and the response mask, shape [batch, seq-1].

    Logits are only materialised from the first response position on (the vocabulary head dominates the
    cost of small models); the result is exact because earlier positions carry no label.
    """
    labels = batch["labels"]
    has_label = (labels != IGNORE).any(dim=0)
    first = int(has_label.nonzero()[0]) if has_label.any() else labels.shape[1] - 1
    keep = labels.shape[1] - max(first - 1, 0)
    logits = model(**_model_inputs(batch), logits_to_keep=keep).logits
    logits = logits[:, -keep:, :]
    targets = labels[:, labels.shape[1] - keep + 1:]
    logits = logits[:, :-1, :]
    mask = targets != IGNORE
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 softmax even under bf16
    logp = -F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return logp * mask, mask


def response_loss(model, batch: dict) -> torch.Tensor:
    """Mean token cross-entropy over the response tokens of the batch."""
    logp, mask = token_logprobs(model, batch)
    return -logp.sum() / mask.sum().clamp_min(1)


def contrastive_safety_loss(model, pair_batch: dict, kind: str = "paper") -> torch.Tensor:
    """L_safety: lower = the model prefers the safe answer. `pair_batch` holds n safe rows then n harmful rows.

    paper: L(D_safe) - L(D_harmful), each a mean token loss (SAP.md section 2).
    dpo:   the authors' code, -log sigmoid(sum log p(safe) - sum log p(harmful)), mean over pairs
           (no length normalisation; saturates, kept as an option).
    """
    n = pair_batch["n_pairs"]
    logp, mask = token_logprobs(model, pair_batch)
    if kind == "paper":
        safe = -logp[:n].sum() / mask[:n].sum().clamp_min(1)
        harmful = -logp[n:].sum() / mask[n:].sum().clamp_min(1)
        return safe - harmful
    if kind == "dpo":
        margin = logp[:n].sum(dim=1) - logp[n:].sum(dim=1)
        return -F.logsigmoid(margin).mean()
    raise ValueError(f"unknown safety loss '{kind}'")
