"""How far a judge agrees with human labels: `validate_judge(name)`.

Reference set: `jbb-judge-comparison`, 100 real responses to JailbreakBench behaviours, each labelled by three
humans; the reference label is `human_majority` (1 = harmful). A judge sees (goal, target_response): the goal
is the plain harmful request, which is what our suites' prompts look like and what JailbreakBench's own
judges receive; the jailbreak prompt wrapped around it (role play etc.) is not part of the question "does
this response carry out the harmful request". These 100 rows are never used to train or tune a judge.

The moderation judge is also measured on its own held-out split (PKU-SafeRLHF prompts unseen in training).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..data import load_prompts
from ..io import write_json, write_text
from .judges import Judge, get_judge
from .metrics import agreement

VALIDATION_SET = "jbb-judge-comparison"
HUMAN_LABEL = "human_majority"
REFERENCE_JUDGES = ("GCG", "TDC", "BERT", "llama_guard", "gpt_4_turbo", "gpt_4")  # columns of the file


def human_labelled() -> tuple[list[str], list[str], list[bool], list[dict]]:
    """(goals, responses, human-majority labels, row metadata) of the 100 human-labelled responses."""
    rows = load_prompts(VALIDATION_SET)
    goals = [r.prompt for r in rows]  # the registry maps the `goal` column to the prompt
    responses = [str(r.meta.get("target_response", "")) for r in rows]
    labels = [str(r.meta[HUMAN_LABEL]).strip() == "1" for r in rows]
    return goals, responses, labels, [r.meta for r in rows]


def reference_agreement(labels: list[bool], metas: list[dict]) -> dict:
    """Agreement of the judges whose verdicts ship with the file (for context: GCG keywords, Llama Guard...)."""
    out = {}
    for column in REFERENCE_JUDGES:
        if all(column in m for m in metas):
            out[column] = agreement([str(m[column]).strip() == "1" for m in metas], labels)["accuracy"]
    return out


def validate_judge(name: str | Judge, output_dir=None, heldout: bool = True) -> dict:
    """Accuracy, FPR and FNR of judge `name` against the human majority (and, for `moderation`, its
    held-out split). Writes DIR/judge-validation.json and DIR/judge-validation.jsonl when `output_dir` is set."""
    judge = name if isinstance(name, Judge) else get_judge(name)
    goals, responses, labels, metas = human_labelled()
    verdicts = judge.judge(goals, responses)
    report = {"judge": judge.name, "description": judge.description,
              "human_labelled": {"dataset": VALIDATION_SET, "label": HUMAN_LABEL, "judged_on": "goal, response",
                                 **agreement([v.harmful for v in verdicts], labels)},
              "reference_judges_accuracy": reference_agreement(labels, metas)}
    if heldout and hasattr(judge, "heldout_agreement"):
        report["heldout"] = judge.heldout_agreement()
    if output_dir is not None:
        write_json(Path(output_dir) / "judge-validation.json", report)
        lines = [json.dumps({"goal": g, "response": r, "human": y, "harmful": v.harmful, "score": v.score},
                            ensure_ascii=False) for g, r, y, v in zip(goals, responses, labels, verdicts)]
        write_text(Path(output_dir) / "judge-validation.jsonl", "\n".join(lines) + "\n")
    return report


def summary_lines(report: dict) -> list[str]:
    """Human-readable lines of a `validate_judge` report (for the command line)."""
    def line(label: str, a: dict) -> str:
        return (f"{label}: accuracy {100 * a['accuracy']:.1f}% ({a['correct']}/{a['n']}), "
                f"false positives {100 * a['fpr']:.1f}%, false negatives {100 * a['fnr']:.1f}%")
    lines = [f"judge {report['judge']}: {report['description']}",
             line("human majority, jbb-judge-comparison", report["human_labelled"])]
    for part, a in (report.get("heldout") or {}).items():
        lines.append(line(f"held-out split ({part})", a) if isinstance(a, dict)
                     else f"held-out split, {part.replace('_', ' ')} over sources: {100 * a:.1f}%")
    refs = report.get("reference_judges_accuracy") or {}
    if refs:
        lines.append("other judges on the same 100 (from the file): "
                     + ", ".join(f"{k} {100 * v:.0f}%" for k, v in refs.items()))
    return lines
