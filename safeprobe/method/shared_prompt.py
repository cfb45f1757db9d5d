"""SAP step 1 with one forward of each safety pair's prompt for both of its answers.

A safety pair's safe and harmful answers follow the same prompt, and with the chat template the prompt is often
the longer part; padding both answers to the longest row of the batch wastes more. The pair collator also lays
the batch out as common prefixes and continuations (`data.tokenize.shared_prompt_layout`): the prefixes run once
and fill a KV cache, which is repeated for the safe and the harmful row of each pair, and the continuations run
on top of it. Gradients flow through the cache, so s is the gradient of the same loss over fewer tokens (on
PKU-SafeRLHF pairs with the SmolLM2 template, 2 pairs a batch: 0.81x the tokens and 0.91x the time of the padded
batch, `benchmarks/safety_pass.py`).

Without dropout the answers' log-likelihoods equal those of the padded batch up to rounding. With dropout the
two answers of a pair see the same masks over their prompt, as they see the same prompt.

Not every model continues a cache in a training forward (gradient checkpointing turns the cache off; some
architectures bring caches of their own), so the first batch is checked once, in eval mode and without
gradients, against the padded batch; a mismatch falls back to the padded batch for the rest of the run, with
a warning. The check draws no random numbers.
"""
from __future__ import annotations

import logging

import torch
from transformers import DynamicCache

from ..model.compat import cache_kwarg
from .losses import head_only_at, token_logprobs

log = logging.getLogger(__name__)


class SharedPromptPass:
    """`logprobs(model, pair_batch)` for `contrastive_safety_loss`: shared prompts once verified, else padded."""

    def __init__(self, enabled: bool = True):
        self.verified = None if enabled else False  # None: not checked yet

    def logprobs(self, model, pair_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        shared = pair_batch.get("shared_prompt")
        if shared is None or self.verified is False or not _within_window(model, shared):
            return token_logprobs(model, pair_batch)
        if self.verified is None:
            self.verified = _agrees_with_padded(model, pair_batch)
            if not self.verified:
                log.warning("this model does not reproduce the safety pairs' log-likelihoods through a shared "
                            "prompt cache; SAP's safety pass uses the padded batch")
                return token_logprobs(model, pair_batch)
        return shared_prompt_logprobs(model, shared)


def shared_prompt_logprobs(model, shared: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and mask of the continuations, [2n, length - 1], after one pass over the prefixes."""
    core = getattr(model, "module", model)  # DDP
    cache = DynamicCache(config=core.config)
    no_position = torch.empty(0, dtype=torch.long, device=shared["prefix_ids"].device)
    with head_only_at(model, no_position, no_position):  # the prefixes predict no label: no vocabulary head
        model(input_ids=shared["prefix_ids"], attention_mask=shared["prefix_mask"],
              position_ids=shared["prefix_positions"], use_cache=True, **{cache_kwarg(model): cache})
    n = shared["prefix_ids"].shape[0]
    rows = torch.arange(n, device=shared["prefix_ids"].device).repeat(2)  # pair i -> rows i and n + i
    cache.reorder_cache(rows)
    attention = torch.cat([shared["prefix_mask"][rows], shared["attention_mask"]], dim=1)
    return token_logprobs(model, {**shared, "attention_mask": attention, "kv_cache": cache})


def _within_window(model, shared: dict) -> bool:
    """A sliding window counts cache slots, and the prompts' padding sits between a prompt and its answers: only
    a layout no longer than the window is sure to attend as the padded batch does."""
    window = getattr(getattr(model, "module", model).config, "sliding_window", None)
    return not window or shared["prefix_ids"].shape[1] + shared["input_ids"].shape[1] <= window


def _agrees_with_padded(model, pair_batch: dict) -> bool:
    """Same mean log-likelihood per answer, and the same number of scored tokens, as the padded batch."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded, padded_mask = token_logprobs(model, pair_batch)
            shared, shared_mask = shared_prompt_logprobs(model, pair_batch["shared_prompt"])
    except Exception as error:  # noqa: BLE001 - any failure of the cached path means: do not use it
        log.debug("shared-prompt pass failed: %r", error)
        return False
    finally:
        model.train(training)
    counts = padded_mask.sum(1)
    if not torch.equal(counts, shared_mask.sum(1)):
        return False
    mean = lambda logp, mask: (logp * mask).sum(1) / counts.clamp_min(1)  # noqa: E731
    device = padded.device.type
    half = torch.is_autocast_enabled(device) or \
        any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    return bool(torch.allclose(mean(shared, shared_mask), mean(padded, padded_mask), rtol=0,
                               atol=5e-2 if half else 1e-4))
