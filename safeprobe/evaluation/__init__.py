"""Evaluation: batched generation, harmfulness judges, suites, metrics with confidence intervals, reports.

Entry points (the CLI calls these):
- `run_eval(model_spec, adapter=None, suites=..., judges=..., limit=None, output_dir=..., ...)`: `safeprobe eval`
- `train_moderation_judge(...)`: `safeprobe judge train` (builds the offline moderation judge)
- `validate_judge(name, output_dir=None)`: `safeprobe judge validate` (agreement with human labels)
"""
from .generate import generate
from .judges import JUDGE_NAMES, Judge, Verdict, get_judge
from .keyword import REFUSAL_KEYWORDS, is_harmful, is_refusal
from .metrics import agreement, wilson
from .moderation import TrainSettings, train_moderation_judge
from .runner import DEFAULT_JUDGES, DEFAULT_SUITES, evaluate, run_eval
from .suites import PKU_HOLDOUT, SUITES, get_suite, pku_split
from .validate import summary_lines, validate_judge

__all__ = ["DEFAULT_JUDGES", "DEFAULT_SUITES", "JUDGE_NAMES", "Judge", "PKU_HOLDOUT", "REFUSAL_KEYWORDS", "SUITES",
           "TrainSettings", "Verdict", "agreement", "evaluate", "generate", "get_judge", "get_suite", "is_harmful",
           "is_refusal", "pku_split", "run_eval", "summary_lines", "train_moderation_judge", "validate_judge",
           "wilson"]
