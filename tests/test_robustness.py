"""The robustness protocols' parts: harm over training (`eval_harm_every`: harmful-score rows in the step log,
training bit-identical with it on or off, its settings outside the run's identity when off, the report's curve)
and a poisoning sweep (settings that differ in poison_ratio, drawn against it)."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from safeprobe.cli.main import main
from safeprobe.errors import UserError
from safeprobe.experiments.compare import Run
from safeprobe.experiments.train import run_train, train_config
from safeprobe.reporting.pages import filled, page
from safeprobe.reporting.report import setting_knob

from conftest import data_files

SETTINGS = {"model_name_or_path": "tiny-random-llama", "method": "sap", "n": 6, "n_safety": 4, "max_steps": 3,
            "per_device_train_batch_size": 2, "safety_batch_size": 2, "max_length": 40, "lora_r": 4,
            "lora_dropout": 0.1, "logging_steps": 1, "save_steps": 2}


def _steps(folder, key):
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


def test_the_curve_is_written_and_training_is_bit_identical_with_it_on_or_off(tmp_path):
    values = {**SETTINGS, **data_files(tmp_path)}
    on, off = tmp_path / "on", tmp_path / "off"
    run_train(train_config(**values, output_dir=str(on), eval_harm_every=2, eval_harm_limit=2,
                           eval_harm_suites="jbb-harmful, advbench"))
    run_train(train_config(**values, output_dir=str(off)))
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (on, off))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # LoRA dropout on: RNG drift would show
    rows = _steps(on, "eval_harmful_score")
    assert [r["step"] for r in rows] == [0, 2]
    for r in rows:
        assert set(r["eval_harm"]) == {"jbb-harmful", "advbench"}
        assert r["eval_harmful_score"] == pytest.approx(sum(r["eval_harm"].values()) / 2)
        assert all(score in (0.0, 0.5, 1.0) for score in r["eval_harm"].values())  # 2 prompts a suite
    assert not _steps(off, "eval_harmful_score")
    assert [r["step"] for r in _steps(on, "task_loss")] == [r["step"] for r in _steps(off, "task_loss")] == [1, 2, 3]


def test_a_suite_that_is_not_harmful_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"^eval_harm_suites: 'sst2' is not a harmful suite"):
        train_config(**SETTINGS, **data_files(tmp_path), output_dir=str(tmp_path / "x"), eval_harm_every=1,
                     eval_harm_suites="sst2")  # before any model is loaded


def test_the_curve_settings_name_a_run_only_when_it_is_on(tmp_path):
    def digest(**curve):
        return Run("r", "sap", "default", 1, train_config(shared=True, **SETTINGS, **curve)).digest
    assert digest() == digest(eval_harm_limit=7, eval_harm_suites="advbench")  # off: old run folders keep names
    assert digest(eval_harm_every=5) != digest()
    assert digest(eval_harm_every=5, eval_harm_limit=7) != digest(eval_harm_every=5)


def test_compare_draws_harm_against_step(tmp_path):
    base = {**{k: v for k, v in SETTINGS.items() if k != "method"}, **data_files(tmp_path), "eval_harm_every": 1,
            "eval_harm_limit": 1}
    config = {"output_dir": str(tmp_path / "out"), "base": base, "methods": ["sft"], "seeds": [1],
              "include_base": False,
              "eval": {"suites": ["jbb-harmful", "sst2"], "limit": 2, "max_new_tokens": 4, "batch_size": 4}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(tmp_path / "c.yaml")]) == 0
    assert (tmp_path / "out" / "figures" / "harm-curve-default.png").stat().st_size > 1000
    assert "Harmful score against optimiser step" in (tmp_path / "out" / "report.md").read_text()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    run = next(iter(results["runs"].values()))
    logged = _steps(tmp_path / "out" / run["folder"], "eval_harmful_score")
    assert [r["step"] for r in run["harm_curve"]] == [0, 1, 2, 3] == [r["step"] for r in logged]
    assert [r["eval_harmful_score"] for r in run["harm_curve"]] == [r["eval_harmful_score"] for r in logged]
    # a stored record (results.json alone, no run folders) still draws the curve on its results page
    record = {"title": "t", "date": "d", "commit": "c", "machine": "m", "command": "x", "results": results}
    figures = {}
    assert "Harmful score against optimiser step" in page("curve", record, figures)
    assert figures["curve-harm-curve-default.png"][:4] == b"\x89PNG"
    last = logged[-1]["eval_harmful_score"]
    assert filled("{{sft:harm_curve@3}}", results, "curve") == f"{100 * last:.1f}%"


def test_a_poisoning_sweep_up_to_pure_harmful_fine_tuning_is_drawn_against_the_ratio(tmp_path):
    base = {**{k: v for k, v in SETTINGS.items() if k not in ("method", "lora_dropout")}, **data_files(tmp_path),
            "max_steps": 1, "max_length": 160}
    settings = {"p0": {"poison_ratio": 0.0}, "p50": {"poison_ratio": 0.5}, "p100": {"poison_ratio": 1.0}}
    config = {"output_dir": str(tmp_path / "out"), "base": base, "methods": ["sft"], "seeds": [1],
              "settings": settings, "include_base": False,
              "eval": {"suites": ["jbb-harmful", "sst2"], "limit": 1, "max_new_tokens": 2, "batch_size": 4}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(tmp_path / "c.yaml")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert setting_knob(results) == ("poison_ratio", {"p0": 0.0, "p50": 0.5, "p100": 1.0})
    counts = {name: json.loads((tmp_path / "out" / run["folder"] / "run.json").read_text())["data"]
              for name, run in results["runs"].items()}
    assert [counts[f"{s}-sft-s1"]["n_poison"] for s in settings] == [0, 3, 6]  # n = 6: 1.0 is all harmful
    assert (tmp_path / "out" / "figures" / "against-poison_ratio.png").stat().st_size > 1000


def test_settings_are_drawn_against_a_knob_only_when_one_numeric_knob_differs():
    def knob(settings):
        return setting_knob({"config": {"settings": settings}})
    assert knob({"a": {"poison_ratio": 0}, "b": {"poison_ratio": 0.1}}) == ("poison_ratio", {"a": 0, "b": 0.1})
    assert knob({"a": {"poison_ratio": 0}, "b": {"learning_rate": 0.1}}) is None  # two knobs
    assert knob({"a": {"dataset_name": "x"}, "b": {"dataset_name": "y"}}) is None  # not numeric
    assert knob({"a": {"poison_ratio": 0}}) is None and knob(None) is None
