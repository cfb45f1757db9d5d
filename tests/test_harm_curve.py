"""Harm over training (`eval_harm_every`): harmful-score rows in the step log, training bit-identical with it on
or off, its settings outside the run's identity when off, and the report's curve."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from safeprobe.cli.main import main
from safeprobe.errors import UserError
from safeprobe.experiments.compare import Run
from safeprobe.experiments.train import run_train, train_config

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
    cfg = train_config(**SETTINGS, **data_files(tmp_path), output_dir=str(tmp_path / "x"), eval_harm_every=1,
                       eval_harm_suites="sst2")
    with pytest.raises(UserError, match=r"^eval_harm_suites: 'sst2' is not a harmful suite"):
        run_train(cfg)


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
