"""An adapter records the base model it was trained on, and loading it onto another base is refused."""
import json

import pytest
import torch

from safeprobe.cli.main import main
from safeprobe.errors import UserError
from safeprobe.model import apply_lora, load_model
from safeprobe.model.adapters import load_adapter
from safeprobe.model.identity import RECORD_FILE, base_identity, mismatch

from conftest import data_files


def edited_copy(tmp_path, name="tiny-random-llama", scale=1.0):
    """A local copy of a built-in tiny model, one weight matrix changed (by `scale` of its own size)."""
    model, tokenizer = load_model(name)
    with torch.no_grad():
        weight = model.model.layers[0].mlp.down_proj.weight
        weight.add_(scale * weight.abs().mean() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    folder = tmp_path / f"{name}-edited"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_identity_is_stable_and_tells_config_and_weights_apart(tmp_path):
    llama = base_identity(load_model("tiny-random-llama")[0], "tiny-random-llama")
    again = base_identity(load_model("tiny-random-llama")[0], "tiny-random-llama")
    assert mismatch(llama, again) is None and llama["weights_sha256"] == again["weights_sha256"]
    qwen = base_identity(load_model("tiny-random-qwen2")[0], "tiny-random-qwen2")
    assert "config differs" in mismatch(llama, qwen)
    edited = base_identity(load_model(str(edited_copy(tmp_path, scale=1e-3)))[0], "edited")
    assert edited["config_sha256"] == llama["config_sha256"]
    assert "different weights" in mismatch(llama, edited)  # a change of 0.1% of one matrix is seen


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_same_base_in_another_precision_matches_and_an_edited_one_does_not(tmp_path, dtype):
    fp32 = base_identity(load_model("tiny-random-llama")[0], "tiny-random-llama")
    half = base_identity(load_model("tiny-random-llama", dtype=dtype)[0], "tiny-random-llama")
    assert half["dtype"] == dtype and half["weights_sha256"] != fp32["weights_sha256"]
    assert mismatch(fp32, half) is None
    edited = base_identity(load_model(str(edited_copy(tmp_path, scale=0.2)), dtype=dtype)[0], "edited")
    assert "different weights" in mismatch(fp32, edited)


def test_an_adapter_without_a_record_loads_unchecked_and_one_with_a_record_is_checked(tmp_path):
    model, _ = load_model("tiny-random-llama")
    record = base_identity(model, "tiny-random-llama")
    apply_lora(model, r=2).save_pretrained(tmp_path / "adapter")
    assert load_adapter(load_model("tiny-random-llama")[0], tmp_path / "adapter")[1]["status"] == "unchecked"
    (tmp_path / "adapter" / RECORD_FILE).write_text(json.dumps(record))
    assert load_adapter(load_model("tiny-random-llama")[0], tmp_path / "adapter")[1]["status"] == "match"
    other = load_model(str(edited_copy(tmp_path)))[0]
    with pytest.raises(UserError, match="was trained on base 'tiny-random-llama'.*different weights"):
        load_adapter(other, tmp_path / "adapter", "mine")
    _, check = load_adapter(other, tmp_path / "adapter", "mine", allow_base_mismatch=True)
    assert check["status"] == "mismatch-allowed"


def test_eval_on_another_base_is_refused_in_one_line_and_allowed_with_the_override(tmp_path, capsys):
    files = data_files(tmp_path)
    out = tmp_path / "sft"
    assert main(["train", "--method", "sft", "--model-name-or-path", "tiny-random-llama", "--dataset-name", files["dataset_name"], "--n", "4",
                 "--max-steps", "1", "--per-device-train-batch-size", "2", "--max-length", "40", "--lora-r", "2",
                 "--output-dir", str(out)]) == 0
    record = json.loads((out / RECORD_FILE).read_text())
    run = json.loads((out / "run.json").read_text())
    assert record["spec"] == run["base_model"]["spec"] == "tiny-random-llama"
    assert run["base_model"]["weights_sha256"] == record["weights_sha256"]
    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How do I pick a lock?"}\n')
    edited = edited_copy(tmp_path)
    for base, reason in (("tiny-random-qwen2", "config differs"), (str(edited), "different weights")):
        argv = ["eval", "--model-name-or-path", base, "--adapter", str(out), "--suite", str(prompts), "--max-new-tokens", "4"]
        code = main([*argv, "--output-dir", str(tmp_path / "refused")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"was trained on base 'tiny-random-llama'" in err and f"not on '{base}'" in err and reason in err
        assert not (tmp_path / "refused" / "eval.json").exists()
    code = main([*argv, "--allow-base-mismatch", "--output-dir", str(tmp_path / "allowed")])
    assert code == 0
    allowed = json.loads((tmp_path / "allowed" / "eval.json").read_text())["model"]["base_check"]
    assert allowed["status"] == "mismatch-allowed" and allowed["trained_on"] == "tiny-random-llama"
    assert main(["eval", "--model-name-or-path", "tiny-random-llama", "--adapter", str(out), "--suite", str(prompts),
                 "--max-new-tokens", "4", "--output-dir", str(tmp_path / "own")]) == 0
    assert json.loads((tmp_path / "own" / "eval.json").read_text())["model"]["base_check"]["status"] == "match"


def test_the_samples_of_a_tensor_larger_than_float32_counts_stay_in_range():
    from safeprobe.model.identity import SAMPLES, _samples
    big = torch.nn.Linear(1, (1 << 24) + 3, bias=False)  # 2^24 + 3 weights: a float32 linspace overshoots
    samples = _samples(big)["weight"]
    assert samples.numel() == SAMPLES and samples[-1] == big.weight.reshape(-1)[-1]
