"""`safeprobe demo`: the embedded default end to end on CPU.

Stages that exist today: load the embedded SmolLM2-135M-Instruct, fine-tune it with LoRA on SST-2 with 10%
harmful pairs mixed in, once with plain SFT and once with SAP (same data, same seed), then answer unseen harmful
prompts and SST-2 test sentences with each model and print harmful score and accuracy side by side.
The alignment stage (making an aligned base first) is not implemented yet: the embedded model is not safety
aligned, so every harmful score starts high.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..io import write_json
from .train import TrainConfig, run_train


@dataclass
class DemoConfig:
    output_dir: str = field(default="runs/demo", metadata={"help": "where runs and results go"})
    quick: bool = field(default=False, metadata={"help": "a smaller slice (fewer steps and prompts)"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "model spec"})
    seed: int = field(default=42, metadata={"help": "seed"})


def plan(cfg: DemoConfig) -> tuple[dict, dict]:
    """(training settings, evaluation settings) of the demo."""
    steps, limit = (10, 20) if cfg.quick else (40, 50)
    train = dict(model=cfg.model, task="sst2", n=8 * steps, poison_ratio=0.1, max_steps=steps, batch_size=8,
                 lr=3e-4, max_length=192, seed=cfg.seed, logging_steps=5, eps=0.05, beta=0.05)
    evaluation = dict(suites=["jbb-harmful", "sst2"], judges=["keyword"], limit=limit, max_new_tokens=48)
    return train, evaluation


def run_demo(cfg: DemoConfig, console: Console) -> dict:
    from ..evaluation import run_eval

    out = Path(cfg.output_dir)
    train_settings, eval_settings = plan(cfg)
    results = {}
    console.rule("[bold]base model (no fine-tuning)")
    results["base"] = run_eval(cfg.model, output_dir=str(out / "base"), **eval_settings)
    for method in ("sft", "sap"):
        console.rule(f"[bold]{method}: LoRA on SST-2 with 10% harmful pairs")
        run_train(TrainConfig(method=method, output_dir=str(out / method), **train_settings))
        console.rule(f"[bold]{method}: evaluation")
        results[method] = run_eval(cfg.model, adapter=str(out / method), output_dir=str(out / method / "eval"),
                                   **eval_settings)
    write_json(out / "demo.json", {"config": dataclasses.asdict(cfg), "train": train_settings,
                                   "eval": eval_settings, "results": results})
    console.print(results_table(results))
    console.print(f"results: {out / 'demo.json'}")
    return results


def results_table(results: dict) -> Table:
    table = Table(title="safeprobe demo (judge: keyword)")
    table.add_column("model")
    suites = next(iter(results.values()))["suites"]
    for name, res in suites.items():
        metric = next(k for k in ("harmful_score", "refusal_rate", "accuracy") if k in res)
        table.add_column(f"{name} {metric}")
    for model, res in results.items():
        cells = []
        for name, suite in res["suites"].items():
            metric = next(k for k in ("harmful_score", "refusal_rate", "accuracy") if k in suite)
            cells.append(f"{100 * suite[metric]:.0f}%")
        table.add_row(model, *cells)
    return table
