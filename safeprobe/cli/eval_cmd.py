"""`safeprobe eval`, `safeprobe judge train` and `safeprobe judge validate`."""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console

from ..config_file import comma_separated
from ..errors import UserError, check_seed


@dataclass
class EvalConfig:
    model_name_or_path: str = field(default="smollm2-135m-instruct", metadata={
        "help": "model spec (name, directory or Hub id)"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter directory to apply"})
    suite: str = field(default="jbb-harmful,jbb-benign",
                       metadata={"help": "comma-separated suite names or a JSONL/CSV file of prompts"})
    judge: str = field(default="keyword", metadata={"help": "comma-separated judges: keyword, moderation, "
                                                            "hf-classifier:PATH, harmbench-cls:PATH, "
                                                            "llama-guard:PATH, qwen3guard:PATH, strongreject:PATH"})
    limit: str | None = field(default=None, metadata={
        "help": "prompts per suite (the first N): N for every suite, or per suite as 50,sst2=200,advbench=all"})
    max_new_tokens: int = field(default=128, metadata={"help": "answer length cap"})
    batch_size: int = field(default=32, metadata={"help": "generation batch size"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    allow_base_mismatch: bool = field(default=False, metadata={
        "help": "apply the adapter even if it was trained on another base model (recorded in eval.json)"})
    output_dir: str = field(default="runs/eval", metadata={"help": "where eval.json, eval.md and "
                                                                   "generations.jsonl go"})


def run_eval_command(cfg: EvalConfig, console: Console) -> None:
    from ..evaluation import run_eval
    from ..evaluation.report import markdown
    result = run_eval(cfg.model_name_or_path, cfg.adapter, comma_separated(cfg.suite, "--suite"),
                      comma_separated(cfg.judge, "--judge"), cfg.limit, cfg.output_dir, cfg.max_new_tokens, cfg.batch_size, cfg.dtype,
                      allow_base_mismatch=cfg.allow_base_mismatch)
    console.print(markdown(result), markup=False, highlight=False, soft_wrap=True)
    console.print(f"written to {cfg.output_dir}/eval.json, eval.md, generations.jsonl")


@dataclass
class JudgeTrainConfig:
    seed: int = field(default=0, metadata={"help": "seed of the split-independent training randomness"})
    epochs: int = field(default=30, metadata={"help": "passes of the classifier head over the labelled responses"})
    limit: int | None = field(default=None, metadata={"help": "at most this many responses per source (quick "
                                                              "builds)"})
    output_dir: str | None = field(default=None, metadata={"help": "where to build it (default: the cache)"})

    def __post_init__(self):
        check_seed(self.seed)
        for name in ("epochs", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")


def run_judge_train(cfg: JudgeTrainConfig, console: Console) -> None:
    from ..evaluation.moderation import TrainSettings, train_moderation_judge
    settings = TrainSettings(seed=cfg.seed, epochs=cfg.epochs, limit=cfg.limit)
    config = train_moderation_judge(cfg.output_dir, settings)
    held = config["heldout"]["all"]
    console.print(f"moderation judge built in {config['build_seconds']} s at {config['path']}; held-out "
                  f"accuracy {100 * held['accuracy']:.1f}% (n={held['n']}), balanced over sources "
                  f"{100 * config['heldout']['balanced_accuracy']:.1f}%, threshold {config['threshold']}",
                  soft_wrap=True)


@dataclass
class JudgeValidateConfig:
    judge: str = field(default="keyword", metadata={"help": "judge name: keyword, moderation, hf-classifier:PATH "
                                                            "or a preset (harmbench-cls:PATH, llama-guard:PATH, "
                                                            "qwen3guard:PATH, strongreject:PATH)"})
    output_dir: str | None = field(default=None, metadata={"help": "also write the per-response verdicts here"})


def run_judge_validate(cfg: JudgeValidateConfig, console: Console) -> None:
    from ..evaluation.validate import summary_lines, validate_judge
    report = validate_judge(cfg.judge.strip(), cfg.output_dir)
    for line in summary_lines(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    human = report["human_labelled"]
    console.print(f"human-agreement accuracy: {human['accuracy']:.2f} ({human['correct']}/{human['n']})",
                  markup=False, highlight=False, soft_wrap=True)
