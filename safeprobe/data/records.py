"""Record kinds and their normalisation into three shapes used everywhere else.

- `Example`: a conversation prompt (list of chat messages) and the response to learn or to grade against.
- `SafetyPair`: a harmful prompt with a safe (refusing) and a harmful answer.
- prompts: `Example` with an empty response (evaluation suites).

Accepted row layouts (after optional column renaming), as TRL's `data_utils` tell them apart (a
message list makes a row conversational):
- supervised: TRL's conversational `messages` (every assistant turn is a target) and ShareGPT `conversations`,
  conversational prompt-completion (`prompt`/`completion` as message lists: the completion's assistant turns are
  targets), standard `prompt`/`completion` (also `response`, `output`), alpaca `instruction`/`input`/`output`,
  and language-modeling `text` (every token a target, no chat template);
- safety pairs: TRL's preference rows `prompt`/`chosen`/`rejected` (chosen = the safe answer), standard,
  conversational or with an implicit prompt, `prompt`/`safe`/`harmful`, PKU-SafeRLHF style
  `prompt`/`response: [safe, unsafe]`, Anthropic-HH `chosen`/`rejected` dialogues;
- prompts: any of the above, or a bare `prompt` (`goal`, `question`...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from trl import extract_prompt

from ..errors import UserError

Messages = list  # list[dict(role=..., content=...)]


class _PromptTurns:
    """`messages` is a tuple of (role, content) prompt turns ending with a user turn."""

    @property
    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def prompt(self) -> str:
        """The last user turn (for display, splits and keyword judges); a plain text has none."""
        return self.messages[-1][1] if self.messages else ""


@dataclass(frozen=True)
class Example(_PromptTurns):
    """A conversation's turns before the response, and the response. No turns: `response` is a plain text, every
    token of it a target. `train_from`: the index in the conversation from which every assistant turn is a target,
    the earlier ones included (None: the response only)."""

    messages: tuple
    response: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    train_from: int | None = None

    @property
    def conversation(self) -> list[dict]:
        """The chat messages with the response as the last assistant turn."""
        return self.chat + [{"role": "assistant", "content": self.response}]


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


def check_messages(messages, where: str, key: str) -> list[dict]:
    """A non-empty list of chat messages with string `role` and `content`."""
    if not isinstance(messages, list) or not messages:
        raise RowError(where, f"field '{key}' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(where, f"field '{key}[{i}]' must have string 'role' and 'content'")
    return messages


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool"}


def sharegpt_messages(conversations, where: str) -> list[dict]:
    """ShareGPT turns ({"from": "human"|"gpt"|..., "value": ...}) as chat messages."""
    if not isinstance(conversations, list) or not conversations:
        raise RowError(where, "field 'conversations' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(conversations):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise RowError(where, f"field 'conversations[{i}]' must have 'from' (one of {', '.join(SHAREGPT_ROLES)})"
                                  " and a string 'value'")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _chat_messages(row: dict, where: str) -> list[dict]:
    """`messages`, or ShareGPT `conversations` as messages."""
    if "messages" not in row and "conversations" in row:
        return sharegpt_messages(row["conversations"], where)
    return check_messages(row.get("messages"), where, "messages")


def is_message_list(value) -> bool:
    """A conversational field (TRL's test: a list of role/content dicts), as opposed to a string."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _messages(row: dict, where: str, key: str = "messages") -> tuple[tuple, str]:
    """A row's chat (`messages`, `conversations`, or the message list under `key`) -> (prompt turns, final assistant
    answer or '')."""
    messages = _chat_messages(row, where) if key in ("messages", "conversations") else \
        check_messages(row[key], where, key)
    turns = [(m["role"], m["content"]) for m in messages]
    answer = turns.pop()[1] if turns[-1][0] == "assistant" else ""
    if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
        raise RowError(where, f"field '{key}' must end with a non-empty user turn, then optionally the answer")
    return tuple(turns), answer


def _conversation_example(row: dict, where: str, key: str, train_from: int) -> Example:
    """The chat under `key`, ending with the assistant answer -> Example training every assistant turn from
    `train_from` on."""
    prompt, answer = _messages(row, where, key)
    if not answer.strip():
        raise RowError(where, f"field '{key}' must end with a non-empty assistant turn")
    return Example(prompt, answer, train_from=train_from)


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
    """Any supervised layout -> Example (prompt turns + response, and which assistant turns are targets)."""
    if "messages" in row or "conversations" in row:
        return _conversation_example(row, where, _chat_key(row), train_from=0)
    if is_message_list(row.get("prompt")):  # conversational prompt-completion
        prompt = check_messages(row["prompt"], where, "prompt")
        completion = check_messages(row.get("completion"), where, "completion")
        return _conversation_example({"completion": prompt + completion}, where, "completion", len(prompt))
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
    if "text" in row:
        return Example((), _text(row, "text", where))
    raise RowError(where, "unrecognised row layout; expected 'messages', 'prompt'/'completion', "
                          "'instruction'/'output' or 'text'")


def _chat_key(row: dict) -> str:
    return "messages" if "messages" in row else "conversations"


def to_prompt(row: dict, where: str) -> Example:
    """Any layout with a prompt -> Example with the prompt (response kept if present, as a reference)."""
    if "messages" in row or "conversations" in row:
        turns, answer = _messages(row, where, _chat_key(row))
        return Example(turns, answer)
    if is_message_list(row.get("prompt")):
        return Example(_messages(row, where, "prompt")[0], "")
    for key in ("prompt", "instruction", "goal", "Goal", "question", "text"):
        if key in row:
            return Example(user_turn(_text(row, key, where)), "")
    raise RowError(where, "missing required field 'prompt'")


def to_safety_pair(row: dict, where: str) -> SafetyPair:
    if "chosen" in row and "rejected" in row and "prompt" not in row:
        if isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
            row = extract_prompt({k: check_messages(row[k], where, k) for k in ("chosen", "rejected")})
            if not row["prompt"]:
                raise RowError(where, "'chosen' and 'rejected' must start with the same prompt turns")
        else:
            return _hh_pair(row, where)
    if "messages" in row or "conversations" in row:
        turns = _messages(row, where, _chat_key(row))[0]
    elif is_message_list(row.get("prompt")):
        turns = _messages(row, where, "prompt")[0]
    else:
        turns = user_turn(_text(row, "prompt", where))
    if "safe" in row or "harmful" in row:
        safe, harmful = _text(row, "safe", where, True), _text(row, "harmful", where, True)
        return _checked_pair(turns, safe, harmful, where, ("safe", "harmful"))
    if "chosen" in row:
        safe, harmful = _answer(row, "chosen", where), _answer(row, "rejected", where)
        return _checked_pair(turns, safe, harmful, where, ("chosen", "rejected"))
    response = row.get("response")
    if isinstance(response, list):
        if len(response) != 2 or not all(isinstance(r, str) for r in response):
            raise RowError(where, "field 'response' must be a list [safe, unsafe] of two strings")
        return _checked_pair(turns, response[0], response[1], where, ("response[0]", "response[1]"))
    raise RowError(where, "missing required field 'safe' (or 'harmful', 'chosen'/'rejected', 'response' pair)")


def _hh_pair(row: dict, where: str) -> SafetyPair:
    turns, safe = parse_hh_dialogue(_text(row, "chosen", where), where)
    turns_r, harmful = parse_hh_dialogue(_text(row, "rejected", where), where)
    if turns != turns_r:
        raise RowError(where, "'chosen' and 'rejected' must share the same prompt turns")
    return _checked_pair(turns, safe, harmful, where, ("chosen", "rejected"))


def _answer(row: dict, key: str, where: str) -> str:
    """A preference side: a string, or (conversational) one assistant message."""
    if not isinstance(row.get(key), list):
        return _text(row, key, where, True)
    messages = check_messages(row[key], where, key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(where, f"field '{key}' must be one assistant message")
    return messages[0]["content"]


def _checked_pair(turns, safe: str, harmful: str, where: str, names) -> SafetyPair:
    for text, name in zip((safe, harmful), names):
        if not text.strip():
            raise RowError(where, f"field '{name}' is empty")
    return SafetyPair(tuple(turns), safe, harmful)
