"""Harm over training (`eval_harm_every`): every K optimiser steps, and once before the first, the model being
trained answers the harmful suites (the first `eval_harm_limit` prompts of each, greedy, keyword judge) and their
harmful scores go into the step log, train_log.jsonl, as rows `{"step", "eval_harmful_score", "eval_harm":
{suite: score}}` (the paper's Figure 5: harm against step).

Measuring never disturbs training: eval mode, no gradients, and every RNG state restored around it, so the trained
weights are bit-identical with the curve on or off (tested). A resumed run keeps the rows up to its checkpoint,
as it does the other step-log rows.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from transformers import TrainerCallback

from ..config_file import comma_separated
from ..errors import UserError
from ..evaluation.runner import evaluate
from ..evaluation.suites import HARMFUL, get_suite
from ..io import append_jsonl, read_step_log
from ..method.diagnostics import undisturbed

ANSWER_TOKENS = 32  # the demo's answer length: the keyword judge sees a refusal in the first sentence
KEYS = ("eval_harm_every", "eval_harm_suites", "eval_harm_limit")  # the curve's settings (not the weights')


def harmful_suites(names: str) -> list[str]:
    """The comma-separated suite names of `eval_harm_suites`, each checked to be a harmful suite."""
    suites = comma_separated(names, "eval_harm_suites")
    for name in suites:
        if get_suite(name).kind != HARMFUL:
            raise UserError(f"eval_harm_suites: '{name}' is not a harmful suite (its prompts must ask for harm)")
    return suites


class HarmCurve(TrainerCallback):
    """Appends a harmful-score row to the step log before the first step and every `every` steps."""

    def __init__(self, trainer, suites: list[str], limit: int, every: int, step_log: Path):
        self.trainer, self.suites, self.limit, self.every, self.step_log = trainer, suites, limit, every, step_log

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._measure(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._measure(state.global_step)

    def _measure(self, step: int) -> None:
        if not self.trainer.is_world_process_zero():
            return
        model = self.trainer.model  # unwrapped: only this rank answers, and no DDP hook fires
        with undisturbed(model):
            result = evaluate(model, self.trainer.processing_class, self.suites, ["keyword"], self.limit,
                              ANSWER_TOKENS, progress=False)
        scores = {name: summary["harmful_score"] for name, summary in result["suites"].items()}
        append_jsonl(self.step_log, {"step": step, "eval_harmful_score": round(statistics.fmean(scores.values()), 6),
                                     "eval_harm": scores})


def read_curve(run_dir: str | Path) -> list[dict]:
    """The harm-curve rows of a run's step log, in step order ([] when the curve was off)."""
    rows = read_step_log(Path(run_dir) / "train_log.jsonl")
    return [{k: r[k] for k in ("step", "eval_harmful_score", "eval_harm") if k in r}
            for r in rows if "eval_harmful_score" in r]


def attach_harm_curve(trainer, cfg, out: Path) -> None:
    """Switch the harm curve on for `trainer` (cfg.eval_harm_every > 0): rows go to out/train_log.jsonl."""
    if getattr(trainer, "is_fsdp_enabled", False):
        raise UserError("eval_harm_every: not supported under FSDP (the model would have to answer on every rank); "
                        "train with DDP or one process, or evaluate the checkpoints afterwards")
    trainer.add_callback(HarmCurve(trainer, harmful_suites(cfg.eval_harm_suites), cfg.eval_harm_limit,
                                   cfg.eval_harm_every, Path(out) / "train_log.jsonl"))
