"""Record kinds and their normalisation into three shapes used everywhere else.

- `Example`: a conversation prompt (list of chat messages) and the response to learn or to grade against.
- `SafetyPair`: a harmful prompt with a safe (refusing) and a harmful answer.
- prompts: `Example` with an empty response (evaluation suites).

Accepted row layouts (after optional column renaming): alpaca `instruction`/`input`/`output`, chat
`messages`, `prompt`/`completion`, `prompt`/`response` (str), `prompt`/`safe`/`harmful`, PKU-SafeRLHF style
`prompt`/`response: [safe, unsafe]`, Anthropic-HH style `chosen`/`rejected` dialogues, and bare `prompt`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import UserError

Messages = list  # list[dict(role=..., content=...)]


class _PromptTurns:
    """`messages` is a tuple of (role, content) prompt turns ending with a user turn."""

    @property
    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def prompt(self) -> str:
        """The last user turn (for display, splits and keyword judges)."""
        return self.messages[-1][1]


@dataclass(frozen=True)
class Example(_PromptTurns):
    messages: tuple
    response: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class SafetyPair(_PromptTurns):
    messages: tuple
    safe: str
    harmful: str


def user_turn(text: str) -> tuple:
    return (("user", text),)


class RowError(UserError):
    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


def _text(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise RowError(where, f"missing required field '{key}'")
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowError(where, f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(where, f"field '{key}' is empty")
    return value


def _messages(row: dict, where: str) -> tuple[tuple, str]:
    """Chat `messages` -> (prompt turns, final assistant answer or '')."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowError(where, "field 'messages' must be a non-empty list")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(where, f"field 'messages[{i}]' must have string 'role' and 'content'")
        turns.append((m["role"], m["content"]))
    answer = turns.pop()[1] if turns[-1][0] == "assistant" else ""
    if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
        raise RowError(where, "field 'messages' must end with a non-empty user turn, then optionally the answer")
    return tuple(turns), answer


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str, where: str) -> tuple[tuple, str]:
    """Anthropic HH '\\n\\nHuman: ...\\n\\nAssistant: ...' -> (prompt turns, last assistant answer)."""
    parts = _HH_TURN.split(text)
    turns = [("user" if who == "Human" else "assistant", body.strip()) for who, body in zip(parts[1::2], parts[2::2])]
    if len(turns) < 2 or turns[-1][0] != "assistant":
        raise RowError(where, "dialogue must end with an 'Assistant:' turn")
    return tuple(turns[:-1]), turns[-1][1]


def rename_columns(row: dict, columns: dict | None) -> dict:
    """Apply a {canonical_name: source_column} mapping."""
    if not columns:
        return row
    row = dict(row)
    for canonical, source in columns.items():
        if source in row:
            row[canonical] = row.pop(source)
    return row


def to_example(row: dict, where: str) -> Example:
    """Any supervised layout -> Example (prompt turns + response)."""
    if "messages" in row:
        turns, answer = _messages(row, where)
        if not answer.strip():
            raise RowError(where, "field 'messages' must end with a non-empty assistant turn")
        return Example(turns, answer)
    if "instruction" in row:
        instruction = _text(row, "instruction", where)
        extra = row.get("input") or ""
        prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        return Example(user_turn(prompt), _text(row, "output", where))
    if "prompt" in row:
        for key in ("completion", "response", "output"):
            if row.get(key) is not None:  # present: a value that is not text gets its own message
                return Example(user_turn(_text(row, "prompt", where)), _text(row, key, where))
        raise RowError(where, "missing required field 'completion'")
    raise RowError(where, "unrecognised row layout; expected 'messages', 'instruction'/'output' "
                          "or 'prompt'/'completion'")


def to_prompt(row: dict, where: str) -> Example:
    """Any layout with a prompt -> Example with the prompt (response kept if present, as a reference)."""
    if "messages" in row:
        turns, answer = _messages(row, where)
        return Example(turns, answer)
    for key in ("prompt", "instruction", "goal", "Goal", "question", "text"):
        if key in row:
            return Example(user_turn(_text(row, key, where)), "")
    raise RowError(where, "missing required field 'prompt'")


def to_safety_pair(row: dict, where: str) -> SafetyPair:
    if "chosen" in row and "rejected" in row and "prompt" not in row:
        turns, safe = parse_hh_dialogue(_text(row, "chosen", where), where)
        turns_r, harmful = parse_hh_dialogue(_text(row, "rejected", where), where)
        if turns != turns_r:
            raise RowError(where, "'chosen' and 'rejected' must share the same prompt turns")
        return _checked_pair(turns, safe, harmful, where, ("chosen", "rejected"))
    turns = _messages(row, where)[0] if "messages" in row else user_turn(_text(row, "prompt", where))
    if "safe" in row or "harmful" in row:
        safe, harmful = _text(row, "safe", where, True), _text(row, "harmful", where, True)
        return _checked_pair(turns, safe, harmful, where, ("safe", "harmful"))
    if "chosen" in row:
        safe, harmful = _text(row, "chosen", where, True), _text(row, "rejected", where, True)
        return _checked_pair(turns, safe, harmful, where, ("chosen", "rejected"))
    response = row.get("response")
    if isinstance(response, list):
        if len(response) != 2 or not all(isinstance(r, str) for r in response):
            raise RowError(where, "field 'response' must be a list [safe, unsafe] of two strings")
        return _checked_pair(turns, response[0], response[1], where, ("response[0]", "response[1]"))
    raise RowError(where, "missing required field 'safe' (or 'harmful', 'chosen'/'rejected', 'response' pair)")


def _checked_pair(turns, safe: str, harmful: str, where: str, names) -> SafetyPair:
    for text, name in zip((safe, harmful), names):
        if not text.strip():
            raise RowError(where, f"field '{name}' is empty")
    return SafetyPair(tuple(turns), safe, harmful)
