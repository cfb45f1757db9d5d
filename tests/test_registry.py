"""A new method is one file: registered from outside the package, it trains through `safeprobe train` and shows
in `safeprobe compare`'s report, with no other code changed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from safeprobe.method import get_method, methods

from conftest import data_files

REPO = Path(__file__).resolve().parents[1]
TOY = '''
from dataclasses import dataclass

from safeprobe.method import DataRole, Method, SafeprobeConfig, SafeprobeTrainer, Series, register


@dataclass
class ToyConfig(SafeprobeConfig):
    toy_scale: float = 2.0


class ToyTrainer(SafeprobeTrainer):
    """Plain fine-tuning that also logs a scaled copy of its loss and counts the pairs it was given."""
    method_name = "toy"
    config_class = ToyConfig

    def __init__(self, *args, toy_pairs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_pairs = len(toy_pairs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.record(toy_metric=self.args.toy_scale * float(loss), toy_pairs=self.n_pairs)
        return loss


register(Method("toy", ToyTrainer, data=(DataRole("toy_pairs", "safety_data", "n_safety", "pairs", "toy"),),
                series=(Series("toy_metric", "toy: its loss, scaled", "scale x loss"),)))
'''


def safeprobe(argv: list[str], toy: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAFEPROBE_METHODS": str(toy), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "safeprobe.cli.main", *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def test_the_built_in_methods_are_registered_with_their_configs_and_data():
    assert set(methods()) == {"sft", "sap", "safeinstr", "lisa"}
    sap = get_method("sap")
    assert sap.config_class.__name__ == "SAPConfig" and [r.kwarg for r in sap.data] == ["safety_dataset"]
    assert set(methods("align")) == {"plain", "vaccine", "booster"}


def test_a_method_in_one_outside_file_trains_and_is_compared(tmp_path):
    toy = tmp_path / "toy.py"
    toy.write_text(TOY)
    files = data_files(tmp_path)
    out = tmp_path / "train"
    done = safeprobe(["train", "--method", "toy", "--model-name-or-path", "tiny-random-llama", "--dataset-name", files["dataset_name"],
                      "--safety-data", files["safety_data"], "--n", "4", "--n-safety", "3", "--max-steps", "2",
                      "--per-device-train-batch-size", "2", "--max-length", "40", "--lora-r", "2", "--output-dir", str(out)],
                     toy, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "toy" and run["data"]["toy"]["sha256"]  # its data role is fingerprinted
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["toy_pairs"] for r in rows] == [3, 3] and all(r["toy_metric"] == 2 * r["task_loss"] for r in rows)

    config = {"output_dir": str(tmp_path / "compare"), "methods": ["sft", "toy"], "seeds": [1],
              "base": {"model_name_or_path": "tiny-random-llama", "n": 4, "n_safety": 3, "max_steps": 2,
                       "per_device_train_batch_size": 2,
                       "max_length": 40, "lora_r": 2, "logging_steps": 1, **files},
              "eval": {"suites": ["jbb-harmful", "sst2"], "limit": 2, "max_new_tokens": 4, "batch_size": 4}}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(config))
    done = safeprobe(["compare", "--config", str(tmp_path / "compare.yaml")], toy, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "compare" / "results.json").read_text())
    assert results["runs"]["toy-s1"]["status"] == "done"
    report = (tmp_path / "compare" / "report.html").read_text()
    assert "<td>toy-s1</td><td>toy</td>" in report  # its row in the runs table
    unknown = safeprobe(["train", "--method", "toy2", "--output-dir", str(tmp_path / "x")], toy, tmp_path)
    assert unknown.returncode == 2 and "unknown method 'toy2'" in unknown.stderr and "toy" in unknown.stderr
