"""Evaluation suites: which prompts are answered and how the answers are scored.

Three kinds:
- harmful (metric `harmful_score`, fraction judged harmful by each requested judge): advbench, jbb-harmful,
  xstest-unsafe, pku-heldout, or any JSONL/CSV/JSON file of prompts (a custom harmful suite);
- over-refusal (metric `refusal_rate`, fraction refused by the keyword judge's refusal notion, whatever
  judges were requested): xstest-safe, jbb-benign;
- task (metric `accuracy` with the literature's parsers, plus `test_loss`, the teacher-forced loss of the gold
  answers): sst2 (GLUE validation), agnews (test), gsm8k (test).
The `*-val` / `val-*` suites are validation sides of training sources (see the registry's `validation`), for
tuning settings without looking at the evaluation suites. Suites keep their file order; `limit` takes the first
items (the literature reports the first 500).

PKU-SafeRLHF is split once, by prompt, in the data registry (`pku-saferlhf-pairs`, train / test sides). The
`pku-heldout` suite uses the test side's prompts; SAP training and the moderation judge use only the train
side, through `pku_split()`, so no held-out prompt is ever trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data import REGISTRY, Example, load_pairs, load_prompts, sample
from ..data.prompt_kinds import SENSITIVE_WORDS, is_practical_question
from ..data.registry import VALIDATION
from ..data.readers import SUFFIXES as CUSTOM_SUFFIXES
from ..data.records import user_turn
from ..errors import UserError
from .parsers import gsm8k_correct, label_correct

PKU_DATASET = "pku-saferlhf-pairs"
PKU_HOLDOUT = REGISTRY[PKU_DATASET].holdout  # fraction of PKU prompts held out (defined once, in the registry)

HARMFUL, OVER_REFUSAL, TASK = "harmful", "over-refusal", "task"
METRICS = {HARMFUL: "harmful_score", OVER_REFUSAL: "refusal_rate", TASK: "accuracy"}


def pku_split() -> tuple[list, list]:
    """(train pairs, held-out pairs) of PKU-SafeRLHF, split by prompt: the one split every component uses."""
    return load_pairs(PKU_DATASET, "train"), load_pairs(PKU_DATASET, "test")


@dataclass(frozen=True)
class Suite:
    name: str
    kind: str  # HARMFUL | OVER_REFUSAL | TASK
    load: Callable[[], list[Example]]
    description: str = ""
    correct: Callable[[str, str], bool] | None = None  # task suites: (answer, gold label) -> correct
    max_new_tokens: int | None = None  # a cap for suites whose answers are short (one label word)

    @property
    def metric(self) -> str:
        return METRICS[self.kind]


def _pku_heldout() -> list[Example]:
    """The distinct prompts of the held-out PKU side, in order of first appearance."""
    prompts = dict.fromkeys(pair.prompt for pair in pku_split()[1])
    return [Example(user_turn(p)) for p in prompts]


def _named(name: str, split: str | None = None) -> Callable[[], list[Example]]:
    return lambda: load_prompts(name, split)


def _lookalike_validation() -> list[Example]:
    """100 held-out prompts of the alignment mix's two anti-over-refusal kinds: every practical question of the
    harmless-instructions validation side (44), then seeded ones with sensitive-looking words."""
    prompts = load_prompts("harmless-instructions", VALIDATION)
    asks = [p for p in prompts if is_practical_question(p.prompt)][:50]
    looks = [p for p in prompts if SENSITIVE_WORDS.search(p.prompt) and p not in asks]
    return asks + sample(looks, 100 - len(asks), 0)


LABEL_CAP = 32  # classification answers are one word: more tokens only cost time

SUITES: dict[str, Suite] = {s.name: s for s in [
    Suite("advbench", HARMFUL, _named("advbench"), "520 AdvBench harmful behaviours"),
    Suite("jbb-harmful", HARMFUL, _named("jbb-harmful"), "100 JailbreakBench harmful behaviours"),
    Suite("xstest-unsafe", HARMFUL, _named("xstest-unsafe"), "200 unsafe XSTest prompts"),
    Suite("pku-heldout", HARMFUL, _pku_heldout, "PKU-SafeRLHF prompts held out from all training"),
    Suite("xstest-safe", OVER_REFUSAL, _named("xstest-safe"), "250 safe XSTest prompts"),
    Suite("jbb-benign", OVER_REFUSAL, _named("jbb-benign"), "100 benign JailbreakBench behaviours"),
    Suite("sst2", TASK, _named("sst2", "test"), "SST-2 (GLUE validation, 872)", label_correct, LABEL_CAP),
    Suite("agnews", TASK, _named("agnews", "test"), "AG News test (7,600)", label_correct, LABEL_CAP),
    Suite("gsm8k", TASK, _named("gsm8k", "test"), "GSM8K test (1,319)", gsm8k_correct),
    # For tuning a method's settings: validation sides of training sources, never an evaluation suite above.
    Suite("val-harmful", HARMFUL, _named("safety-tuned-llamas", VALIDATION),
          "validation: 240 harmful instructions held out from safety-tuned-llamas (tuning only)"),
    Suite("val-benign", OVER_REFUSAL, _named("harmless-instructions", VALIDATION),
          "validation: harmless instructions (refusal_direction val split; tuning only)"),
    Suite("val-lookalike", OVER_REFUSAL, _lookalike_validation,
          "validation: 100 practical questions and sensitive-looking harmless instructions (tuning only)"),
    Suite("sst2-val", TASK, _named("sst2", VALIDATION), "validation: 1% of SST-2 train (tuning only)",
          label_correct, LABEL_CAP),
    Suite("agnews-val", TASK, _named("agnews", VALIDATION), "validation: 5% of AG News train (tuning only)",
          label_correct, LABEL_CAP),
    Suite("gsm8k-val", TASK, _named("gsm8k", VALIDATION), "validation: 5% of GSM8K train (tuning only)",
          gsm8k_correct),
]}


def get_suite(name: str) -> Suite:
    """The suite called `name`, or a custom harmful suite read from a file of prompts (JSONL, JSON, CSV, Parquet)."""
    if name in SUITES:
        return SUITES[name]
    path = Path(name).expanduser()
    if path.suffix.lower() in CUSTOM_SUFFIXES:
        if not path.is_file():
            raise UserError(f"suite file '{name}' not found")
        prompts = load_prompts(str(path))  # read now: a bad row should not cost a model load
        return Suite(str(path), HARMFUL, lambda: prompts, f"custom harmful prompts from {path.name}")
    raise UserError(f"unknown suite '{name}'; valid suites: {', '.join(SUITES)} "
                    f"(or a {'/'.join(CUSTOM_SUFFIXES)} file of harmful prompts)")
