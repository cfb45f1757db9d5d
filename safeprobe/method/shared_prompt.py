"""SAP step 1 with one forward of each safety pair's prompt for both of its answers.

A safety pair's safe and harmful answers follow the same prompt, and with the chat template the prompt is often
the longer part; padding both answers to the longest row of the batch wastes more. The pair collator also lays
the batch out as common prefixes and continuations (`data.tokenize.shared_prompt_layout`): the prefixes run once
and fill a KV cache, which is repeated for the safe and the harmful row of each pair, and the continuations run
on top of it. Gradients flow through the cache, so s is the gradient of the same loss over fewer tokens (on
PKU-SafeRLHF pairs with the SmolLM2 template, 2 pairs a batch: 0.81x the tokens and 0.91x the time of the padded
batch, `benchmarks/safety_pass.py`). When the answers' lengths differ widely (a short refusal beside a long harmful
answer) the continuations run in two groups, short and long, each padded only to its own longest row.

Without dropout the answers' log-likelihoods equal those of the padded batch up to rounding. With dropout the
two answers of a pair see the same masks over their prompt, as they see the same prompt.

Not every model continues a cache in a training forward (gradient checkpointing turns the cache off; some
architectures bring caches of their own), so the first batch is checked once, in eval mode and without
gradients, against the padded batch; a mismatch falls back to the padded batch for the rest of the run, with
a warning. The check draws no random numbers.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
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


def shared_prompt_logprobs(model, shared: dict, groups: list[list[int]] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and mask of the continuations, [2n, length - 1], after one pass over the prefixes.

    The continuations run in `groups` of rows (default `continuation_groups`), each padded only to its own
    longest row and continuing its own copy of the prefixes' cache; gradients reach the prefixes through all."""
    core = getattr(model, "module", model)  # DDP
    cache = DynamicCache(config=core.config)
    no_position = torch.empty(0, dtype=torch.long, device=shared["prefix_ids"].device)
    with head_only_at(model, no_position, no_position):  # the prefixes predict no label: no vocabulary head
        model(input_ids=shared["prefix_ids"], attention_mask=shared["prefix_mask"],
              position_ids=shared["prefix_positions"], use_cache=True, **{cache_kwarg(model): cache})
    n, length = shared["prefix_ids"].shape[0], shared["input_ids"].shape[1]
    lengths = shared["attention_mask"].sum(1).tolist()
    groups = groups or continuation_groups(lengths)
    pieces = []
    for i, group in enumerate(groups):
        rows = torch.tensor(group, device=no_position.device)
        width = _width(lengths, group)  # right-padded: the first `width` columns hold every real token
        part = {k: shared[k][rows, :width] for k in ("input_ids", "labels", "attention_mask", "position_ids")}
        attention = torch.cat([shared["prefix_mask"][rows % n], part["attention_mask"]], dim=1)
        rows_cache = _cache_rows(cache, rows % n, keep_original=i < len(groups) - 1)  # pair i -> rows i, n + i
        logp, mask = token_logprobs(model, {**part, "attention_mask": attention, "kv_cache": rows_cache})
        pieces.append((F.pad(logp, (0, length - width)), F.pad(mask, (0, length - width))))
    back = torch.argsort(torch.tensor([r for group in groups for r in group], device=no_position.device))
    return torch.cat([p for p, _ in pieces])[back], torch.cat([m for _, m in pieces])[back]


def continuation_groups(lengths: list[int]) -> list[list[int]]:
    """The continuations' rows as one group, or as two by length (short, long) when that cuts the tokens they
    are padded to by a quarter or more: refusals are often much shorter than the harmful answers beside them.
    A second group costs a second, smaller pass."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    longest, rows = lengths[order[-1]], len(order)
    padded = lambda k: k * lengths[order[k - 1]] + (rows - k) * longest  # noqa: E731 - the first k rows apart
    k = min(range(1, rows), key=padded, default=rows)
    if k == rows or padded(k) > 0.75 * rows * longest:
        return [list(range(rows))]
    return [order[:k], order[k:]]


def layout_tokens(shared: dict) -> int:
    """How many tokens the shared-prompt pass feeds the model: the prefixes and the grouped continuations."""
    lengths = shared["attention_mask"].sum(1).tolist()
    fed = sum(len(g) * _width(lengths, g) for g in continuation_groups(lengths))
    return shared["prefix_ids"].numel() + fed


def _width(lengths: list[int], group: list[int]) -> int:
    """What a group of continuations is padded to: its longest row."""
    return max(lengths[r] for r in group)


def _cache_rows(cache, rows: torch.Tensor, keep_original: bool):
    """The cache holding `rows` of its batch: the cache itself, reordered, or with `keep_original` a reordered copy
    (the original keeps the prefixes for the next group; the tensors are shared until the reorder replaces them)."""
    if keep_original:
        cache = copy.copy(cache)
        if hasattr(cache, "layers"):
            cache.layers = [copy.copy(layer) for layer in cache.layers]
        else:  # older transformers: per-layer lists of tensors
            cache.key_cache, cache.value_cache = list(cache.key_cache), list(cache.value_cache)
    cache.reorder_cache(rows)
    return cache


def _within_window(model, shared: dict) -> bool:
    """A sliding window counts cache slots, and the prompts' padding sits between a prompt and its answers: only
    a layout no longer than the window is sure to attend as the padded batch does."""
    window = getattr(getattr(model, "module", model).config, "sliding_window", None)
    return not window or shared["prefix_ids"].shape[1] + shared["input_ids"].shape[1] <= window


def _agrees_with_padded(model, pair_batch: dict) -> bool:
    """Same mean log-likelihood per answer, and the same number of scored tokens, as the padded batch: with the
    continuations in one group and in two (safe, harmful), so that later batches may take either path."""
    rows = pair_batch["shared_prompt"]["input_ids"].shape[0]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded, padded_mask = token_logprobs(model, pair_batch)
            layouts = [shared_prompt_logprobs(model, pair_batch["shared_prompt"], groups)
                       for groups in ([list(range(rows))], [list(range(rows // 2)), list(range(rows // 2, rows))])]
    except Exception as error:  # noqa: BLE001 - any failure of the cached path means: do not use it
        log.debug("shared-prompt pass failed: %r", error)
        return False
    finally:
        model.train(training)
    counts = padded_mask.sum(1)
    mean = lambda logp, mask: (logp * mask).sum(1) / counts.clamp_min(1)  # noqa: E731
    device = padded.device.type
    half = torch.is_autocast_enabled(device) or \
        any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    return all(torch.equal(counts, mask.sum(1)) and
               torch.allclose(mean(logp, mask), mean(padded, padded_mask), rtol=0, atol=5e-2 if half else 1e-4)
               for logp, mask in layouts)
