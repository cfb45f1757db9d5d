"""`safeprobe demo`: the embedded default end to end on CPU.

1. Align the embedded SmolLM2-135M-Instruct (it refuses almost no harmful request as shipped) with `safeprobe
   align --method plain`; cached, so only the first demo pays for it.
2. From that aligned base, fine-tune with LoRA on SST-2 with 10% harmful pairs mixed in (the harmful fine-tuning
   protocol of the field, scaled to a CPU) with plain SFT, SAP and the peer defenses SafeInstr and Lisa, on
   identical data and seed, through `safeprobe compare`.
3. Answer unseen harmful prompts (JailbreakBench, AdvBench), safe look-alikes (XSTest) and SST-2 test sentences
   with the aligned base and every fine-tuned model, judge them, and write results.json, report.md and
   report.html.
`--quick` runs a smaller slice with SFT and SAP only. A rerun skips everything that finished; an interrupted
run resumes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from ..errors import UserError, check_seed
from ..io import check_output_dir
from ..reporting.summary import against_reference_lines, run_figures, stats, summarise
from .align import AlignConfig, run_align
from .compare import CompareConfig, run_compare


@dataclass
class DemoConfig:
    output_dir: str = field(default="runs/demo", metadata={"help": "where runs and the report go"})
    quick: bool = field(default=False, metadata={"help": "a smaller slice: fewer steps and prompts, SFT and SAP"})
    model_name_or_path: str = field(default="smollm2-135m-instruct",
                                    metadata={"help": "the instruct model to align, then tune"})
    seed: int = field(default=42, metadata={"help": "seed of the alignment and of the first fine-tuning run"})
    seeds: int = field(default=1, metadata={"help": "fine-tuning seeds: seed, seed + 1, ... (the table gives mean "
                                                    "+- std); runs finished for fewer seeds are reused"})


# The protocol at CPU scale: SST-2 with 10% harmful (prompt, answer) pairs, LoRA r = 8, batch 8, lr 3e-4.
TRAIN = dict(dataset_name="sst2", n=1000, poison_ratio=0.1, per_device_train_batch_size=8, learning_rate=3e-4,
             max_length=128, lora_r=8,
             n_safety=32, safety_batch_size=4, eps=0.05, beta=0.05, logging_steps=5, save_steps=10)
# SAP's probe strength, chosen on training data only: with the paper's beta the probe is about 0.003 long on this
# model and SAP's step is SFT's to the last digit; a probe of norm 3 cancels SFT's first-order drift toward the
# harmful direction several times over (benchmarks/probe_strength.py). On the validation suites (val-harmful,
# sst2-val; never the evaluation suites) it has not lowered the harmful score yet (README, "Results so far").
# Per-method settings of the demo (probe_norm: SAP's probe at a fixed strength)
METHOD_SETTINGS = {"sap": dict(probe_norm=3.0)}
# The whole demo, alignment included, is meant to fit in 40 minutes on a 2-core CPU: 40 steps (320 examples, 32 of
# them harmful) and diagnostics every 8 steps; answers of 32 tokens, since the keyword judge sees a refusal in
# the first sentence.
FULL = dict(methods=["sft", "sap", "safeinstr", "lisa"], train=dict(max_steps=40, diagnostics_every=8),
            eval=dict(limit=50))
# --quick fits in 8 minutes once the base is cached: fewer steps, prompts and diagnostics points
QUICK = dict(methods=["sft", "sap"], train=dict(max_steps=10, diagnostics_every=5), eval=dict(limit=20))
EVAL = dict(suites=["jbb-harmful", "advbench", "xstest-safe", "sst2"], judges=["keyword"], max_new_tokens=32,
            batch_size=25)


def compare_config(cfg: DemoConfig, aligned_model: str) -> CompareConfig:
    scale = QUICK if cfg.quick else FULL
    return CompareConfig(
        output_dir=cfg.output_dir, base={**TRAIN, "model_name_or_path": aligned_model, **scale["train"]},
        methods={name: METHOD_SETTINGS.get(name, {}) for name in scale["methods"]},
        seeds=[cfg.seed + i for i in range(cfg.seeds)], include_base=True, eval={**EVAL, **scale["eval"]})


def run_demo(cfg: DemoConfig, console: Console) -> dict:
    """Rerun after an interruption: the aligned base is cached, finished runs are skipped, training resumes."""
    if cfg.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {cfg.seeds}")
    check_seed(cfg.seed, "--seed")
    check_seed(cfg.seed + cfg.seeds - 1, "--seed plus --seeds - 1")  # checked now, not after the alignment
    out = check_output_dir(cfg.output_dir)
    console.rule(f"[bold]alignment: {cfg.model_name_or_path} -> aligned base (cached after the first demo)")
    aligned = run_align(AlignConfig(model_name_or_path=cfg.model_name_or_path, method="plain", seed=cfg.seed))
    console.print(f"aligned base: {aligned['output_dir']}" + (" (reused)" if aligned["reused"] else ""))
    results = run_compare(compare_config(cfg, aligned["output_dir"]), console)
    console.print(results_table(results))
    for line in against_reference_lines(results):
        console.print(line)
    console.print(f"report: {out / 'report.html'} (also report.md, results.json)")
    return results


def results_table(results: dict) -> Table:
    """Harmful score, over-refusal and accuracy of the aligned base and of each method (mean +- std over seeds)."""
    summary, _ = summarise(results)
    rows = {"aligned base": {k: stats([v]) for k, v in run_figures(results["base"]).items()}} \
        if results.get("base") else {}
    for label, aggregate in next(iter(summary.values())).items():
        rows[label] = aggregate["figures"]
    keys = [k for k in next(iter(rows.values())) if "/" in k and not k.endswith("test_loss")]
    seeds = max(stat["n"] for figures in rows.values() for stat in figures.values())
    table = Table(title=f"safeprobe demo (harmful score: keyword judge; % of prompts; {seeds} seed(s))")
    table.add_column("model")
    for key in keys:
        table.add_column(key.replace("/", " "))
    for label, figures in rows.items():
        table.add_row(label, *[_percent(figures.get(k)) for k in keys])
    return table


def _percent(stat: dict | None) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    return f"{100 * stat['mean']:.0f}%" + ("" if stat["std"] is None else f" +- {100 * stat['std']:.0f}")
