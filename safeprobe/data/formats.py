"""TRL's dataset formats tokenised as safeprobe trains them: every assistant turn in the loss, through any chat
template (no `{% generation %}` markers needed), and preference rows as SAP's safety pairs.

- conversational language modeling: `{"messages": [...]}`: every assistant turn is a target;
- conversational prompt-completion: `{"prompt": [...], "completion": [...]}`: the completion's assistant turns;
- ShareGPT: `{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}`, as `messages`;
- preference: `{"prompt", "chosen", "rejected"}`, standard (strings, no chat template: TRL's convention) or
  conversational (message lists); chosen = the safe answer, rejected = the harmful one. Implicit-prompt rows
  (`chosen`/`rejected` whole conversations) are split with TRL's `extract_prompt`.

Conversational rows are encoded by `data.tokenize.encode`, as `safeprobe train` encodes them; standard `text`
and prompt-completion rows are left to TRL's own preparation.
"""
from __future__ import annotations

import logging

from trl import extract_prompt, is_conversational, is_conversational_from_value

from ..errors import UserError
from .records import check_messages, to_example
from .tokenize import IGNORE, _end_of_turn_id, encode, encode_conversation

log = logging.getLogger(__name__)


def encode_text_pair(tokenizer, prompt: str, answer: str, max_length: int | None) -> dict | None:
    """A standard (string) prompt and answer, concatenated without a chat template as TRL does; the answer and
    an end-of-turn token are the targets."""
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [_end_of_turn_id(tokenizer)]
    ids = (head + tail)[:max_length]
    if len(ids) <= len(head):
        return None
    return {"input_ids": ids, "labels": [IGNORE] * len(head) + ids[len(head):], "attention_mask": [1] * len(ids)}


def is_conversation(row: dict) -> bool:
    """Whether safeprobe tokenises the row itself: conversational (TRL's test), or ShareGPT `conversations`."""
    return is_conversational(row) or is_conversational_from_value(row)


def encode_training_row(tokenizer, row: dict, max_length: int | None, where: str) -> dict:
    """One conversational training row -> features as `safeprobe train` encodes it (empty lists when nothing is
    left to train on)."""
    return encode(tokenizer, to_example(row, where), max_length) or {"input_ids": [], "labels": [],
                                                                       "attention_mask": []}


def safety_pair_features(dataset, tokenizer, max_length: int | None, name: str = "safety_dataset") -> list[dict]:
    """SAP's safety pairs as {'safe': features, 'harmful': features}, from encoded pairs (kept as they are) or
    from preference rows; pairs that leave no answer token within `max_length` are dropped, with a warning."""
    rows = list(dataset)
    if rows and isinstance(rows[0].get("safe"), dict):
        return rows
    out = []
    for i, row in enumerate(rows):
        where = f"{name} row {i}"
        pair = _preference_pair(tokenizer, row, max_length, where)
        if pair is not None:
            out.append(pair)
    if len(out) < len(rows):
        log.warning("dropped %d of %d safety pairs that leave no answer token within max_length=%s",
                    len(rows) - len(out), len(rows), max_length)
    if not out:
        raise UserError(f"{name}: no usable safety pairs (rows with prompt, chosen = safe answer, rejected = harmful "
                        f"answer) within max_length={max_length}")
    return out


def _preference_pair(tokenizer, row: dict, max_length, where: str) -> dict | None:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise UserError(f"{where}: missing required field '{key}' (preference rows: prompt, chosen = the safe "
                            "answer, rejected = the harmful one)")
    if "prompt" not in row:
        row = extract_prompt(row)
    if any(isinstance(row[key], list) for key in ("prompt", "chosen", "rejected")):  # conversational
        prompt = check_messages(row["prompt"], where, "prompt")
        sides = [encode_conversation(tokenizer, prompt + check_messages(row[key], where, key), max_length,
                                     train_from=len(prompt)) for key in ("chosen", "rejected")]
    else:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row[key], str):
                raise UserError(f"{where}: field '{key}' must be a string or a list of messages, got "
                                f"{type(row[key]).__name__}")
        sides = [encode_text_pair(tokenizer, row["prompt"], row[key], max_length) for key in ("chosen", "rejected")]
    if any(side is None for side in sides):
        return None
    return {"safe": sides[0], "harmful": sides[1]}
