"""Answer parsers of the task suites, as in the harmful fine-tuning literature (Vaccine / Lisa / Booster code).

- sst2, agnews: correct if the gold label word occurs anywhere in the answer, case-insensitively. This is the
  literature's lenient rule: an answer naming several labels counts as correct if the gold one is among them.
- gsm8k: the number after the LAST final-answer marker (GSM8K_MARKER, '####') if the answer has one, else the
  last number in the answer (models that were not fine-tuned on the marker format still get graded);
  thousands separators and a trailing '.' are dropped, and numbers are compared as values (2.50 == 2.5).
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from ..data.registry import GSM8K_MARKER

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def label_correct(answer: str, label: str) -> bool:
    """Classification: the gold label word is contained in the answer (case-insensitive)."""
    return label.lower() in (answer or "").lower()


def gsm8k_final_number(answer: str) -> str | None:
    """The final numeric answer: after the last '####' if present, else the last number; None if none."""
    text = answer or ""
    if GSM8K_MARKER in text:
        tail = _NUMBER.findall(text.rsplit(GSM8K_MARKER, 1)[1])
        if tail:
            return _clean(tail[0])
    numbers = _NUMBER.findall(text)
    return _clean(numbers[-1]) if numbers else None


def _clean(number: str) -> str:
    return number.replace(",", "").rstrip(".")


def gsm8k_correct(answer: str, label: str) -> bool:
    """The parsed final number equals the gold one (as decimal values)."""
    predicted = gsm8k_final_number(answer)
    if predicted is None:
        return False
    try:
        return Decimal(predicted) == Decimal(_clean(label))
    except InvalidOperation:
        return predicted == _clean(label)
