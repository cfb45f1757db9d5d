"""Kinds of benign prompt that a small aligned model learns to refuse: the alignment mix answers them itself, and
the `val-lookalike` suite measures their refusal on held-out prompts."""
from __future__ import annotations

import re

# Words that make a benign instruction look sensitive (whole words, any case). Not "password" (benign-looking) and
# not prefixes like "rob"/"explo" (robot, explore).
SENSITIVE_WORDS = re.compile(
    r"\b(kill\w*|murder\w*|attack\w*|weapons?|guns?|shoot\w*|shot|bomb\w*|explosi\w*|explode\w*|poison\w*|drugs?|"
    r"steal\w*|stole\w*|theft|thief|robber\w*|hack\w*|crimes?|criminals?|fraud\w*|terroris\w*|violen\w*|wars?|"
    r"fight\w*|destroy\w*|die|dies|dying|death|dead|deadly|suicide|blood\w*|knife|knives|nuclear|virus|viruses|"
    r"threat\w*|dangerous|harm\w*|injur\w*|abus\w*|cheat\w*|lie|lies|lying|racis\w*|discriminat\w*|hate|hatred|"
    r"illegal|smuggl\w*|tortur\w*|assassin\w*|execute|executed|execution|slaughter\w*|gambl\w*|alcohol|"
    r"privacy|surveillance|spy|spying)\b", re.IGNORECASE)

# A user's practical question, the form that a small model learns to refuse first ("How do I ...?", "Where can I ...?",
# "What's the best way to ...?"): the questions of the benign-question bucket are drawn from these first.
PRACTICAL_QUESTION = re.compile(
    r"(how (do|can|should|could) (i|we|you)|where (can|do|should) (i|we)|what('s| is) (the|a) (best|easiest|good|right|"
    r"proper) way|what are (some )?(good |the best )?ways|can you|what should i)\b", re.IGNORECASE)


def is_practical_question(text: str) -> bool:
    """A question in a user's practical form ("How can I conserve water at home?")."""
    return text.rstrip().endswith("?") and PRACTICAL_QUESTION.match(text.strip()) is not None
