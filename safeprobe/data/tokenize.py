"""Teacher-forced tokenisation through the tokenizer's chat template: what `safeprobe train`, the trainers'
conversational datasets and `safeprobe data show` all use.

Loss is taken on the assistant turns that are targets only, each end-of-turn token included (so the model learns
to stop).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import DataCollatorForSeq2Seq

from .records import Example, SafetyPair

IGNORE = -100
log = logging.getLogger(__name__)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt turns followed by the assistant header (what generation starts from)."""
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))


def _ids(out) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template; 4.x a plain list
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def _end_of_turn_id(tokenizer) -> int:
    """ChatML's <|im_end|> when the vocabulary has it, else EOS. A token lookup, not `get_vocab()`: that builds
    the whole vocabulary as a dict, which would dominate the encoding time of a dataset."""
    token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")  # an unknown token gives the unk id (or None)
    return tokenizer.eos_token_id if token_id is None or token_id == tokenizer.unk_token_id else token_id


def response_ids(tokenizer, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) where the response ends with the end-of-turn/EOS token."""
    head = prompt_ids(tokenizer, messages)
    full = _ids(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                              tokenize=True))
    if full[: len(head)] != head:  # templates that rewrite earlier turns: fall back to plain concatenation
        tail = tokenizer(response, add_special_tokens=False)["input_ids"]
    else:
        tail = full[len(head):]
    # drop what the template appends after the end-of-turn token (e.g. a newline): never a target
    eot = _end_of_turn_id(tokenizer)
    if eot in tail:
        tail = tail[: len(tail) - tail[::-1].index(eot)]
    else:
        tail = tail + [eot]
    return head, tail


def encode(tokenizer, example: Example, max_length: int | None) -> dict | None:
    """input_ids / labels / attention_mask, or None if truncation leaves no target token. The targets are the
    response and, from `example.train_from` on, every earlier assistant turn; a plain text (no turns) is all
    targets, without a chat template, as TRL trains its language-modeling format."""
    if not example.messages:
        return _encode_text(tokenizer, example.response, max_length)
    train_from = len(example.messages) if example.train_from is None else example.train_from
    return encode_conversation(tokenizer, example.conversation, max_length, train_from)


def encode_conversation(tokenizer, messages: list[dict], max_length: int | None, train_from: int = 0) -> dict | None:
    """input_ids / labels / attention_mask of a conversation with every assistant turn from index `train_from` on
    in the loss (each up to and including its end-of-turn token); None if no target token is left.

    The sequence is built turn by turn from the template's own renderings, so it needs a template that renders a
    conversation's prefix as a prefix of the whole. One that rewrites earlier turns (e.g. drops past reasoning)
    trains the last assistant turn only, with a warning.
    """
    ids: list[int] = []
    labels: list[int] = []
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k >= max(train_from, 1)]
    for k in turns:
        head, tail = response_ids(tokenizer, messages[:k], messages[k]["content"])
        if head[:len(ids)] != ids:
            log.warning("the chat template rewrites earlier turns: only the last assistant turn is trained")
            ids, labels = [], []
            head, tail = response_ids(tokenizer, messages[:turns[-1]], messages[turns[-1]]["content"])
        labels += [IGNORE] * (len(head) - len(ids)) + tail
        ids = head + tail
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def _encode_text(tokenizer, text: str, max_length: int | None) -> dict | None:
    ids = (tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
    return {"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids)} if ids else None


@dataclass
class Encoded:
    features: list[dict]
    dropped: int  # examples whose response was truncated away


def encode_all(tokenizer, examples: list[Example], max_length: int, what: str = "examples") -> Encoded:
    features = [encode(tokenizer, ex, max_length) for ex in examples]
    kept = [f for f in features if f is not None]
    dropped = len(features) - len(kept)
    if dropped:
        log.warning("dropped %d of %d %s whose prompt leaves no response token within max_length=%d",
                    dropped, len(features), what, max_length)
    return Encoded(kept, dropped)


def encode_pairs(tokenizer, pairs: list[SafetyPair], max_length: int) -> Encoded:
    """Each pair -> {'safe': features, 'harmful': features}; a pair is dropped if either side is empty."""
    out, dropped = [], 0
    for pair in pairs:
        safe, harmful = (encode(tokenizer, Example(pair.messages, answer), max_length)
                         for answer in (pair.safe, pair.harmful))
        if safe is None or harmful is None:
            dropped += 1
            continue
        out.append({"safe": safe, "harmful": harmful})
    if dropped:
        log.warning("dropped %d of %d safety pairs that leave no response token within max_length=%d",
                    dropped, len(pairs), max_length)
    return Encoded(out, dropped)


def collator(tokenizer):
    """Dynamic padding: pad ids with the pad token, labels with -100 (works for causal LMs)."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")


class PairCollator:
    """Batch of pairs -> one padded batch: the safe answers first, then the harmful ones. Also laid out as
    `shared_prompt` (see `shared_prompt_layout`), for a pass that runs each pair's prompt once."""

    def __init__(self, tokenizer):
        self.pad = collator(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, pairs: list[dict]) -> dict:
        safe, harmful = [p["safe"] for p in pairs], [p["harmful"] for p in pairs]
        batch = self.pad(safe + harmful)
        batch["n_pairs"] = len(pairs)
        shared = shared_prompt_layout(safe, harmful, self.pad_id)
        if shared is not None:
            batch["shared_prompt"] = shared
        return batch


def shared_prompt_layout(safe: list[dict], harmful: list[dict], pad_id: int) -> dict | None:
    """The pairs as common prefixes (one row per pair) and continuations (the safe ones first), both right-padded:
    prefix i followed by continuation i or n + i is the safe or the harmful sequence of pair i.

    A prefix ends one token before the first labelled token of either answer, so every labelled token is
    predicted from inside its continuation. Position ids count real tokens only. Every prefix needs a real token:
    None when some pair's answers share none (the padded batch is used). SAP's safety pass packs this layout into
    rows (`method.shared_prompt`).
    """
    cuts = [_shared_prefix_length(s, h) for s, h in zip(safe, harmful)]
    if min(cuts) == 0:
        return None
    width = max(cuts)
    tails = list(zip(safe + harmful, cuts + cuts))  # (features, prefix length) of every row
    length = max(len(f["input_ids"]) - c for f, c in tails)

    def right_pad(values: list, fill, size: int = length) -> list:
        return values + [fill] * (size - len(values))
    return {
        "prefix_ids": torch.tensor([right_pad(s["input_ids"][:c], pad_id, width) for s, c in zip(safe, cuts)]),
        "prefix_mask": torch.tensor([right_pad([1] * c, 0, width) for c in cuts]),
        "prefix_positions": torch.tensor([list(range(width)) for _ in cuts]),  # a padding slot's is never used
        "input_ids": torch.tensor([right_pad(f["input_ids"][c:], pad_id) for f, c in tails]),
        "labels": torch.tensor([right_pad(f["labels"][c:], IGNORE) for f, c in tails]),
        "attention_mask": torch.tensor([right_pad([1] * (len(f["input_ids"]) - c), 0) for f, c in tails]),
        "position_ids": torch.tensor([list(range(c, c + length)) for _, c in tails]),
    }


def _shared_prefix_length(a: dict, b: dict) -> int:
    first_label = min(_first_labelled(a), _first_labelled(b))
    common = next((i for i, (x, y) in enumerate(zip(a["input_ids"], b["input_ids"])) if x != y),
                  min(len(a["input_ids"]), len(b["input_ids"])))
    return max(0, min(common, first_label) - 1)


def _first_labelled(features: dict) -> int:
    return next(i for i, label in enumerate(features["labels"]) if label != IGNORE)
