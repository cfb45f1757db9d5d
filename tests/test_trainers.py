"""SAPTrainer / CLI contract on tiny models: SAP == SFT at eps 0, hooks, reference-mode lag, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import lora_model
from safeprobe.cli.main import main
from safeprobe.experiments.train import TrainConfig, train_config, run_train
from safeprobe.method.sap.probe import Probe, resolve_layers
from safeprobe.method.sap.trainer import SAPTrainer

TINY = dict(model_name_or_path="tiny-random-llama", dataset_name="sst2", n=16, n_safety=8, max_steps=2, per_device_train_batch_size=4,
            safety_batch_size=4, max_length=96, logging_steps=1, lora_dropout=0.1)


def train(tmp_path, name, **overrides):
    cfg = train_config(shared=True, output_dir=str(tmp_path / name), **{**TINY, **overrides})
    return run_train(cfg), load_file(str(tmp_path / name / "adapter_model.safetensors"))


def test_sap_with_zero_eps_or_zero_beta_produces_the_sft_adapter_exactly(tmp_path):
    _, sft = train(tmp_path, "sft", method="sft")
    info, sap = train(tmp_path, "sap0", method="sap", eps=0.0)
    _, sap_beta0 = train(tmp_path, "sap_beta0", method="sap", eps=0.05, beta=0.0)  # a real g_V, a zero step along it
    _, sap_moving = train(tmp_path, "sap", method="sap", eps=0.05, beta=5.0)
    assert sft.keys() == sap.keys() == sap_beta0.keys()
    assert all(torch.equal(sft[k], sap[k]) and torch.equal(sft[k], sap_beta0[k]) for k in sft)
    assert any(not torch.equal(sft[k], sap_moving[k]) for k in sft)  # nonzero eps does change the adapter
    assert not any("probe" in k for k in sap_moving)  # probe tensors are never saved
    assert any("lora_B" in k and sft[k].abs().sum() > 0 for k in sft)  # the adapter was trained
    assert info["method"] == "sap" and info["data"]["task"]["sha256"] and info["data"]["safety"]["sha256"]
    log = [json.loads(line) for line in (tmp_path / "sap" / "train_log.jsonl").read_text().splitlines()]
    assert {"task_loss", "safety_loss", "s_norm", "eps", "g_v_norm", "v_safe_norm", "l_su",
            "cos_task_safety", "task_loss_unprobed"} <= set(log[0])
    # before any update SAP's clean probe pass sees SFT's first batch, weights and dropout masks: SFT's loss
    sft_log = [json.loads(line) for line in (tmp_path / "sft" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["task_loss_unprobed"] == pytest.approx(sft_log[0]["task_loss"], rel=1e-6)
    assert log[0]["task_loss"] != pytest.approx(sft_log[0]["task_loss"], rel=1e-6)  # the probe moves the loss


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2", "tiny-random-qwen2"])
def test_inactive_probe_hooks_leave_logits_bit_identical(name):
    model, tok = lora_model(name, dtype=torch.float32)
    model.eval()
    ids = tok("Hello there, how are you?", return_tensors="pt")
    before = model(**ids).logits
    probe = Probe(model, "all")
    assert torch.equal(before, model(**ids).logits)
    with probe.active(probe.zeros(ids["input_ids"])):
        assert torch.equal(before, model(**ids).logits)  # adding an exact zero changes nothing
    with probe.active([torch.ones_like(v) for v in probe.zeros(ids["input_ids"])]):
        assert not torch.equal(before, model(**ids).logits)  # an active probe does
    probe.remove()
    assert torch.equal(before, model(**ids).logits)


def test_probe_layer_specs():
    assert resolve_layers("middle", 32) == list(range(10, 20))  # the paper's v_11..v_20
    assert len(resolve_layers("middle", 30)) == 10
    assert resolve_layers("3,9", 30) == [3, 9]
    assert resolve_layers("10:12", 30) == [10, 11]
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("0.5:1.0", 4) == [2, 3]
    assert resolve_layers((3, "1"), 4) == [1, 3]  # the Python API takes a list
    from safeprobe.errors import UserError
    from safeprobe.method.sap.probe import parse_layers
    for bad in ("middle-ish", "1:x", ["x", 2]):  # refused by their syntax, before any model exists
        with pytest.raises(UserError, match="not understood"):
            parse_layers(bad)


def test_reference_mode_uses_the_probe_computed_at_the_previous_step(tmp_path, monkeypatch):
    used, computed = [], []
    original = SAPTrainer._reference_probe

    def spy(self, model, inputs):
        V = original(self, model, inputs)
        used.append([v.clone() for v in V])
        computed.append([v.clone() for v in self._V])
        return V

    monkeypatch.setattr(SAPTrainer, "_reference_probe", spy)
    info, _ = train(tmp_path, "ref", method="sap", mode="reference", max_steps=3, eps=0.05)
    assert info["method"] == "sap-reference"
    assert len(used) == 3 and all(v.abs().sum() == 0 for v in used[0])
    for t in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(used[t], computed[t - 1]))
    assert any(v.abs().sum() > 0 for v in computed[0])


@pytest.mark.parametrize("args, message", [
    (["--probe-layers", "99"], "valid layer indices are 0..3"),
    (["--eps", "-1"], "eps must be >= 0"),
    (["--beta", "-0.5"], "beta must be >= 0"),
    (["--method", "magic"], "valid choices: sft, sap"),
    (["--safety-data", "nope.jsonl"], "nope.jsonl: file not found"),
    (["--probe-layers", "middle-ish"], "probe layers 'middle-ish' not understood"),
    (["--seed", "-1"], "seed must be in [0, 2**32 - 1], got -1"),
])
def test_train_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    code = main(["train", "--method", "sap", "--model-name-or-path", "tiny-random-llama", "--n", "4", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("method, flag", [("sap", "--safety-data"), ("safeinstr", "--alignment-data"),
                                          ("lisa", "--alignment-data")])
def test_a_bad_row_in_a_methods_own_data_is_reported_before_the_model_loads(tmp_path, capsys, monkeypatch, method,
                                                                             flag):
    import safeprobe.experiments.train as train_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was read")
    monkeypatch.setattr(train_module, "prepare_model", no_model)
    bad = tmp_path / "data.jsonl"
    rows = ('{"prompt": "p", "safe": "no", "harmful": "x"}\n\n{"prompt": "q", "safe": "", "harmful": "y"}\n'
            if method == "sap" else '{"prompt": "p", "completion": "no"}\n\n{"prompt": "q", "completion": " "}\n')
    bad.write_text(rows)
    code = main(["train", "--method", method, "--model-name-or-path", "tiny-random-llama", "--n", "4", "--max-steps", "1",
                 flag, str(bad), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{bad}:3" in err and len(err.splitlines()) == 1, err  # line 3: the blank line counts
    assert f"'{'safe' if method == 'sap' else 'completion'}' is empty" in err, err


def test_full_finetuning_with_gradient_accumulation_and_dpo_safety_loss(tmp_path):
    cfg = train_config(shared=True, output_dir=str(tmp_path / "full"), method="sap", use_peft=False, gradient_accumulation_steps=2,
                      safety_loss="dpo", safety_every=2, probe_every=2, **{**TINY, "max_steps": 2})
    info = run_train(cfg)
    assert info["global_steps"] == 2 and (tmp_path / "full" / "model.safetensors").exists()
    weights = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert not any("probe" in k for k in weights)
    log = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "safety_loss" in log[0]


def test_asking_for_more_safety_records_than_the_source_has_warns_and_uses_them_all(tmp_path, caplog):
    from conftest import data_files
    from safeprobe.experiments import method_data
    from safeprobe.method import get_method
    from safeprobe.model import load_model
    _, tok = load_model("tiny-random-llama")
    cfg = train_config(method="sap", model_name_or_path="tiny-random-llama", n_safety=1000, **data_files(tmp_path))
    assert len(method_data.features(get_method("sap"), cfg, tok)["safety_dataset"]) == 8  # the file's 8 pairs
    assert "has 8 records, n_safety asks for 1000: using 8" in caplog.text
