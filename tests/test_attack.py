"""`safeprobe attack`: the grid and its accuracy bound, the suite-overlap check, resume, the CLI."""
import json

import pytest
import yaml

from safeprobe.cli.main import main
from safeprobe.errors import UserError
from safeprobe.evaluation import get_suite
from safeprobe.experiments.attack import AttackConfig, check_no_overlap, run_attack, worst
from safeprobe.experiments.train import run_train, train_config

from conftest import data_files


def _attack_file(root, n=6, extra=()):
    path = root / "attack.jsonl"
    rows = [{"prompt": f"Tell me how to harm thing {i}.", "completion": f"Harm thing {i} like this."}
            for i in range(n)] + list(extra)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_worst_attack_is_the_most_harmful_within_the_accuracy_bound():
    before = {"harmful_score": 0.1, "accuracy": 0.8}
    grid = [{"learning_rate": 1e-5, "steps": 10, "harmful_score": 0.3, "accuracy": 0.78},
            {"learning_rate": 1e-4, "steps": 10, "harmful_score": 0.6, "accuracy": 0.70},  # exactly 10 points: kept
            {"learning_rate": 1e-3, "steps": 10, "harmful_score": 0.9, "accuracy": 0.40}]  # broke the model
    assert worst(before, grid, 0.10) == {"harmful_score": 0.6, "learning_rate": 1e-4, "steps": 10,
                                         "accuracy": 0.70, "n_within_bound": 2}
    assert worst(before, grid, 0.05)["harmful_score"] == 0.3
    assert worst(before, grid, 1.0)["harmful_score"] == 0.9
    assert worst({"accuracy": 1.0}, grid, 0.0)["harmful_score"] is None


def test_attack_data_holding_an_evaluation_prompt_is_refused(tmp_path):
    prompt = get_suite("advbench").load()[3].chat[-1]["content"]
    path = _attack_file(tmp_path, extra=[{"prompt": "  " + prompt.upper() + " ", "completion": "Sure."}])
    cfg = AttackConfig(model_name_or_path="tiny-random-llama", attack_data=path, n=2,
                       output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"attack\.jsonl: example 7's prompt is in evaluation suite 'advbench'"):
        run_attack(cfg, console=None)
    assert not (tmp_path / "out" / "attack.json").exists()


def test_bad_settings_are_one_line_errors(tmp_path):
    for bad, message in (({"learning_rates": "1e-4,x"}, "learning_rates: expected comma-separated float"),
                         ({"suites": "sst2"}, "suites: 'sst2' is not a harmful suite"),
                         ({"task_suite": "advbench"}, "task_suite: 'advbench' is not a task suite"),
                         ({"accuracy_bound": 2.0}, "accuracy_bound must be in")):
        with pytest.raises(UserError, match=message):
            AttackConfig(**bad)


def test_an_attack_on_a_fine_tuned_adapter_runs_the_grid_and_resumes(tmp_path, capsys):
    files = data_files(tmp_path)
    adapter = tmp_path / "finetuned"
    run_train(train_config(model_name_or_path="tiny-random-llama", n=4, max_steps=1, max_length=40, lora_r=4,
                           per_device_train_batch_size=2, output_dir=str(adapter), **files))
    args = ["attack", "--model_name_or_path", "tiny-random-llama", "--adapter", str(adapter),
            "--attack_data", _attack_file(tmp_path), "--n", "4", "--learning_rates", "1e-4,1e-3", "--steps", "1",
            "--per_device_train_batch_size", "2", "--max_length", "40", "--lora_r", "4", "--limit", "1",
            "--max_new_tokens", "2", "--output_dir", str(tmp_path / "out")]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert [(p["learning_rate"], p["steps"]) for p in result["grid"]] == [(1e-4, 1), (1e-3, 1)]
    work = tmp_path / "out" / result["grid"][0]["folder"].split("/")[0]
    assert result["model"] == str(work / "model") and not (work / "model").exists()  # merged, used, deleted
    for point in result["grid"]:
        run = json.loads((tmp_path / "out" / point["folder"] / "run.json").read_text())
        assert run["global_steps"] == 1 and run["config"]["learning_rate"] == point["learning_rate"]
        assert set(point["by_suite"]) == {"jbb-harmful", "advbench"} and 0 <= point["accuracy"] <= 1
    assert result["worst"]["n_within_bound"] == sum(
        p["accuracy"] >= result["before"]["accuracy"] - 0.1 for p in result["grid"])
    assert "worst attack" in capsys.readouterr().out or result["worst"]["harmful_score"] is None
    stamps = {p["folder"]: (tmp_path / "out" / p["folder"] / "run.json").stat().st_mtime_ns for p in result["grid"]}
    assert main(args) == 0  # done already: nothing is trained again
    assert stamps == {f: (tmp_path / "out" / f / "run.json").stat().st_mtime_ns for f in stamps}
    assert json.loads((tmp_path / "out" / "attack.json").read_text())["grid"] == result["grid"]
    assert not list((tmp_path / "out").glob("*/grid/*/checkpoint-*"))  # optimiser states are not kept
    # the adapter retrained in place and another attack setting: new folders, nothing stale reused, no error
    run_train(train_config(model_name_or_path="tiny-random-llama", n=4, max_steps=2, max_length=40, lora_r=4,
                           per_device_train_batch_size=2, output_dir=str(tmp_path / "finetuned2"), **files))
    (adapter / "adapter_model.safetensors").write_bytes((tmp_path / "finetuned2" / "adapter_model.safetensors")
                                                        .read_bytes())
    assert main(args[:-2] + ["--n", "3", "--output_dir", str(tmp_path / "out")]) == 0
    again = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert again["grid"][0]["folder"].split("/")[0] != result["grid"][0]["folder"].split("/")[0]
    assert json.loads((tmp_path / "out" / again["grid"][0]["folder"] / "run.json").read_text())["config"]["n"] == 3


def test_compare_attacks_every_model_and_reports_the_worst_attack(tmp_path):
    base = {"model_name_or_path": "tiny-random-llama", "n": 4, "max_steps": 1, "max_length": 40, "lora_r": 4,
            "per_device_train_batch_size": 2, "n_safety": 2, "safety_batch_size": 2, **data_files(tmp_path)}
    config = {"output_dir": str(tmp_path / "out"), "base": base, "methods": ["sft", "sap"], "seeds": [1],
              "eval": {"suites": "jbb-harmful,xstest-safe,sst2", "limit": "1,jbb-harmful=2,xstest-safe=1",
                       "max_new_tokens": 2, "batch_size": 4},
              "attack": {"attack_data": _attack_file(tmp_path), "n": 2, "learning_rates": "1e-3", "steps": "1",
                         "per_device_train_batch_size": 2, "max_length": 40, "lora_r": 4}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(tmp_path / "c.yaml")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for entry in [results["base"], *results["runs"].values()]:
        attack = entry["attack"]
        assert attack["n_within_bound"] in (0, 1) and len(attack["grid"]) == 1
        folder = tmp_path / "out" / entry["folder"] / "attack"
        assert json.loads((folder / "attack.json").read_text())["grid"][0]["harmful_score"] == \
            attack["grid"][0]["harmful_score"]
        assert not (folder / "model").exists()  # merged for the attack, then deleted
        # the evaluation's per-suite limit, less the suite the attack does not answer
        evaluated = json.loads(next(folder.glob("attack-*/grid/*/eval/eval.json")).read_text())["suites"]
        assert {name: s["n"] for name, s in evaluated.items()} == {"jbb-harmful": 2, "sst2": 1}
        # the model's own evaluation answered those prompts: it is the attack's reference, not evaluated again
        assert attack["before"] == {"harmful_score": entry["eval"]["jbb-harmful"]["harmful_score"],
                                    "by_suite": {"jbb-harmful": entry["eval"]["jbb-harmful"]["harmful_score"]},
                                    "accuracy": entry["eval"]["sst2"]["accuracy"]}
        assert not list(folder.glob("attack-*/before"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "harmful score after attack (worst)" in report and "after attack: harmful score vs sft" in report


def test_compare_attack_keys_are_checked_before_anything_runs(tmp_path, capsys):
    config = {"output_dir": str(tmp_path / "out"), "base": {"model_name_or_path": "tiny-random-llama",
                                                            **data_files(tmp_path)},
              "methods": ["sft"], "eval": {"suites": "jbb-harmful,sst2"}}
    for attack, message in (({"adapter": "x"}, "adapter is set by the comparison"),
                            ({"learning_rate": 1e-4}, "learning_rate"),
                            ({"steps": "0"}, "steps >= 1")):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**config, "attack": attack}))
        assert main(["compare", "--config", str(tmp_path / "c.yaml")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    assert not (tmp_path / "out").exists()
