"""Composed methods ("sap+safeinstr"): a data-side defense's data under an optimiser-side defense's training, from
the registry, with no method knowing of the other."""
import json

import pytest
import torch
from safetensors.torch import load_file

from safeprobe.errors import UserError
from safeprobe.experiments.train import run_train, train_config
from safeprobe.method.registry import get_method, method_of_run, methods
from safeprobe.method.safeinstr import SafeInstrTrainer
from safeprobe.method.sap.trainer import SAPTrainer

TINY = dict(model_name_or_path="tiny-random-llama", dataset_name="sst2", n=12, n_safety=4, max_steps=3,
            per_device_train_batch_size=4, safety_batch_size=2, max_length=96, logging_steps=1, lora_dropout=0.0)


def train(tmp_path, name, **overrides):
    info = run_train(train_config(shared=True, output_dir=str(tmp_path / name), **{**TINY, **overrides}))
    log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    return info, load_file(str(tmp_path / name / "adapter_model.safetensors")), log


def test_the_composed_method_is_both_trainers_with_both_data_roles():
    method = get_method("sap+safeinstr")
    assert issubclass(method.trainer, SafeInstrTrainer) and issubclass(method.trainer, SAPTrainer)
    assert method.trainer.config_class is SAPTrainer.config_class  # SAP's knobs
    assert {r.kwarg for r in method.data} == {"safety_dataset", "safety_demos"}
    assert method.series == get_method("sap").series and method_of_run("sap+safeinstr") is method
    assert "sap+safeinstr" not in methods() and get_method("sap+safeinstr") is method  # built once, not listed


def test_sap_on_safeinstr_data_trains_on_the_mixture_and_is_safeinstr_at_step_size_zero(tmp_path):
    info, composed, log = train(tmp_path, "composed0", method="sap+safeinstr", eps=0.0)
    _, safeinstr, _ = train(tmp_path, "safeinstr", method="safeinstr")
    _, moving, moving_log = train(tmp_path, "composed", method="sap+safeinstr", eps=0.05, beta=5.0)
    assert info["method"] == "sap+safeinstr" and info["n_train"] == TINY["n"] + TINY["n_safety"]  # demos mixed in
    assert {"safety", "alignment"} <= set(info["data"])  # both data roles fingerprinted
    assert composed.keys() == safeinstr.keys() and all(torch.equal(composed[k], safeinstr[k]) for k in composed)
    assert any(not torch.equal(moving[k], safeinstr[k]) for k in moving)  # SAP's probe does act
    assert {"probe_raise", "s_norm"} <= set(moving_log[0]) and moving_log[0]["method"] == "sap+safeinstr"


def test_a_composition_in_reference_mode_logs_its_own_name(tmp_path):
    info, _, log = train(tmp_path, "reference", method="sap+safeinstr", mode="reference", max_steps=1)
    assert info["method"] == log[0]["method"] == "sap+safeinstr-reference"
    assert method_of_run("sap+safeinstr-reference") is get_method("sap+safeinstr")
    assert method_of_run("sap+safeinstr-typo") is None


@pytest.mark.parametrize("name", ["sap+lisa", "safeinstr+safeinstr", "sap+nothing"])
def test_a_composition_needs_one_optimiser_and_known_data_side_methods(name):
    with pytest.raises(UserError, match="method '|unknown method 'nothing'"):
        get_method(name)
