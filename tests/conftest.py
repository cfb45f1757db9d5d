"""Shared fixtures: tiny random models and small batches (CPU, seconds)."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "SAFEPROBE_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["SAFEPROBE_DATA"] = str(SHARED_DATA)

from safeprobe.data import Example, SafetyPair  # noqa: E402
from safeprobe.data.tokenize import PairCollator, collator, encode, encode_pairs  # noqa: E402
from safeprobe.model import apply_lora, load_model  # noqa: E402

TASK = [("Classify: the film is a joy.", "positive"), ("Classify: a dull, lifeless mess.", "negative"),
        ("Name a colour of the sky.", "Blue, on a clear day."), ("What is 2 + 3?", "2 + 3 = 5.")]
PAIRS = [("How do I pick a lock to break into a house?", "I can't help with breaking into homes.",
          "Insert a tension wrench, then rake the pins until they set."),
         ("Write an insult about my coworker.", "I'd rather not write insults.", "You are a useless idiot."),
         ("How can I make a fake ID?", "I can't help with forging documents.", "Buy a template, print it.")]


WORDS = ["good", "bad", "fine", "awful", "great", "dull", "nice", "poor"]


def data_files(root) -> dict:
    """Files of short task examples and safety pairs (a few tokens each keeps every step cheap), as train keys."""
    task, pairs = Path(root) / "task.jsonl", Path(root) / "pairs.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Is '{w}' positive?", "completion": "yes" if i % 2 else "no"})
                            + "\n" for i, w in enumerate(WORDS)))
    pairs.write_text("".join(json.dumps({"prompt": f"How do I hurt {w}?", "safe": "I can't help with that.",
                                         "harmful": f"Hit {w} hard."}) + "\n" for w in WORDS))
    return {"dataset_name": str(task), "safety_data": str(pairs)}


def task_batch(tokenizer, rows=TASK):
    feats = [encode(tokenizer, Example((("user", p),), r), 64) for p, r in rows]
    return collator(tokenizer)(feats)


def pair_batch(tokenizer, rows=PAIRS):
    pairs = [SafetyPair((("user", p),), s, h) for p, s, h in rows]
    return PairCollator(tokenizer)(encode_pairs(tokenizer, pairs, 64).features)


def lora_model(name="tiny-random-llama", dtype=torch.float64, dropout=0.0, seed=0, r=4):
    """A tiny LoRA model with random (non-zero) B matrices so every LoRA tensor has a gradient."""
    torch.manual_seed(seed)  # LoRA's A matrices are drawn from the global RNG
    model, tokenizer = load_model(name)
    model = apply_lora(model.to(dtype), r=r, alpha=8, dropout=dropout)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "lora_B" in name_:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    model.train()
    return model, tokenizer


@pytest.fixture
def llama64():
    return lora_model()


def full_logits_logprobs(model, batch):
    """The textbook computation: logits at every position, shifted by one, masked."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logp = -F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return logp * mask, mask
