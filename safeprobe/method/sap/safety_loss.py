"""L_safety, the loss whose gradient is SAP's safety direction s: the safe answer's loss minus the harmful one's
(paper), or the authors' DPO-style margin."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import IGNORE, token_logprobs


def safety_counts(pair_batches: list[dict]) -> tuple[int, int, int]:
    """(pairs, labelled safe tokens, labelled harmful tokens) over the chunks of one safety batch: the
    denominators of L_safety, so that the chunks' losses add up to the loss of the whole batch."""
    pairs = safe = harmful = 0
    for batch in pair_batches:
        n, labelled = batch["n_pairs"], batch["labels"][:, 1:] != IGNORE
        pairs, safe, harmful = pairs + n, safe + int(labelled[:n].sum()), harmful + int(labelled[n:].sum())
    return pairs, max(safe, 1), max(harmful, 1)


def contrastive_safety_loss(model, pair_batch: dict, kind: str = "paper", logprobs=token_logprobs,
                            counts: tuple[int, int, int] | None = None) -> torch.Tensor:
    """L_safety: lower = the model prefers the safe answer. `pair_batch` holds n safe rows then n harmful rows;
    `logprobs(model, pair_batch)` scores them (token_logprobs, or the shared-prompt pass of SAP step 1).

    paper: L(D_safe) - L(D_harmful), each a mean token loss (docs/sap.md).
    dpo:   the authors' code, -log sigmoid(sum log p(safe) - sum log p(harmful)), mean over pairs
           (no length normalisation; saturates, kept as an option).
    With `counts` (`safety_counts` of every chunk of a larger batch) the means are over that whole batch: this
    chunk's share of its loss.
    """
    n = pair_batch["n_pairs"]
    pairs, safe_tokens, harmful_tokens = counts or safety_counts([pair_batch])
    logp, _ = logprobs(model, pair_batch)
    if kind == "paper":
        return logp[n:].sum() / harmful_tokens - logp[:n].sum() / safe_tokens
    if kind == "dpo":
        margin = logp[:n].sum(dim=1) - logp[n:].sum(dim=1)
        return -F.logsigmoid(margin).sum() / pairs
    raise ValueError(f"unknown safety loss '{kind}'")
