"""Batched greedy generation through the model's chat template (left padding, KV cache, progress bar).

Prompts are sorted by length into batches (little padding, so little wasted compute) and the answers are put
back in input order. Decoding is greedy, hence deterministic; left padding with an attention mask gives the
same tokens as generating one prompt at a time (tested).
"""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from ..data.tokenize import prompt_ids


@contextlib.contextmanager
def left_padding(tokenizer):
    """Temporarily pad on the left (decoder-only generation needs the prompt to end at the last position)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side


@contextlib.contextmanager
def flush_denormals():
    """Treat subnormal floats as zero inside the block (CPU only; a no-op where unsupported).

    Decoding multiplies by attention weights and dequantised parameters small enough to be subnormal; x86 CPUs
    handle those in microcode, which made a decode step of the embedded model twice as slow. Greedy tokens are
    unaffected in practice (such values are below 1e-38); training keeps IEEE behaviour (restored on exit).
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(False)


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() for the block, restoring train mode after (callers may be mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (stable sort: ties keep input order)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _stop_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return {i for i in [*eos, tokenizer.eos_token_id] if i is not None}


def _until_stop(ids: list[int], stop: set[int]) -> list[int]:
    """New tokens up to and including the first stop token (a finished row is padded after it)."""
    for n, token in enumerate(ids):
        if token in stop:
            return ids[:n + 1]
    return ids


@torch.no_grad()
def generate_ids(model, tokenizer, chats: list[list[dict]], max_new_tokens: int = 128, batch_size: int = 16,
                 desc: str = "generating", progress: bool = True) -> list[list[int]]:
    """Greedy new-token ids for each chat (list of messages), in input order, cut after the stop token."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    encoded = [prompt_ids(tokenizer, chat) for chat in chats]
    new_ids: list[list[int]] = [[] for _ in encoded]
    device = next(model.parameters()).device
    stop = _stop_ids(model, tokenizer)
    batches = length_batches([len(ids) for ids in encoded], batch_size)
    with eval_mode(model), left_padding(tokenizer), flush_denormals():
        for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress or not batches):
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None)
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(idx):
                new_ids[i] = _until_stop(out[row, width:].tolist(), stop)
    return new_ids


def generate(model, tokenizer, chats: list[list[dict]], max_new_tokens: int = 128, batch_size: int = 16,
             desc: str = "generating", progress: bool = True) -> list[str]:
    """Greedy answers to each chat, in input order, special tokens stripped (see `generate_ids`)."""
    ids = generate_ids(model, tokenizer, chats, max_new_tokens, batch_size, desc, progress)
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
