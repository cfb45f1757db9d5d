"""Evaluation outputs: DIR/eval.json (figures), DIR/eval.md (a readable table), DIR/generations.jsonl (answers).

Every file is written atomically, so an interrupted run never leaves a half-written result behind.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..io import write_json, write_text


def write_report(output_dir, result: dict, rows: list[dict]) -> Path:
    """Write the three files into `output_dir` (created if needed); returns the directory."""
    out = Path(output_dir)
    write_json(out / "eval.json", result)
    write_text(out / "eval.md", markdown(result))
    write_text(out / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(result: dict) -> str:
    """One row per suite and judge: metric, value, 95% Wilson interval, n."""
    model = result.get("model") or {}
    lines = ["# safeprobe evaluation", ""]
    if model:
        lines += [f"model: `{model.get('spec')}`" + (f", adapter: `{model['adapter']}`" if model.get("adapter")
                                                     else ""), ""]
    settings = result.get("settings", {})
    lines += [f"greedy decoding, max_new_tokens {settings.get('max_new_tokens')}, limit {settings.get('limit')}",
              "", "| suite | metric | judge / parser | value | 95% CI | n |", "|---|---|---|---|---|---|"]
    for name, s in result["suites"].items():
        entries = s.get("by_judge") or {s["judge"]: {s["metric"]: s[s["metric"]], "ci95": s["ci95"], "n": s["n"]}}
        for judge, e in entries.items():
            low, high = e["ci95"]
            lines.append(f"| {name} | {s['metric']} | {judge} | {_pct(e[s['metric']])} | "
                         f"{_pct(low)} - {_pct(high)} | {e['n']} |")
    losses = {n: s["test_loss"] for n, s in result["suites"].items() if s.get("test_loss") is not None}
    if losses:
        lines += ["", "task test loss (teacher-forced, gold answers): "
                  + ", ".join(f"{n} {v:.4f}" for n, v in losses.items())]
    lines += ["", "judges:"] + [f"- `{n}`: {d}" for n, d in result.get("judges", {}).items()]
    return "\n".join(lines) + "\n"
