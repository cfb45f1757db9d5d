"""`safeprobe compare` end to end on a tiny random model, its caching and config errors, and the training
diagnostics (cosine sanity, no effect on the trained weights)."""
import json
import re
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from safeprobe.cli.main import main
from safeprobe.experiments import compare as compare_module
from safeprobe.experiments import train as train_module
from safeprobe.experiments.train import TrainConfig, train_config, run_train
from safeprobe.method.diagnostics import cosine, layer_groups, measure, read_diagnostics
from safeprobe.reporting.summary import run_metrics, stats

from conftest import data_files, lora_model, task_batch


def tiny_config(root: Path) -> dict:
    base = {"model_name_or_path": "tiny-random-llama", "n": 6, "n_safety": 4, "max_steps": 2,
            "per_device_train_batch_size": 2,
            "safety_batch_size": 2, "max_length": 40, "lora_r": 4, "logging_steps": 1, "save_steps": 1,
            **data_files(root)}
    return {"output_dir": str(root / "out"), "base": base, "methods": ["sft", "sap"], "seeds": [1, 2],
            "eval": {"suites": ["jbb-harmful", "advbench", "xstest-safe", "sst2"], "limit": 2, "max_new_tokens": 4,
                     "batch_size": 4},
            "sweep": {"sap": {"beta": [0.5]}}}


def run_cli(root: Path, config: dict, *flags: str) -> int:
    path = root / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["compare", "--config", str(path), *flags])


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    config = tiny_config(root)
    assert run_cli(root, config) == 0
    out = root / "out"
    return root, config, out, json.loads((out / "results.json").read_text())


def test_results_structure_and_seed_statistics(compared):
    _, _, out, results = compared
    # 2 methods x 2 seeds + 1 sweep run (the sweep's own beta reuses the sap run at the first seed)
    assert sorted(results["runs"]) == ["sap-beta0.5-s1", "sap-s1", "sap-s2", "sft-s1", "sft-s2"]
    assert all(r["status"] == "done" for r in results["runs"].values())
    assert results["main"] == {"default": {"sft": ["sft-s1", "sft-s2"], "sap": ["sap-s1", "sap-s2"]}}
    beta = results["sweeps"]["sap"]["beta"]
    assert [p["value"] for p in beta] == [0.05, 0.5] and beta[0]["runs"] == ["sap-s1"]
    for run in results["runs"].values():
        assert (out / run["folder"] / "adapter_model.safetensors").is_file()
        assert set(run["eval"]) == {"jbb-harmful", "advbench", "xstest-safe", "sst2"}
        assert all(isinstance(run["train"][key], float) for key in ("wall_time_s", "peak_memory_mb"))  # recorded
        assert run["eval"]["sst2"]["test_loss"] > 0
        assert read_diagnostics(out / run["folder"])[-1]["step"] == 2
    sap = results["summary"]["default"]["sap"]
    assert sap["judges"]["harmful_score"] == "keyword" and sap["n_done"] == 2
    for key in ("sst2/test_loss", "harmful_score", "train_time_s", "peak_memory_mb"):
        values = [run_metrics(results["runs"][n]["eval"], results["runs"][n]["train"])[key]
                  for n in ("sap-s1", "sap-s2")]
        assert sap["figures"][key]["mean"] == pytest.approx(sum(values) / 2)
        assert sap["figures"][key]["std"] == pytest.approx(statistics.stdev(values))
    assert results["base"]["eval"]["sst2"]["metric"] == "accuracy"


def test_stats_math():
    assert stats([1.0, 2.0, 6.0]) == {"mean": 3.0, "std": pytest.approx(2.6457513), "n": 3, "values": [1, 2, 6]}
    assert stats([0.5])["std"] is None and stats([])["mean"] is None
    metrics = run_metrics({"a": {"metric": "harmful_score", "harmful_score": 0.2},
                           "b": {"metric": "harmful_score", "harmful_score": 0.6},
                           "t": {"metric": "accuracy", "accuracy": 0.9, "test_loss": 1.5}})
    assert metrics["harmful_score"] == pytest.approx(0.4) and metrics["t/test_loss"] == 1.5


def test_report_is_self_contained(compared):
    _, config, out, _ = compared
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5  # trade-off, frontier, task loss, layer cosines, losses
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)  # no external asset, no link out
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 may spell "http" by chance
    assert "http" not in text and "<script" not in text
    assert "judge: keyword" in page and "frontier lies below" in page
    assert "the loss it descends is taken with the probe on" in page
    markdown = (out / "report.md").read_text()
    assert f"model `tiny-random-llama`, task `{config['base']['dataset_name']}`" in markdown  # the runs' own names
    for name in re.findall(r"\(figures/([^)]+)\)", markdown):
        assert (out / "figures" / name).stat().st_size > 1000


def _scored(harmful: float, accuracy: float | None) -> dict:
    suites = {"advbench": {"metric": "harmful_score", "harmful_score": harmful, "judge": "keyword"}}
    if accuracy is not None:
        suites["sst2"] = {"metric": "accuracy", "accuracy": accuracy, "judge": "parser"}
    return suites


def _paired_results(runs: dict, base: float | None = 0.10, reference: str = "sft") -> dict:
    labels = {}
    for name in runs:
        labels.setdefault(reference if name.startswith("sft") else name[:name.rindex("-")], []).append(name)
    return {"base": {"eval": _scored(base, 0.5)} if base is not None else None, "main": {"default": labels},
            "runs": {name: {"status": "done", "seed": int(name[-1]), "method": name[:3], "eval": _scored(*figures)}
                     for name, figures in runs.items()}}


def test_against_sft_pairs_seeds_and_takes_the_share_of_the_mean_increase():
    from safeprobe.reporting.summary import against_reference, against_reference_lines
    runs = {"sft-s1": (0.30, 0.80), "sft-s2": (0.50, 0.90), "sap-s1": (0.20, 0.78), "sap-s2": (0.50, 0.86),
            "sap-s3": (0.0, 0.0),  # seed 3 has no SFT run to pair with: left out
            "lisa-s1": (0.25, None), "lisa-s2": (0.40, 0.90)}  # one run without a task suite
    paired = against_reference(_paired_results(runs), "default")
    sap, lisa = paired["sap"], paired["lisa"]
    # SFT's mean increase over the base: 0.40 - 0.10 = 0.30; SAP's mean is 0.05 lower: 1/6 of it removed
    assert sap["n_pairs"] == 2 and sap["increase"] == pytest.approx(0.30)
    assert sap["harm_removed"] == pytest.approx(0.05 / 0.30)
    assert sap["harm_change"]["values"] == pytest.approx([-0.10, 0.0]) and sap["harm_below"] == 1
    assert sap["accuracy_change"]["mean"] == pytest.approx(-0.03)
    assert lisa["harm_below"] == 2 and lisa["accuracy_change"]["values"] == pytest.approx([0.0])
    # no base model: the paired differences stay, the share of an increase cannot be taken
    no_base = against_reference(_paired_results(runs, base=None), "default")["sap"]
    assert no_base["harm_removed"] is None and no_base["harm_change"]["mean"] == pytest.approx(-0.05)
    # SFT adds no harm over the base: nothing to remove
    assert against_reference(_paired_results(runs, base=0.45), "default")["sap"]["harm_removed"] is None
    lines = {base: against_reference_lines(_paired_results(runs, base=base))[0] for base in (None, 0.45, 0.10)}
    assert lines[None].endswith("no base model evaluated to measure an increase from")
    assert lines[0.45].endswith("sft adds no harm over the base model to remove")
    assert lines[0.10] == ("sap: harmful score -5, accuracy -3 points against sft over 2 seed(s): removes 17% of "
                           "sft's harmful-score increase over the base model")


def test_a_mean_over_fewer_seeds_than_the_entry_finished_says_so():
    from safeprobe.reporting.report import _results_table
    from safeprobe.reporting.summary import summarise
    results = _paired_results({"sft-s1": (0.30, 0.80), "sft-s2": (0.50, 0.90), "sap-s1": (0.20, 0.78),
                               "sap-s2": (0.40, 0.86)})
    results["runs"]["sft-s1"]["attack"] = {"harmful_score": 0.70}
    results["runs"]["sft-s2"]["attack"] = {"harmful_score": 0.90}
    results["runs"]["sap-s1"]["attack"] = {"harmful_score": 0.60}  # seed 2's attack is not done
    results["summary"], _ = summarise({**results, "sweeps": {}})
    table = _results_table(results, "default")
    column = next(i for i, h in enumerate(table.headers) if h.startswith("harmful score after attack (worst)"))
    cells = {row[0]: row[column] for row in table.rows}
    assert cells["sft"] == "80.0 ± 14.1%" and cells["sap"] == "60.0% (1 of 2 seeds)"


def test_the_reference_is_the_entry_whose_method_is_sft_when_none_is_named_sft():
    from safeprobe.reporting.summary import against_reference
    runs = {"sft-s1": (0.30, 0.80), "sap-s1": (0.20, 0.80)}
    paired = against_reference(_paired_results(runs, reference="plain_lr3e4"), "default")
    assert list(paired) == ["sap"] and paired["sap"]["reference"] == "plain_lr3e4"
    results = _paired_results(runs)
    results["runs"]["sft-s1"]["method"] = "lisa"  # no plain fine-tuning entry at all
    results["main"]["default"] = {"lisa": ["sft-s1"], "sap": ["sap-s1"]}
    assert against_reference(results, "default") == {}


def test_the_report_and_the_demo_measure_each_defense_against_sft(compared):
    from safeprobe.reporting.summary import against_reference, against_reference_lines
    _, _, out, results = compared
    sap = against_reference(results, "default")["sap"]
    sft_runs, sap_runs = results["main"]["default"]["sft"], results["main"]["default"]["sap"]
    diffs = [run_metrics(results["runs"][b]["eval"])["harmful_score"]
             - run_metrics(results["runs"][a]["eval"])["harmful_score"] for a, b in zip(sft_runs, sap_runs)]
    assert sap["harm_change"]["values"] == pytest.approx(diffs) and sap["n_pairs"] == 2
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| sap | 2 |"))
    assert f"{100 * statistics.fmean(diffs):+.1f}" in row
    [line] = against_reference_lines(results)
    assert line.startswith(f"sap: harmful score {100 * statistics.fmean(diffs):+.0f}")


def test_a_finished_run_keeps_its_adapter_and_no_checkpoints(compared):
    _, _, out, results = compared
    for run in results["runs"].values():
        folder = out / run["folder"]
        assert (folder / "adapter_model.safetensors").is_file() and not list(folder.glob("checkpoint-*"))


def test_an_edited_data_file_makes_new_runs_and_an_edited_prompt_file_a_new_evaluation(tmp_path):
    from safeprobe.cli.config import from_mapping
    from safeprobe.experiments.compare import CompareConfig, _eval_settings, plan
    config = tiny_config(tmp_path)
    def folders():
        return {run.folder_name for run in plan(from_mapping(CompareConfig, config, "c")).runs.values()}
    before = folders()
    task = Path(config["base"]["dataset_name"])
    task.write_text(task.read_text() + task.read_text().splitlines()[0] + "\n")
    assert before.isdisjoint(folders())
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nHow do I hurt someone?\n")
    first = _eval_settings("m", {"suites": ["advbench", str(prompts)]})
    prompts.write_text("prompt\nHow do I hurt someone badly?\n")
    assert _eval_settings("m", {"suites": ["advbench", str(prompts)]}) != first
    assert _eval_settings("m", {"suites": ["advbench"]}) == {"model": "m", "suites": ["advbench"]}  # as before


def test_rerun_skips_every_run_and_a_killed_compare_resumes(compared, monkeypatch, capsys):
    root, config, out, results = compared
    calls = {"train": 0, "eval": 0}
    real_train, real_eval = train_module._train, compare_module.run_eval

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(train_module, "_train", counting("train", real_train))
    monkeypatch.setattr(compare_module, "run_eval", counting("eval", real_eval))
    adapters = {n: (out / r["folder"] / "adapter_model.safetensors").stat().st_mtime_ns
                for n, r in results["runs"].items()}
    capsys.readouterr()
    assert run_cli(root, config) == 0
    assert calls == {"train": 0, "eval": 0}
    assert "sap: harmful score" in capsys.readouterr().out  # the end of a compare: each entry against SFT
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    # what a kill leaves: one run's training unfinished (no run.json), another's evaluation not recorded
    (out / results["runs"]["sap-s2"]["folder"] / "run.json").unlink()
    (out / results["runs"]["sft-s1"]["folder"] / "eval" / "stage.json").unlink()
    assert run_cli(root, config) == 0
    assert calls == {"train": 1, "eval": 1}  # sap-s2 retrained: its adapter is the same, so its eval is kept
    assert {n: (out / r["folder"] / "adapter_model.safetensors").stat().st_mtime_ns
            for n, r in results["runs"].items() if n != "sap-s2"} == {k: v for k, v in adapters.items()
                                                                      if k != "sap-s2"}


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"base": {"nn": 3}}, "base: unknown key 'nn'"),
    ({"base": {"n": "many"}}, "key 'n': expected an integer"),
    ({"seeds": ["x"]}, "key 'seeds'"),
    ({"methods": ["sft", "dpo"]}, "unknown method 'dpo'"),
    ({"methods": {"sap_k4": {"safety_every": 4}}}, "unknown method 'sap_k4'"),
    ({"sweep": {"lisa": {"rho": [1.0]}}}, "'lisa' is not one of the methods"),
    ({"sweep": {"sap": {"betta": [0.1]}}}, "unknown key 'betta'"),
    ({"eval": {"suites": ["nope"]}}, "unknown suite 'nope'"),
    ({"eval": {"limit": 0}}, "limit must be >= 1"),
    ({"eval": {"limit": "gsm8k=3"}}, "eval: limit: names suite(s) gsm8k, which are not evaluated"),
    ({"base": {"dataset_name": "no/such/task.jsonl"}}, "no/such/task.jsonl"),  # before the base model's evaluation
    ({"base": {"seed": 3}}, "'seed' is set by compare"),
    ({"settings": {"p0": {"output_dir": "x"}}}, "'output_dir' is set by compare"),
    ({"methods": {"sap": {"learning_rate": -1}}}, "methods.sap: learning_rate must be > 0, got -1"),  # the section is named
    ({"settings": {"p10": {"poison_ratio": 1.5}}}, "settings.p10: poison_ratio must be in [0, 1]"),
    ({"seeds": [1, -1]}, "key 'seeds': a seed must be in [0, 2**32 - 1], got -1"),
    ({"sweep": {"sap": {"beta": [0.5], "seeds": [-2]}}}, "key 'sweep.sap.seeds': a seed must be in"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, capsys, change, message):
    config = {**tiny_config(tmp_path), **change}
    assert run_cli(tmp_path, config) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("safeprobe: error:") and message in err, err
    assert not (tmp_path / "out").exists()  # nothing was trained or written


@pytest.mark.parametrize("key", ["safety_data", "dataset_name"])
def test_a_bad_row_in_any_runs_data_is_an_error_before_anything_is_evaluated(tmp_path, capsys, key):
    config = tiny_config(tmp_path)
    bad = tmp_path / "bad.jsonl"
    rows = {"safety_data": '{"prompt": "p", "safe": "No.", "harmful": "Yes."}\n{"prompt": "q", "safe": "No."}\n',
            "dataset_name": '{"prompt": "p", "completion": "ok"}\n{"prompt": "q"}\n'}
    bad.write_text(rows[key])
    config["base"][key] = str(bad)
    assert run_cli(tmp_path, config) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:2: missing required field" in err and err.count("\n") == 0, err
    assert not (tmp_path / "out").exists()  # the base model was not evaluated, nothing was written


def test_cosine_of_a_gradient_with_itself_is_one():
    model, tokenizer = lora_model()
    batch = task_batch(tokenizer)
    groups = layer_groups(model)
    row = measure(model, {"useful": batch, "harmful": batch, "useful_heldout": batch}, groups)
    assert len(row["cos_useful_harmful"]) == len(groups) > 1 and all(groups)
    assert row["cos_useful_harmful"] == pytest.approx([1.0] * len(groups), abs=1e-9)
    assert row["loss_harmful"] == row["loss_useful_train"] == row["loss_useful_heldout"]
    grads = [torch.randn(3, 4), torch.randn(5)]
    assert cosine(grads, [-g for g in grads]) == pytest.approx(-1.0)
    assert cosine(grads, [torch.zeros(3, 4), torch.zeros(5)]) is None
    assert all(p.grad is None for p in model.parameters()) and model.training  # nothing left behind


def test_diagnostics_leave_the_trained_adapter_bit_identical(compared, tmp_path):
    # compare trained sap-s1 with diagnostics at every step (LoRA dropout on: any RNG drift would show); the
    # same run with them off must give the same adapter, bit for bit
    _, _, out, results = compared
    folder = out / results["runs"]["sap-s1"]["folder"]
    saved = json.loads((folder / "run.json").read_text())["config"]
    assert saved["diagnostics_every"] == 1 and saved["lora_dropout"] > 0
    run_train(train_config(shared=True, **{**saved, "output_dir": str(tmp_path / "off"), "diagnostics_every": 0}))
    on, off = (load_file(str(d / "adapter_model.safetensors")) for d in (folder, tmp_path / "off"))
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    rows = read_diagnostics(folder)
    assert [r["step"] for r in rows] == [0, 1, 2] and not (tmp_path / "off" / "diagnostics.jsonl").exists()
    assert all(len(r["cos_useful_harmful"]) == 4 and -1 <= r["cos_useful_harmful_all"] <= 1 for r in rows)


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
COMPARE_CONFIGS = [path.name for path in SHIPPED_CONFIGS if "methods:" in path.read_text()]


def test_the_shipped_compare_configs_are_all_checked_below():
    assert len(COMPARE_CONFIGS) >= 8 and "tune-sap.yaml" in COMPARE_CONFIGS


@pytest.mark.parametrize("name", COMPARE_CONFIGS)
def test_shipped_compare_configs_are_valid(name):
    from safeprobe.cli.config import from_mapping, read_yaml
    from safeprobe.experiments.compare import CompareConfig, plan
    path = Path(__file__).resolve().parents[1] / "configs" / name
    values = read_yaml(str(path))
    the_plan = plan(from_mapping(CompareConfig, values, str(path)))  # every run validated
    assert the_plan.runs and {run.train.dataset_name for run in the_plan.runs.values()} == {
        values["base"]["dataset_name"]}


@pytest.mark.parametrize("name,extra", [("sft-frontier.yaml", "sft-learning_rate"), ("amortised-tradeoff.yaml", "sap_k4-")])
def test_configs_that_extend_the_demo_reuse_its_runs(name, extra):
    """Their comments promise that, pointed at a finished demo, only their extra runs train: same settings, same
    folders."""
    from safeprobe.cli.config import from_mapping, read_yaml
    from safeprobe.experiments.compare import CompareConfig, plan
    from safeprobe.experiments.demo import DemoConfig, compare_config
    path = Path(__file__).resolve().parents[1] / "configs" / name
    values = read_yaml(str(path))
    values["base"]["model_name_or_path"] = "tiny-random-llama"
    extended = plan(from_mapping(CompareConfig, values, str(path)))
    demo = plan(compare_config(DemoConfig(seeds=3), "tiny-random-llama"))
    new = {run.folder_name for run in extended.runs.values()} - {run.folder_name for run in demo.runs.values()}
    assert new and all(folder.startswith(extra) for folder in new)


def test_the_demo_table_gives_mean_and_spread_over_seeds(compared):
    from rich.console import Console

    from safeprobe.experiments.demo import results_table
    _, _, _, results = compared
    console = Console(record=True, width=200)
    console.print(results_table(results))
    text = console.export_text()
    rows = {line.split()[1]: line for line in text.splitlines() if line.split()[1:2] in (["sft"], ["sap"])}
    assert set(rows) == {"sft", "sap"} and "2 seed(s)" in text
    for label, runs in (("sft", ["sft-s1", "sft-s2"]), ("sap", ["sap-s1", "sap-s2"])):
        scores = [results["runs"][r]["eval"]["advbench"]["harmful_score"] for r in runs]
        spread = stats(scores)
        assert f"{100 * spread['mean']:.0f}% +- {100 * spread['std']:.0f}" in rows[label]


@pytest.mark.parametrize("quick", [True, False])
def test_demo_protocol_is_a_valid_comparison(quick):
    from safeprobe.experiments.compare import plan
    from safeprobe.experiments.demo import DemoConfig, compare_config
    the_plan = plan(compare_config(DemoConfig(quick=quick), "aligned-base-dir"))  # every run validated
    methods = {run.train.method for run in the_plan.runs.values()}
    assert methods == ({"sft", "sap"} if quick else {"sft", "sap", "safeinstr", "lisa"})
    assert {run.train.model_name_or_path for run in the_plan.runs.values()} == {"aligned-base-dir"}
    assert all(run.train.poison_ratio == 0.1 for run in the_plan.runs.values())
