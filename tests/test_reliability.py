"""Reliability: kill -9 then --resume reaches the uninterrupted adapter; non-finite steps are skipped, and too
many in a row stop the run; output directories are locked and checked before any training."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import SFTTrainer

import safeprobe.experiments.train as train_module
from safeprobe.cli.main import main
from safeprobe.errors import UserError
from safeprobe.experiments.train import TrainConfig, train_config, run_train
from safeprobe.io import output_lock, sha256_file
from safeprobe.method import base
from safeprobe.method.sap import trainer as sap_trainer
from safeprobe.method.checkpoint import STATE_JSON, last_complete_checkpoint

from conftest import data_files

RESUME_TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parents[1]


def settings(root: Path, method: str, **overrides) -> dict:
    # lora_dropout > 0: the resumed run must also restore the RNG that draws the dropout masks. 6 examples and
    # 6 pairs in batches of 2: step 4 starts a new epoch of both the task data and the safety batches.
    sap = {"safety_batch_size": 2, "eps": 0.05, "beta": 1.0} if method == "sap" else {}
    return {"method": method, "model_name_or_path": "tiny-random-llama", "n": 6, "n_safety": 6, "max_steps": 4,
            "save_steps": 2, "per_device_train_batch_size": 2, "max_length": 40, "lora_r": 4, "lora_dropout": 0.1,
            "learning_rate": 1e-2, "logging_steps": 1, **sap, **data_files(root), **overrides}


def flags(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in ("--" + key.replace("_", "-"), str(value))]


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter_model.safetensors"))


def step_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before writing {path}: " \
                                    f"{log.read_text()[-2000:]}"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def half_written_copy(source: Path, target: Path) -> None:
    """What a kill in the middle of a checkpoint write leaves: files present, one cut short, no marker."""
    shutil.copytree(source, target)
    (target / STATE_JSON).unlink()
    optimizer = target / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])


@pytest.mark.parametrize("method", ["sft", "sap"])
def test_kill_9_then_resume_gives_the_uninterrupted_adapter(tmp_path, method):
    values = settings(tmp_path, method)
    uninterrupted = run_train(train_config(shared=True, output_dir=str(tmp_path / "whole"), **values))

    out = tmp_path / "killed"
    argv = ["train", *flags(values), "--output-dir", str(out)]
    log = tmp_path / "killed.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "safeprobe.cli.main", *argv], cwd=REPO, stdout=log_file,
                                stderr=subprocess.STDOUT)
        try:
            wait_for(out / "checkpoint-2" / STATE_JSON, proc, log)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "run.json").exists()  # killed mid-run
    half_written_copy(out / "checkpoint-2", out / "checkpoint-3")  # never a resume point: no marker

    assert main([*argv, "--resume"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["resumed_from"] == str(out / "checkpoint-2") and info["global_steps"] == 4
    # the figures cover the whole run: the steps before the checkpoint count in its loss and its time
    assert info["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-6)
    before = json.loads((out / "checkpoint-2" / STATE_JSON).read_text())["wall_time_s"]
    assert info["wall_time_s"] >= round(before, 2)  # the time before the checkpoint is counted in
    whole, resumed = adapter(tmp_path / "whole"), adapter(out)
    diff = max((whole[k] - resumed[k]).abs().max().item() for k in whole)
    print(f"\n{method}: resumed at step 2 of 4, max |adapter difference| = {diff:.3g}")
    assert step_log(out) == step_log(tmp_path / "whole")  # same losses and, for SAP, the same safety batches
    assert whole.keys() == resumed.keys() and diff <= RESUME_TOLERANCE


def test_resume_refuses_other_settings_and_does_not_repeat_a_finished_run(tmp_path, monkeypatch):
    values = settings(tmp_path, "sft", max_steps=2, save_steps=1)
    out = tmp_path / "run"
    first = run_train(train_config(shared=True, output_dir=str(out), **values))
    with pytest.raises(UserError, match=r"different settings \(learning_rate\)"):
        run_train(train_config(shared=True, output_dir=str(out), resume=True, **{**values, "learning_rate": 0.5}))
    monkeypatch.setattr(train_module, "build_trainer", lambda *a, **k: pytest.fail("trained again"))
    assert run_train(train_config(shared=True, output_dir=str(out), resume=True, **values)) == first


def test_resume_refuses_a_run_whose_data_file_changed_since(tmp_path):
    values = settings(tmp_path, "sap", max_steps=2, save_steps=1)
    out = tmp_path / "run"
    run_train(train_config(shared=True, output_dir=str(out), **values))
    pairs = Path(values["safety_data"])
    pairs.write_text(pairs.read_text().replace("Hit", "Kick"))
    with pytest.raises(UserError, match=r"finished run on other data \(safety .*pairs.jsonl changed since\)"):
        run_train(train_config(shared=True, output_dir=str(out), resume=True, **values))
    (out / "run.json").unlink()  # an interrupted run: its checkpoints were trained on the old file too
    with pytest.raises(UserError, match=r"holds a run on other data \(safety"):
        run_train(train_config(shared=True, output_dir=str(out), resume=True, **values))
    assert run_train(train_config(shared=True, output_dir=str(out), **values))["data"]["safety"]["sha256"] == \
        sha256_file(pairs)  # without --resume: trained again on the new file


class Snapshots(TrainerCallback):
    """The trainable tensors after every optimiser step, and the optimiser at the end."""

    def __init__(self):
        self.params, self.optimizer, self.trainer = {}, None, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params[state.global_step] = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer


@pytest.fixture
def snapshots(monkeypatch):
    callback, build = Snapshots(), train_module.build_trainer

    def build_with_snapshots(*args, **kwargs):
        callback.trainer = build(*args, **kwargs)
        callback.trainer.add_callback(callback)
        return callback.trainer

    monkeypatch.setattr(train_module, "build_trainer", build_with_snapshots)
    return callback


NAN = float("nan")


def poison_loss(loss):
    return loss * NAN  # inside the graph: the gradient is NaN too


def poison_first(out):
    return ([t * NAN for t in out[0]], *out[1:])  # s of safety_direction, g_V of probe_gradient


def nan_on_calls(function, calls: set, poison):
    """`function`, whose result is poisoned with NaN on the given call numbers (1 = first call)."""
    count = [0]

    def poisoned(*args, **kwargs):
        count[0] += 1
        out = function(*args, **kwargs)
        return poison(out) if count[0] in calls else out
    return poisoned


@pytest.mark.parametrize("method, target, reason", [
    ("sft", "compute_loss", "task loss, gradient"),
    ("sap", "safety_direction", "safety direction"),
    ("sap", "probe_gradient", "probe gradient"),
])
def test_a_nan_step_is_skipped_and_logged(tmp_path, monkeypatch, snapshots, method, target, reason):
    module, poison = (SFTTrainer, poison_loss) if target == "compute_loss" else (sap_trainer, poison_first)
    monkeypatch.setattr(module, target, nan_on_calls(getattr(module, target), {2}, poison))
    info = run_train(train_config(shared=True, output_dir=str(tmp_path / "out"), **settings(tmp_path, method, max_steps=3)))
    assert info["global_steps"] == 3
    skipped = {row["step"]: row.get("skipped") for row in step_log(tmp_path / "out")}
    assert skipped == {1: None, 2: reason, 3: None}
    params = snapshots.params
    assert all(torch.equal(a, b) for a, b in zip(params[1], params[2]))  # the bad step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(params[2], params[3]))  # the next one trains again
    assert all(torch.isfinite(p).all() for p in params[3])
    steps_taken = {int(s["step"]) for s in snapshots.optimizer.state_dict()["state"].values()}
    assert steps_taken == {2}  # AdamW stepped twice in 3 steps: its moments skipped the bad step too
    if method == "sap":  # nothing non-finite was cached for later steps
        assert base.all_finite(snapshots.trainer._s) and base.all_finite(snapshots.trainer._V)


def test_too_many_bad_steps_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_on_calls(SFTTrainer.compute_loss, set(range(3, 100)),
                                                                 poison_loss))
    out = tmp_path / "out"
    values = settings(tmp_path, "sft", max_steps=6, max_bad_steps=2)
    code = main(["train", *flags(values), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1].split("safeprobe: error: ")  # after the progress bar
    assert code == 3 and len(err) == 2, err
    assert err[1].startswith("training stopped at step 4: 2 steps in a row had a non-finite task loss"), err
    assert "the last good checkpoint is " + str(out / "checkpoint-2") in err[1]
    assert last_complete_checkpoint(out) == out / "checkpoint-2" and not (out / "checkpoint-4").exists()
    assert all(torch.isfinite(t).all() for t in adapter(out / "checkpoint-2").values())
    assert not (out / "run.json").exists()
    with output_lock(out):  # released on the way out
        pass


def test_a_second_run_in_the_same_output_directory_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "load_model", lambda *a: pytest.fail("loaded a model"))
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):
        code = main(["train", *flags(settings(tmp_path, "sft")), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is in use by another safeprobe run" in err and len(err.splitlines()) == 1, err


def test_a_lock_whose_holder_was_killed_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from safeprobe.io import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="in use"):
            with output_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".safeprobe.lock").exists()  # the file stays, the lock does not
    with output_lock(tmp_path):
        pass


def test_an_unwritable_output_directory_is_reported_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "load_model", lambda *a: pytest.fail("loaded a model"))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["train", *flags(settings(tmp_path, "sft")), "--output-dir", str(blocker / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "output directory is not writable" in err and len(err.splitlines()) == 1, err


def test_the_demo_aligns_once_then_compares_the_methods_from_the_aligned_base(tmp_path, monkeypatch):
    """The demo is `align` (cached) + `compare` (cached per run, resumable; see test_compare.py), wired here."""
    from rich.console import Console

    from safeprobe.experiments import demo

    aligned, compared = [], []
    monkeypatch.setattr(demo, "run_align", lambda cfg: aligned.append(cfg) or {
        "output_dir": str(tmp_path / "aligned"), "reused": len(aligned) > 1})
    monkeypatch.setattr(demo, "run_compare", lambda cfg, console: compared.append(cfg) or {
        "base": None, "main": {}, "runs": {}, "sweeps": {}})
    monkeypatch.setattr(demo, "results_table", lambda results: "table")
    for quick in (True, False):
        demo.run_demo(demo.DemoConfig(output_dir=str(tmp_path / "out"), quick=quick), Console(quiet=True))
    assert [cfg.method for cfg in aligned] == ["plain", "plain"] and aligned[0].model_name_or_path == "smollm2-135m-instruct"
    quick, full = compared
    assert list(quick.methods) == ["sft", "sap"] and list(full.methods) == ["sft", "sap", "safeinstr", "lisa"]
    assert all(cfg.methods["sap"] == demo.METHOD_SETTINGS["sap"] and cfg.methods["sft"] == {} for cfg in compared)
    for cfg in compared:  # every method starts from the aligned base, on the same poisoned SST-2 data and seed
        assert cfg.base["model_name_or_path"] == str(tmp_path / "aligned") and cfg.base["poison_ratio"] == 0.1
        assert cfg.base["dataset_name"] == "sst2" and cfg.seeds == [42] and cfg.include_base
        assert cfg.output_dir == str(tmp_path / "out")
    assert quick.base["max_steps"] < full.base["max_steps"] and quick.eval["limit"] < full.eval["limit"]


def test_the_demo_runs_consecutive_seeds_from_one_aligned_base(tmp_path, monkeypatch, capsys):
    from rich.console import Console

    from safeprobe.experiments import demo

    aligned, compared = [], []
    monkeypatch.setattr(demo, "run_align", lambda cfg: aligned.append(cfg) or {
        "output_dir": str(tmp_path / "aligned"), "reused": False})
    monkeypatch.setattr(demo, "run_compare", lambda cfg, console: compared.append(cfg) or {
        "main": {}, "runs": {}, "base": None})
    monkeypatch.setattr(demo, "results_table", lambda results: "table")
    demo.run_demo(demo.DemoConfig(output_dir=str(tmp_path / "out"), seed=7, seeds=3), Console(quiet=True))
    assert [cfg.seed for cfg in aligned] == [7] and compared[0].seeds == [7, 8, 9]
    for args, message in ((["--seeds", "0"], "--seeds must be >= 1"),
                          (["--seed", "-3"], "--seed must be in [0, 2**32 - 1], got -3"),
                          (["--seed", str(2**32 - 2), "--seeds", "3"], "--seed plus --seeds - 1 must be in")):
        code = main(["demo", "--output-dir", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert len(aligned) == 1  # refused before the alignment
