"""Loading real checkpoints the TRL way: weight dtype, revision, attention implementation, remote code and
quantisation keys reach `from_pretrained`; bf16 weights train with fp32 adapters and exact SAP restoration."""
import json

import pytest
import torch

from safeprobe.cli.main import main
from safeprobe.errors import UserError
from safeprobe.experiments.train import load_base, train_config
from safeprobe.method.weights import Scaled, perturbed
from safeprobe.model import loading
from safeprobe.model.loading import LoadOptions, load_model


def test_bf16_weights_train_sap_with_fp32_adapters(tmp_path):
    from conftest import data_files
    out = tmp_path / "run"
    assert main(["train", "--method", "sap", "--model-name-or-path", "tiny-random-llama", "--dtype", "bfloat16",
                 "--attn-implementation", "eager", "--n", "8", "--n-safety", "4", "--max-steps", "2",
                 "--per-device-train-batch-size", "2", "--output-dir", str(out),
                 *[f"--{k.replace('_', '-')}={v}" for k, v in data_files(tmp_path).items()]]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["dtype"] == "bfloat16" and run["config"]["attn_implementation"] == "eager"
    assert run["base_model"]["dtype"] == "bfloat16" and run["global_steps"] == 2
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("skipped" not in row and torch.isfinite(torch.tensor(row["task_loss"])) for row in steps)


def test_bf16_base_weights_keep_lora_in_fp32_and_load_as_asked():
    cfg = train_config(model_name_or_path="tiny-random-llama", dtype="bfloat16", attn_implementation="eager")
    model, _ = load_base(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    from safeprobe.experiments.train import trainable
    model = trainable(cfg, model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_a_bf16_perturbation_is_restored_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32).to(torch.bfloat16)) for _ in range(3)]
    before = [p.detach().clone() for p in params]
    direction = [torch.randn(p.shape) for p in params]  # fp32 direction, as SAP's
    with perturbed(params, Scaled(direction, 1e-3)):
        moved = [p.detach().clone() for p in params]
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert any(not torch.equal(m, b) for m, b in zip(moved, before))  # the perturbation did move the weights


def test_hub_loading_keys_reach_from_pretrained(monkeypatch):
    seen = {}

    def fake(source, torch_dtype, kwargs):
        seen.update(kwargs, source=source, dtype=torch_dtype)
        raise OSError("offline")
    monkeypatch.setattr(loading, "_from_pretrained", fake)
    options = LoadOptions(revision="v1.1", attn_implementation="sdpa", trust_remote_code=True)
    with pytest.raises(UserError, match="could not be loaded from the Hugging Face Hub"):
        load_model("someorg/some-model", "bfloat16", options=options)
    assert seen == {"source": "someorg/some-model", "dtype": torch.bfloat16, "revision": "v1.1",
                    "trust_remote_code": True, "attn_implementation": "sdpa"}


def test_a_process_of_a_launch_loads_on_its_own_device(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    expected = torch.device("cuda", 1) if torch.cuda.device_count() > 1 else None
    if expected is not None:
        assert loading.resolve_device(None) == expected
    else:
        assert loading.resolve_device(None).type in ("cpu", "mps", "cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert loading.resolve_device(None) == torch.device("cuda", 1)


@pytest.mark.parametrize("flags, message", [
    (["--load-in-4bit"], "load_in_4bit needs"),
    (["--load-in-8bit", "--no-use-peft"], "quantised weights cannot be trained: set use_peft"),
    (["--load-in-4bit", "--load-in-8bit"], "load_in_4bit and load_in_8bit exclude each other"),
    (["--dtype", "int3"], "unknown dtype 'int3'"),
    (["--torch-dtype", "bf16"], "key 'torch_dtype' is now 'dtype'"),
    (["--bnb-4bit-quant-type", "nf3"], "unknown bnb_4bit_quant_type 'nf3'"),
])
def test_loading_mistakes_are_one_line_errors(flags, message, capsys, tmp_path):
    assert main(["train", "--model-name-or-path", "tiny-random-llama", "--output-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_the_python_api_takes_model_init_kwargs(tmp_path):
    from datasets import Dataset

    from safeprobe import SAPConfig, SAPTrainer
    from safeprobe.model.tiny import tiny_dir
    load_model("tiny-random-llama")  # builds the checkpoint
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("a", "b", "c", "d")]
    safety = [{"prompt": "How do I hurt him?", "chosen": "I can't help.", "rejected": "Hit him."}] * 2
    trainer = SAPTrainer(model=str(tiny_dir("tiny-random-llama")), train_dataset=Dataset.from_list(rows),
                         safety_dataset=Dataset.from_list(safety),
                         args=SAPConfig(output_dir=str(tmp_path), max_steps=1, report_to="none",
                                        model_init_kwargs={"dtype": "bfloat16"}))
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    trainer.train()


@pytest.mark.parametrize("fsdp_version, zero_stage, fsdp2_supported, refused", [
    (1, 0, True, "FSDP1"), (0, 3, True, "DeepSpeed"), (0, 2, True, "DeepSpeed"), (2, 0, False, "FSDP2"),
    (2, 0, True, None), (0, 0, True, None)])
def test_weight_space_methods_refuse_sharding_they_cannot_run_on(fsdp_version, zero_stage, fsdp2_supported, refused):
    from types import SimpleNamespace

    from safeprobe.method.weights import check_shardable
    deepspeed = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    fsdp = SimpleNamespace(fsdp_version=fsdp_version) if fsdp_version else None
    trainer = SimpleNamespace(is_fsdp_enabled=fsdp is not None, is_deepspeed_enabled=deepspeed is not None,
                              accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=deepspeed,
                                                                                fsdp_plugin=fsdp)))
    if refused:
        with pytest.raises(ValueError, match=f"SAP does not run under {refused}: .*DDP"):
            check_shardable(trainer, "SAP", fsdp2=fsdp2_supported)
    else:
        check_shardable(trainer, "SAP", fsdp2=fsdp2_supported)
