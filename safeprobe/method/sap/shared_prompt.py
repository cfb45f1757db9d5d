"""SAP step 1 with one forward of each safety pair's prompt for both of its answers, packed into few rows.

A safety pair's safe and harmful answers follow the same prompt, and with the chat template the prompt is often
the longer part; padding both answers to the longest row of the batch wastes more. The pair collator lays the
batch out as common prefixes and continuations (`data.tokenize.shared_prompt_layout`). Here each pair becomes one
segment, prefix then safe answer then harmful answer, and the segments are packed into rows of up to `ROW_TOKENS`
tokens. A block attention mask lets a prefix see only itself and an answer see only its own prefix and itself;
position ids restart in every segment, and each answer continues its prefix's positions. One pass then scores every
answer from the fewest tokens, inside large matrix products: on this project's CPU benchmark the small products
of a prompt-cache layout ran at half the throughput, which ate most of its token saving
(`benchmarks/safety_pass.py`).

Without dropout the answers' log-likelihoods equal those of the padded batch up to rounding. With dropout the
two answers of a pair see the same masks over their prompt, as they see the same prompt.

Not every model takes a custom 4D attention mask with the positions it is given (ALiBi models such as BLOOM
derive positions from a 2D mask; flash-attention kernels take no 4D mask), so the first batch is checked once,
in eval mode and without gradients, against the padded batch; a mismatch falls back to the padded batch for the
rest of the run, with a warning. The check draws no random numbers.
"""
from __future__ import annotations

import logging

import torch

from ..losses import IGNORE, token_logprobs

log = logging.getLogger(__name__)

# Rows of up to this many tokens (or one pair, if longer): attention costs the square of a row's length, the linear
# layers only its tokens. At 1k tokens attention is about a third of the linear layers' cost in a 135M model
# (hidden size 576), and less in larger ones.
ROW_TOKENS = 1024
PREFIX, SAFE, HARMFUL = 0, 1, 2  # the parts of a pair's segment


class SharedPromptPass:
    """`logprobs(model, pair_batch)` for `contrastive_safety_loss`: packed pairs once verified, else padded."""

    def __init__(self, row_tokens: int = ROW_TOKENS):
        self.verified, self.row_tokens = None, row_tokens  # verified None: not checked yet

    def logprobs(self, model, pair_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        shared = pair_batch.get("shared_prompt")
        if shared is None or self.verified is False or not _within_window(model, shared):
            return token_logprobs(model, pair_batch)
        if self.verified is None:
            self.verified = _agrees_with_padded(model, pair_batch)
            if not self.verified:
                log.warning("this model does not reproduce the safety pairs' log-likelihoods with the pairs packed "
                            "under a block attention mask; SAP's safety pass uses the padded batch")
                return token_logprobs(model, pair_batch)
        return packed_logprobs(model, shared, self.row_tokens)


def packed_logprobs(model, shared: dict, row_tokens: int = ROW_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and mask of the continuations, [2n, length - 1], from one pass over packed rows."""
    packed = pack_pairs(shared, row_tokens)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = {k: packed[k] for k in ("input_ids", "labels", "position_ids")}
    logp, mask = token_logprobs(model, {**inputs, "attention_mask": block_mask(packed["pair"], packed["part"], dtype)})
    # continuation r's column j sits at column start[r] + j of packed row row[r]
    columns = torch.arange(shared["input_ids"].shape[1] - 1, device=logp.device)
    inside = columns < packed["length"][:, None] - 1
    at = (packed["row"][:, None], (packed["start"][:, None] + columns).clamp(max=logp.shape[1] - 1))
    return torch.where(inside, logp[at], 0.0), inside & mask[at]


def pack_pairs(shared: dict, row_tokens: int = ROW_TOKENS) -> dict:
    """The shared layout as packed rows: input ids, labels, position ids, and per token its pair (-1: padding) and
    part (PREFIX, SAFE, HARMFUL); per continuation its packed row, first column and length. Built on the CPU (one
    copy each way, not one per piece) and moved to the layout's device."""
    device = shared["input_ids"].device
    shared = {k: v.cpu() for k, v in shared.items()}
    n = shared["prefix_ids"].shape[0]
    prefix, answer = shared["prefix_mask"].sum(1).tolist(), shared["attention_mask"].sum(1).tolist()
    sizes = [prefix[i] + answer[i] + answer[n + i] for i in range(n)]
    rows = _fill_rows(sizes, row_tokens)
    width = max(sum(sizes[i] for i in row) for row in rows)
    packed = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
              "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
              "position_ids": torch.zeros(len(rows), width, dtype=torch.long),
              "pair": torch.full((len(rows), width), -1, dtype=torch.long),
              "part": torch.zeros(len(rows), width, dtype=torch.long),
              "row": torch.zeros(2 * n, dtype=torch.long), "start": torch.zeros(2 * n, dtype=torch.long),
              "length": torch.tensor(answer)}
    for r, pairs in enumerate(rows):
        column = 0
        for i in pairs:
            _put(packed, r, column, i, PREFIX, shared["prefix_ids"][i], shared["prefix_positions"][i], prefix[i])
            column += prefix[i]
            for part, row in ((SAFE, i), (HARMFUL, n + i)):
                _put(packed, r, column, i, part, shared["input_ids"][row], shared["position_ids"][row], answer[row])
                packed["labels"][r, column:column + answer[row]] = shared["labels"][row, :answer[row]]
                packed["row"][row], packed["start"][row] = r, column
                column += answer[row]
    return {k: v.to(device) for k, v in packed.items()}


def _put(packed: dict, r: int, column: int, pair: int, part: int, ids, positions, length: int) -> None:
    """Write one part of a pair's segment into packed row r from `column` on."""
    span = slice(column, column + length)
    packed["input_ids"][r, span], packed["position_ids"][r, span] = ids[:length], positions[:length]
    packed["pair"][r, span], packed["part"][r, span] = pair, part


def _fill_rows(sizes: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: the pairs (by index) in rows of at most `row_tokens` tokens; a longer pair has a row of
    its own."""
    rows, room = [], []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = next((r for r, free in enumerate(room) if sizes[i] <= free), None)
        if r is None:
            r = len(rows)
            rows.append([])
            room.append(max(row_tokens, sizes[i]))
        rows[r].append(i)
        room[r] -= sizes[i]
    return rows


def block_mask(pair: torch.Tensor, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [rows, 1, width, width]: a token sees the earlier tokens of its own pair's prefix
    and of its own part. Every token sees itself: a query that sees nothing gives NaN."""
    width = pair.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool, device=pair.device).tril()
    same_pair = pair[:, :, None] == pair[:, None, :]  # padding (-1) sees only padding
    visible_part = (part[:, None, :] == PREFIX) | (part[:, :, None] == part[:, None, :])
    sees = (earlier & same_pair & visible_part) | torch.eye(width, dtype=torch.bool, device=pair.device)
    return torch.zeros(sees.shape, dtype=dtype, device=pair.device).masked_fill(~sees, torch.finfo(dtype).min)[:, None]


def layout_tokens(shared: dict, row_tokens: int = ROW_TOKENS) -> int:
    """How many tokens the packed pass feeds the model, padding included."""
    return pack_pairs(shared, row_tokens)["input_ids"].numel()


def _within_window(model, shared: dict) -> bool:
    """The block mask replaces a sliding window's: only pairs no longer than the window attend as in the padded
    batch."""
    window = getattr(getattr(model, "module", model).config, "sliding_window", None)
    return not window or shared["prefix_ids"].shape[1] + shared["input_ids"].shape[1] <= window


def _agrees_with_padded(model, pair_batch: dict) -> bool:
    """Same mean log-likelihood per answer, and the same number of scored tokens, as the padded batch: with every
    pair in one row and with one pair per row, so that later batches may be packed either way."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded, padded_mask = token_logprobs(model, pair_batch)
            layouts = [packed_logprobs(model, pair_batch["shared_prompt"], row_tokens) for row_tokens in (10**9, 1)]
    except Exception as error:  # noqa: BLE001 - any failure of the packed path means: do not use it
        log.debug("packed safety pass failed: %r", error)
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
