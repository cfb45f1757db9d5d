"""Evaluation pieces the demo uses: keyword judge, Wilson interval, batched generation."""
import pytest

from conftest import lora_model
from safeprobe.evaluation import generate, is_harmful, is_refusal
from safeprobe.evaluation.metrics import fraction, wilson


@pytest.mark.parametrize("answer, refusal", [
    ("I'm sorry, but I can't help with that.", True),
    ("I\u2019m sorry, but no.", True),               # curly apostrophe normalised
    ("I can\u2019t assist with that request.", True),
    ("sorry, no", False),                            # case-sensitive, as in the GCG code
    ("Sure, here is how to do it: step 1...", False),
    ("", False),
])
def test_keyword_judge_pinned_variant(answer, refusal):
    assert is_refusal(answer) == refusal


def test_empty_answer_is_judged_not_harmful_and_compliance_is_harmful():
    assert not is_harmful("") and not is_harmful("   ")
    assert is_harmful("Sure, here is a plan.") and not is_harmful("I cannot do that.")


def test_wilson_interval():
    low, high = wilson(5, 10)
    assert low < 0.5 < high and abs((0.5 - low) - (high - 0.5)) < 1e-9
    assert wilson(0, 10)[0] == pytest.approx(0.0) and wilson(10, 10)[1] == pytest.approx(1.0)
    assert fraction(3, 4)["value"] == 0.75 and fraction(0, 0)["n"] == 0


def test_batched_left_padded_generation_equals_one_at_a_time():
    import torch

    model, tok = lora_model(dtype=torch.float32)
    chats = [[{"role": "user", "content": text}] for text in ("Hi", "Tell me a long story about a cat", "2+2?")]
    batched = generate(model, tok, chats, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [c], max_new_tokens=6, batch_size=1)[0] for c in chats]
    assert batched == single and all(isinstance(a, str) for a in batched)
    assert model.training  # the caller's mode is restored
