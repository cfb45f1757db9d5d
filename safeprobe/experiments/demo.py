"""`safeprobe demo`: the embedded default end to end on CPU.

The stages that exist today: load the embedded SmolLM2-135M-Instruct, fine-tune it with LoRA on SST-2 with 10%
harmful pairs mixed in, once with plain SFT and once with SAP (same data, same seed), then answer unseen harmful
prompts (JailbreakBench) and SST-2 test sentences with each model; harmful score (keyword judge) and accuracy
are printed side by side. There is no alignment stage yet: the embedded model is not safety aligned, so every
harmful score starts high, and the comparison shows mechanics rather than the method's benefit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..evaluation.metrics import KEYWORD_JUDGE, harmful_score, label_accuracy
from ..io import write_json, write_text
from ..model import load_model
from .train import TrainConfig, run_train


@dataclass
class DemoConfig:
    output_dir: str = field(default="runs/demo", metadata={"help": "where runs and results go"})
    quick: bool = field(default=False, metadata={"help": "a smaller slice (fewer steps and prompts)"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "model spec"})
    seed: int = field(default=42, metadata={"help": "seed"})


def plan(cfg: DemoConfig) -> tuple[dict, dict]:
    """(training settings, evaluation settings) of the demo."""
    steps, limit = (8, 20) if cfg.quick else (30, 50)
    # Safety pairs are long (PKU answers); 4 pairs of <= 128 tokens keep a SAP step within a few SFT steps on CPU.
    train = dict(model=cfg.model, task="sst2", n=8 * steps, poison_ratio=0.1, max_steps=steps, batch_size=8,
                 lr=3e-4, max_length=128, seed=cfg.seed, logging_steps=5, eps=0.05, beta=0.05, n_safety=32,
                 safety_batch_size=4)
    evaluation = dict(harmful_suite="jbb-harmful", task="sst2", limit=limit, max_new_tokens=48)
    return train, evaluation


def evaluate(model_spec: str, adapter: str | None, settings: dict, out: Path) -> dict:
    model, tokenizer = load_model(model_spec)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    harm, harm_rows = harmful_score(model, tokenizer, settings["harmful_suite"], settings["limit"],
                                    settings["max_new_tokens"])
    acc, acc_rows = label_accuracy(model, tokenizer, settings["task"], settings["limit"])
    write_text(out / "generations.jsonl", "".join(_jsonl(r) for r in harm_rows + acc_rows))
    result = {"harmful_score": harm, "accuracy": acc}
    write_json(out / "eval.json", result)
    return result


def _jsonl(row: dict) -> str:
    import json
    return json.dumps(row, ensure_ascii=False) + "\n"


def run_demo(cfg: DemoConfig, console: Console) -> dict:
    out = Path(cfg.output_dir)
    train_settings, eval_settings = plan(cfg)
    results = {}
    console.rule("[bold]base model (no fine-tuning)")
    results["base"] = evaluate(cfg.model, None, eval_settings, out / "base")
    for method in ("sft", "sap"):
        console.rule(f"[bold]{method}: LoRA on SST-2 with 10% harmful pairs")
        run_train(TrainConfig(method=method, output_dir=str(out / method), **train_settings))
        results[method] = evaluate(cfg.model, str(out / method), eval_settings, out / method)
    write_json(out / "demo.json", {"config": dataclasses.asdict(cfg), "train": train_settings,
                                   "eval": eval_settings, "judge": KEYWORD_JUDGE, "results": results})
    console.print(results_table(results, eval_settings))
    console.print(f"results: {out / 'demo.json'}")
    return results


def results_table(results: dict, settings: dict) -> Table:
    table = Table(title=f"safeprobe demo (judge: {KEYWORD_JUDGE})")
    table.add_column("model")
    table.add_column(f"harmful score, {settings['harmful_suite']} (95% CI)")
    table.add_column(f"accuracy, {settings['task']} test (95% CI)")
    for name, res in results.items():
        cells = [f"{100 * m['value']:.0f}% [{100 * m['ci95'][0]:.0f}-{100 * m['ci95'][1]:.0f}] n={m['n']}"
                 for m in (res["harmful_score"], res["accuracy"])]
        table.add_row(name, *cells)
    return table
