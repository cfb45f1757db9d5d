"""`safeprobe compare`: methods x seeds x settings (plus per-method sweeps) on identical data, each run trained
and evaluated, summarised in DIR/results.json, DIR/report.md and a self-contained DIR/report.html.

Every run (training + its evaluation) lives in DIR/runs/<name>-<hash of its training config>/ (evaluation in
its `eval/` subfolder): a rerun, or a killed compare started again, skips what already finished (`run_train`
with resume, `run_stage` for evaluations) and a changed setting gets a new folder. results.json is rewritten
atomically after every run, so partial results are never lost.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from rich.console import Console

from ..config_file import from_mapping
from ..errors import TrainingDiverged, UserError, check_seed
from ..evaluation import SUITES, get_suite, run_eval
from ..evaluation.limits import check_limit_suites, parse_limit, restrict_limit
from ..evaluation.suites import HARMFUL, TASK
from ..io import check_output_dir, file_digests, output_lock, sha256_file, sha256_json, write_json
from ..method import get_method
from ..method.checkpoint import checkpoint_folders
from ..reporting.report import write_report
from ..reporting.summary import summarise
from .attack import AttackConfig, run_attack
from .harm_curve import KEYS as HARM_CURVE_KEYS, read_curve
from .resume import run_stage
from .script_arguments import ScriptArguments
from .train import TrainConfig, data_fingerprints, method_records, run_train, task_examples

log = logging.getLogger(__name__)

SET_PER_RUN = ("output_dir", "resume", "seed", "method")  # compare sets these for each run
NOT_IN_HASH = ("output_dir", "resume")  # where a run lives and how it restarts: not what it is
DATA_KEYS = ("dataset_name", "safety_data", "poison_data", "alignment_data")  # a file here is hashed by its content
DEFAULT_HARMFUL_SUITES = ("jbb-harmful", "advbench")
DEFAULT_OVER_REFUSAL_SUITE = "xstest-safe"
DIAGNOSTIC_POINTS = 10  # diagnostics about this many times per run unless `diagnostics_every` is given


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


@dataclass
class EvalSettings:
    """The `eval` section: what every run (and the base model) is evaluated on."""

    suites: str | None = None  # None: two harmful suites, one over-refusal suite and the task's own suite
    judges: str = "keyword"
    limit: str | None = 100  # a number per suite, or per suite: 50,sst2=200 (evaluation.limits)
    max_new_tokens: int = 128
    batch_size: int = 32

    def __post_init__(self):
        self.limit = parse_limit(self.limit, "eval: limit")
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"eval: {name} must be >= 1, got {value}")
        for suite in self.suite_names("sst2"):
            get_suite(suite)  # a typo or a missing prompt file fails here, before any training

    def suite_names(self, task: str) -> list[str]:
        if self.suites:
            return _names(self.suites)
        task_suite = [task] if task in SUITES and SUITES[task].kind == TASK else []
        return [*DEFAULT_HARMFUL_SUITES, DEFAULT_OVER_REFUSAL_SUITE, *task_suite]

    def run_eval_kwargs(self, task: str) -> dict:
        return dict(suites=self.suite_names(task), judges=_names(self.judges), limit=self.limit,
                    max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)


@dataclass
class CompareConfig:
    output_dir: str = _help("where runs/, results.json, report.md and report.html go", "runs/compare")
    base: dict | None = _help("train settings shared by every run (the keys of `safeprobe train`)")
    methods: list | None = _help("method names (sft, sap, safeinstr, lisa), or a mapping name -> train overrides, "
                                 "e.g. {sap_k4: {method: sap, safety_every: 4}}")
    seeds: list | None = _help("seeds of the main runs (none given: 42)")
    settings: dict | None = _help("named variants of `base`, e.g. {p0: {poison_ratio: 0}, p10: {poison_ratio: 0.1}}")
    eval: dict | None = _help("suites, judges, limit, max_new_tokens, batch_size")
    include_base: bool = _help("evaluate the untuned model once as a reference row", True)
    sweep: dict | None = _help("per method one or more knobs and their values, e.g. {sap: {beta: [0.01, 0.1]}}; "
                               "runs at the first seed (or `seeds: [...]` inside) in the first setting")
    attack: dict | None = _help("attack every trained model and the base afterwards (`safeprobe attack`'s keys, "
                                "e.g. {learning_rates: '1e-5,5e-5,2e-4', steps: '10,20'}; suites, judge, limit and "
                                "answer length default to the evaluation's)")

    def __post_init__(self):
        for name in ("base", "methods", "seeds", "settings", "eval", "sweep", "attack"):
            setattr(self, name, _structured(getattr(self, name)))
        self.seeds = _seeds(self.seeds)
        the_plan = plan(self)  # every run's settings are validated now, before anything is loaded
        if self.attack is not None:
            attack_config(self, the_plan, the_plan.base_model, None, Path(self.output_dir))


def attack_config(cfg: CompareConfig, the_plan: Plan, model: str, adapter: str | None, folder: Path):
    """The attack of one model of the comparison: the `attack` section over defaults from the evaluation."""
    kinds = {name: get_suite(name).kind for name in the_plan.eval.suite_names(the_plan.task)}
    harmful = [name for name, kind in kinds.items() if kind == HARMFUL]
    tasks = [name for name, kind in kinds.items() if kind == TASK]
    if not harmful or not tasks:
        raise UserError("key 'attack': the evaluation needs a harmful suite and a task suite to bound the attack by")
    defaults = {"suites": ",".join(harmful), "task_suite": tasks[0], "judge": _names(the_plan.eval.judges)[0],
                "limit": restrict_limit(the_plan.eval.limit, [*harmful, tasks[0]]),
                "max_new_tokens": the_plan.eval.max_new_tokens, "batch_size": the_plan.eval.batch_size}
    fixed = {"model_name_or_path": model, "adapter": adapter, "output_dir": str(folder / "attack")}
    given = _mapping(cfg.attack, "attack")
    clash = sorted(set(given) & set(fixed))
    if clash:
        raise UserError(f"key 'attack': {', '.join(clash)} is set by the comparison (each model is attacked)")
    return from_mapping(AttackConfig, {**defaults, **given, **fixed}, "attack")


def _structured(value):
    """YAML values as they are; a command-line string is read as YAML (`[1, 2]`) or a comma list (`sft,sap`)."""
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise UserError(f"cannot read {value!r} (give YAML, e.g. [sft, sap] or {{sap: {{beta: [0.1]}}}})") from None
    return _names(parsed) if isinstance(parsed, str) else parsed


def _names(value) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _seeds(value, where: str = "seeds") -> list[int]:
    seeds = [TrainConfig.seed] if value is None else value if isinstance(value, list) else [value]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) and not str(s).isdigit() for s in seeds):
        raise UserError(f"key '{where}': expected a list of integers, got {value!r}")
    for seed in seeds:
        check_seed(int(seed), f"key '{where}': a seed")
    return [int(s) for s in seeds]


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"key '{where}': expected a mapping, got {value!r}")
    return value


# -- the plan --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str  # readable: <setting>-<label>[-<knob><value>]-s<seed>
    label: str  # the method entry (a method name or a named variant like sap_k4)
    setting: str
    seed: int
    train: TrainConfig  # output_dir still unset: the folder depends on the output directory
    sweep: dict | None = None  # {"knob", "value"} for a sweep run

    @property
    def digest(self) -> str:
        values = {k: v for k, v in self.train.to_dict().items() if k not in NOT_IN_HASH}
        if not values.get("eval_harm_every"):  # the curve's settings name a run only when it is on
            values = {k: v for k, v in values.items() if k not in HARM_CURVE_KEYS}
        files = file_digests(values[k] for k in DATA_KEYS)
        return sha256_json({**values, "data_files": files} if files else values)[:10]

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.digest}"


@dataclass
class Plan:
    runs: dict[str, Run]  # by name, in the order they run (main runs seed by seed, then sweeps)
    main: dict[str, dict[str, list[str]]]  # setting -> label -> run names (one per seed)
    sweeps: dict[str, dict[str, list[dict]]]  # label -> knob -> [{"value", "runs": [names]}], sorted by value
    eval: EvalSettings
    base_model: str
    task: str
    _names_by_digest: dict[str, str] = field(default_factory=dict)

    def add(self, run: Run) -> str:
        """Add `run` unless a run with the same training config is planned already; returns the name to use."""
        name = self._names_by_digest.setdefault(run.digest, run.name)
        self.runs.setdefault(name, run)
        return name


def plan(cfg: CompareConfig) -> Plan:
    """Every run of the comparison, validated; identical training configs are run once and shared."""
    base = _checked_overrides(cfg.base, "base")
    settings = {str(name): _checked_overrides(values, f"settings.{name}")
                for name, values in _mapping(cfg.settings, "settings").items()} or {"default": {}}
    methods = _method_entries(cfg.methods)
    the_plan = Plan({}, {}, {}, from_mapping(EvalSettings, _mapping(cfg.eval, "eval"), "eval"),
                    base.get("model_name_or_path", TrainConfig.model_name_or_path),
                    base.get("dataset_name", TrainConfig.dataset_name))
    check_limit_suites(the_plan.eval.limit, the_plan.eval.suite_names(the_plan.task), "eval: limit")
    for seed in cfg.seeds:  # seed by seed: after the first seed every method has a comparable result
        for setting, overrides in settings.items():
            for label, entry in methods.items():
                train = _train_config({**base, **overrides, **entry, "seed": seed}, f"methods.{label}")
                name = _run_name(setting if len(settings) > 1 else None, label, None, seed)
                the_plan.main.setdefault(setting, {}).setdefault(label, []).append(
                    the_plan.add(Run(name, label, setting, seed, train)))
    first_setting, first_overrides = next(iter(settings.items()))
    for label, spec in _mapping(cfg.sweep, "sweep").items():
        if label not in methods:
            raise UserError(f"key 'sweep': '{label}' is not one of the methods ({', '.join(methods)})")
        values = {**base, **first_overrides, **methods[label]}
        the_plan.sweeps[label] = _sweep(the_plan, label, first_setting, values, _mapping(spec, f"sweep.{label}"),
                                        cfg.seeds[:1])
    read = set()
    for run in the_plan.runs.values():  # a missing dataset or a bad row fails now, not after the base's evaluation
        train = run.train
        data_fingerprints(train)
        sources = tuple(getattr(train, role.source) for role in get_method(train.method).data)
        data_selection = tuple(str(getattr(train, f.name)) for f in dataclasses.fields(ScriptArguments))
        for sources, read_data in ((data_selection, task_examples),
                                   ((train.method, *sources), method_records)):
            if sources not in read:
                read_data(train)
                read.add(sources)
    return the_plan


def _sweep(the_plan: Plan, label: str, setting: str, values: dict, spec: dict, default_seeds: list) -> dict:
    """knob -> points [{"value", "runs"}] sorted by value; the method's own value is a point of each line."""
    spec = dict(spec)
    seeds = _seeds(spec.pop("seeds", default_seeds), f"sweep.{label}.seeds")
    if not spec:
        raise UserError(f"key 'sweep.{label}': name a knob and its values, e.g. {{beta: [0.01, 0.1]}}")
    lines = {}
    for knob, knob_values in spec.items():
        knob_values = knob_values if isinstance(knob_values, list) else [knob_values]
        own = _train_config(values, f"methods.{label}").value(str(knob))
        points = {}
        for value in [*knob_values, *([own] if own is not None else [])]:
            trains = [_train_config({**values, knob: value, "seed": seed}, f"sweep.{label}") for seed in seeds]
            value = trains[0].value(str(knob))  # as validated (an int knob given as "2" is 2)
            names = [the_plan.add(Run(_run_name(None, label, f"{knob}{_short(value)}", train.seed), label, setting,
                                      train.seed, train, {"knob": knob, "value": value})) for train in trains]
            points.setdefault(repr(value), {"value": value, "runs": names})
        lines[str(knob)] = _sorted_points(list(points.values()))
    return lines


def _checked_overrides(values, where: str, settable=(), shared: bool = True) -> dict:
    """A mapping of train settings, its keys and types checked on their own (errors name where they are)."""
    values = _mapping(values, where)
    for key in SET_PER_RUN:
        if key in values and key not in settable:
            raise UserError(f"key '{where}': '{key}' is set by compare for each run (use `methods`, `seeds`, "
                            "`output_dir`)")
    _train_settings(values, where, shared)
    return values


def _train_settings(values: dict, where: str, shared: bool = True) -> TrainConfig:
    """TrainConfig from a section of the config; a range error names the section (`methods.sap: learning_rate must
    ...`). `shared`: a section for several methods, where a knob of another method than this one is left out."""
    try:
        return TrainConfig.from_values(values, where, shared)
    except UserError as e:
        raise UserError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _method_entries(methods) -> dict[str, dict]:
    """`methods` as {label: train overrides including `method`}."""
    if methods is None:
        raise UserError("key 'methods': list the methods to compare, e.g. [sft, sap]")
    if isinstance(methods, list):
        methods = {str(m): None for m in methods}
    if not isinstance(methods, dict) or not methods:
        raise UserError(f"key 'methods': expected a list of names or a mapping, got {methods!r}")
    entries = {}
    for label, overrides in methods.items():
        label = str(label)
        if not re.fullmatch(r"[A-Za-z0-9_.]+", label):
            raise UserError(f"key 'methods': name '{label}' may only hold letters, digits, '_' and '.'")
        entry = {"method": label, **_mapping(overrides, f"methods.{label}")}
        try:
            get_method(str(entry["method"]))  # a registered method or a composition such as sap+safeinstr
        except UserError as e:
            raise UserError(f"key 'methods.{label}': {e}; give `method:` for a named variant") from None
        entries[label] = _checked_overrides(entry, f"methods.{label}", settable=("method",), shared=False)
    return entries


def _train_config(values: dict, where: str) -> TrainConfig:
    cfg = _train_settings(values, where)
    if not cfg.use_peft:
        raise UserError(f"{where}: compare evaluates LoRA adapters; use_peft must be true")
    if "diagnostics_every" not in values:  # the paper's diagnostics, about DIAGNOSTIC_POINTS times per run
        cfg.diagnostics_every = max(1, _expected_steps(cfg) // DIAGNOSTIC_POINTS)
    cfg.resume = True
    return cfg


def _expected_steps(cfg: TrainConfig) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.n * cfg.num_train_epochs / (cfg.per_device_train_batch_size
                                                        * cfg.gradient_accumulation_steps)))


def _run_name(setting: str | None, label: str, variant: str | None, seed: int) -> str:
    parts = [setting, label, variant, f"s{seed}"]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(p for p in parts if p))


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sorted_points(points: list[dict]) -> list[dict]:
    numeric = all(isinstance(p["value"], (int, float)) and not isinstance(p["value"], bool) for p in points)
    return sorted(points, key=lambda p: p["value"]) if numeric else points


# -- running it ------------------------------------------------------------------------------------------------
def run_compare(cfg: CompareConfig, console: Console) -> dict:
    """Run (or pick up) every run of the plan, then write the report. Returns the results."""
    out = check_output_dir(cfg.output_dir)
    the_plan = plan(cfg)
    with output_lock(out):
        results = _skeleton(cfg, the_plan)
        if cfg.include_base:
            console.rule(f"[bold]base model {the_plan.base_model} (no fine-tuning)")
            results["base"] = _evaluate_base(the_plan, out)
            if cfg.attack is not None:
                results["base"]["attack"] = _attack(cfg, the_plan, the_plan.base_model, None,
                                                    out / results["base"]["folder"], results["base"]["eval"], console)
            _save(out, results)
        total = len(the_plan.runs)
        for i, run in enumerate(the_plan.runs.values(), start=1):
            console.rule(f"[bold][{i}/{total}] {run.name}[/bold] ({run.train.method}, seed {run.seed})")
            record = results["runs"][run.name] = _execute(run, the_plan, out)
            if cfg.attack is not None and record["status"] == "done":
                folder = out / record["folder"]
                record["attack"] = _attack(cfg, the_plan, run.train.model_name_or_path, str(folder), folder,
                                           record["eval"], console)
            _save(out, results)
        write_report(out, results)
    failed = [name for name, r in results["runs"].items() if r["status"] != "done"]
    console.print(f"[green]done[/green]: {total - len(failed)}/{total} runs -> {out / 'results.json'}, "
                  f"{out / 'report.md'}, {out / 'report.html'}" + (f"; diverged: {', '.join(failed)}" if failed
                                                                   else ""))
    return results


def _attack(cfg: CompareConfig, the_plan: Plan, model: str, adapter: str | None, folder: Path, evaluated: dict,
            console) -> dict:
    """The worst attack on one model (its folder's attack/attack.json has the whole grid). The model's own
    evaluation is the attack's reference when it answered the attack's prompts the attack's way."""
    attack = attack_config(cfg, the_plan, model, adapter, folder)
    same = (attack.limit == restrict_limit(the_plan.eval.limit, [*attack.harmful_suites, attack.task_suite])
            and attack.max_new_tokens == the_plan.eval.max_new_tokens
            and attack.judge == _names(the_plan.eval.judges)[0]
            and all(name in evaluated for name in [*attack.harmful_suites, attack.task_suite]))
    result = run_attack(attack, console, evaluated if same else None)
    return {**result["worst"], "before": result["before"],
            "grid": [{k: p[k] for k in ("learning_rate", "steps", "harmful_score", "accuracy")} for p in result["grid"]]}


def _skeleton(cfg: CompareConfig, the_plan: Plan) -> dict:
    return {"config": dataclasses.asdict(cfg), "eval": the_plan.eval.run_eval_kwargs(the_plan.task),
            "main": the_plan.main, "sweeps": the_plan.sweeps, "base": None, "runs": {}, "summary": {}}


def _save(out: Path, results: dict) -> None:
    """results.json after every run, atomically: whatever finished is never lost."""
    results["summary"], results["sweep_summary"] = summarise(results)
    write_json(out / "results.json", results)


def _eval_settings(model: str, eval_kwargs: dict, **more) -> dict:
    """What an evaluation's result depends on; suites given as files by their content (an edited prompt file is
    evaluated again)."""
    files = file_digests(eval_kwargs["suites"])
    return {"model": model, **more, **eval_kwargs, **({"suite_files": files} if files else {})}


def _evaluate_base(the_plan: Plan, out: Path) -> dict:
    settings = _eval_settings(the_plan.base_model, the_plan.eval.run_eval_kwargs(the_plan.task))
    folder = out / "runs" / f"base-{sha256_json(settings)[:10]}"
    result = run_stage(folder, settings, lambda: run_eval(the_plan.base_model, output_dir=str(folder),
                                                           **the_plan.eval.run_eval_kwargs(the_plan.task)))
    return {"folder": str(folder.relative_to(out)), "model": the_plan.base_model, "eval": result["suites"]}


def _execute(run: Run, the_plan: Plan, out: Path) -> dict:
    """Train (or find the finished training) and evaluate (or find the evaluation) of one run."""
    folder = out / "runs" / run.folder_name
    record = {"name": run.name, "label": run.label, "method": run.train.method, "setting": run.setting,
              "seed": run.seed, "sweep": run.sweep, "folder": str(folder.relative_to(out))}
    reset_peak_memory()
    try:
        info = run_train(dataclasses.replace(run.train, output_dir=str(folder)))
    except TrainingDiverged as e:  # a legitimate outcome of a setting (too large a step): recorded, not fatal
        log.warning("%s: %s", run.name, e)
        return {**record, "status": "diverged", "error": str(e)}
    for checkpoint in checkpoint_folders(folder):  # they serve resuming only; a sweep would pile them up
        shutil.rmtree(checkpoint)
    eval_kwargs = the_plan.eval.run_eval_kwargs(run.train.dataset_name)
    settings = _eval_settings(run.train.model_name_or_path, eval_kwargs,
                              adapter=sha256_file(folder / "adapter_model.safetensors"))
    result = run_stage(folder / "eval", settings, lambda: run_eval(
        run.train.model_name_or_path, adapter=str(folder), output_dir=str(folder / "eval"), **eval_kwargs))
    curve = read_curve(folder)  # kept in results.json, so that a stored record can draw it without the run
    return {**record, "status": "done", "train": _train_figures(info), "eval": result["suites"],
            **({"harm_curve": curve} if curve else {})}


def _train_figures(info: dict) -> dict:
    """Train time and peak memory from the run manifest (run.json)."""
    figures = {"wall_time_s": info.get("wall_time_s"), "global_steps": info.get("global_steps"),
               "train_loss": info.get("train_loss"), "peak_memory_mb": info.get("cpu_peak_rss_mb")}
    if info.get("gpu_peak_allocated_mb") is not None:
        figures["peak_memory_mb"] = info["gpu_peak_allocated_mb"]
        figures["cpu_peak_rss_mb"] = info.get("cpu_peak_rss_mb")
    return figures


def reset_peak_memory() -> None:
    """Start each run's peak-memory count afresh: the manifest reads the process peak (CPU RSS, CUDA allocated),
    and one compare process trains many runs. CPU RSS is reset through /proc (Linux); elsewhere it stays the
    process peak so far, an upper bound."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (VmHWM, ru_maxrss) to the current one
    except OSError:
        pass

