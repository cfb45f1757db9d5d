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

from ..evaluation import run_eval
from ..io import output_lock, sha256_file, write_json
from .resume import run_stage
from .train import TrainConfig, check_output_dir, run_train


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
                 safety_batch_size=4, save_steps=5)
    evaluation = dict(suites=["jbb-harmful", "sst2"], judges=["keyword"], limit=limit, max_new_tokens=48)
    return train, evaluation


def run_demo(cfg: DemoConfig, console: Console) -> dict:
    """Rerun after an interruption: finished stages are skipped and training resumes from its checkpoints."""
    out = check_output_dir(cfg.output_dir)
    with output_lock(out):
        return _run_stages(cfg, out, console)


def _run_stages(cfg: DemoConfig, out: Path, console: Console) -> dict:
    train_settings, eval_settings = plan(cfg)
    results = {}
    console.rule("[bold]base model (no fine-tuning)")
    results["base"] = run_stage(out / "base", {"model": cfg.model, **eval_settings},
                                lambda: run_eval(cfg.model, output_dir=str(out / "base"), **eval_settings))
    for method in ("sft", "sap"):
        console.rule(f"[bold]{method}: LoRA on SST-2 with 10% harmful pairs")
        adapter = out / method
        run_train(TrainConfig(method=method, output_dir=str(adapter), resume=True, **train_settings))
        trained = {"model": cfg.model, "adapter": sha256_file(adapter / "adapter_model.safetensors"), **eval_settings}
        results[method] = run_stage(adapter / "eval", trained, lambda: run_eval(
            cfg.model, adapter=str(adapter), output_dir=str(adapter / "eval"), **eval_settings))
    write_json(out / "demo.json", {"config": dataclasses.asdict(cfg), "train": train_settings,
                                   "eval": eval_settings, "results": results})
    console.print(results_table(results, eval_settings))
    console.print(f"results: {out / 'demo.json'}")
    return results


def results_table(results: dict, settings: dict) -> Table:
    table = Table(title="safeprobe demo: harmful score and accuracy, 95% Wilson intervals")
    table.add_column("model")
    suites = next(iter(results.values()))["suites"]
    for name, summary in suites.items():
        table.add_column(f"{name} {summary['metric']} (judge: {summary.get('judge', '-')})")
    for model, res in results.items():
        cells = []
        for summary in res["suites"].values():
            low, high = summary["ci95"]
            cells.append(f"{100 * summary[summary['metric']]:.0f}% [{100 * low:.0f}-{100 * high:.0f}] n={summary['n']}")
        table.add_row(model, *cells)
    return table
