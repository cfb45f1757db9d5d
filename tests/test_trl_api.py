"""The TRL-shaped Python API: SAPTrainer takes what trl.SFTTrainer takes, and at step size 0 it is SFTTrainer."""
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig
from safetensors.torch import load_file
from trl import SFTConfig, SFTTrainer

from safeprobe.data.tokenize import IGNORE, collator
from safeprobe.model import load_model
from safeprobe.model.tiny import tiny_dir

CHATS = [[{"role": "user", "content": f"Is {w} a word?"}, {"role": "assistant", "content": f"Yes, {w} is one."},
          {"role": "user", "content": "Spell it."}, {"role": "assistant", "content": " ".join(w)}]
         for w in ("cat", "sun", "tree", "river", "stone", "cloud", "bread", "lamp")]
PREFERENCES = [{"prompt": [{"role": "user", "content": f"How do I hurt {w}?"}],
                "chosen": [{"role": "assistant", "content": "I can't help with that."}],
                "rejected": [{"role": "assistant", "content": f"Hit {w} hard."}]} for w in ("him", "her", "them", "it")]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def model_dir() -> str:
    load_model("tiny-random-llama")  # builds the checkpoint once
    return str(tiny_dir("tiny-random-llama"))


def readme_example() -> str:
    """The Python block of README.md's "Python API" section."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 15
    return code


def test_the_readme_example_trains_a_peft_adapter_on_every_assistant_turn_without_the_probe(tmp_path):
    MODEL_DIR, OUT = model_dir(), str(tmp_path / "out")
    MESSAGES_JSONL, PREFERENCE_JSONL = jsonl(tmp_path / "chats.jsonl", [{"messages": chat} for chat in CHATS]), jsonl(tmp_path / "pref.jsonl", PREFERENCES)
    exec(readme_example(), {"MODEL_DIR": MODEL_DIR, "OUT": OUT, "MESSAGES_JSONL": MESSAGES_JSONL,
                            "PREFERENCE_JSONL": PREFERENCE_JSONL}, scope := {})
    trainer = scope["trainer"]
    # --- what it gave ---
    saved = load_file(f"{OUT}/adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # a PEFT adapter, no probe tensor
    assert json.loads(open(f"{OUT}/adapter_config.json").read())["peft_type"] == "LORA"
    steps = [json.loads(line) for line in open(f"{OUT}/train_log.jsonl")]
    assert [row["step"] for row in steps] == [1, 2, 3] and all(row["v_safe_norm"] == pytest.approx(3.0)
                                                                for row in steps)
    assert all(row["probe_raise"] == pytest.approx(row["task_loss"] - row["task_loss_unprobed"]) for row in steps)
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    targets = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])
    assert targets == "Yes, cat is one.<|im_end|>c a t<|im_end|>"  # both assistant turns, nothing else


def test_sap_at_step_size_zero_trains_the_adapter_of_trl_sft_trainer_bit_for_bit(tmp_path):
    from safeprobe import SAPConfig, SAPTrainer
    model, tokenizer = load_model("tiny-random-llama")
    features = [{"input_ids": ids, "labels": [IGNORE] * 3 + ids[3:]}
                for ids in (tokenizer(f"Q{i}: say {w}. A: {w} {w}")["input_ids"] for i, w in enumerate("abcdefgh"))]
    common = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, seed=3, logging_steps=1,
                  report_to="none", bf16=False, activation_checkpointing=False, dataset_kwargs={"skip_prepare_dataset": True})
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])

    def trained(trainer_class, config_class, **knobs):
        trainer = trainer_class(model=load_model("tiny-random-llama")[0], processing_class=tokenizer,
                                args=config_class(output_dir=str(tmp_path / trainer_class.__name__), **common, **knobs),
                                train_dataset=Dataset.from_list(features), data_collator=collator(tokenizer),
                                peft_config=LoraConfig(**lora), **({"safety_dataset": PREFERENCES} if knobs else {}))
        trainer.train()
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}

    sft = trained(SFTTrainer, SFTConfig)
    for knobs in ({"eps": 0.0}, {"beta": 0.0}):
        sap = trained(SAPTrainer, SAPConfig, **knobs)
        assert max((sft[k] - sap[k]).abs().max().item() for k in sft) == 0, knobs
    moving = trained(SAPTrainer, SAPConfig, eps=0.5, beta=1.0)
    assert max((sft[k] - moving[k]).abs().max().item() for k in sft) > 0  # the comparison can fail


TRL_YAML = """\
model_name_or_path: tiny-random-llama
dataset_name: {task}
safety_data: {pairs}
output_dir: {out}
method: sap
learning_rate: 2.0e-4
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
max_length: 64
gradient_checkpointing: true
num_train_epochs: 1
max_steps: 2
use_peft: true
lora_r: 4
lora_alpha: 8
lora_target_modules: all-linear
logging_steps: 1
max_grad_norm: 0.5
n: 8
n_safety: 4
eps: 0.05
probe_norm: 1.0e-1
"""


def test_a_trl_style_yaml_trains_and_an_old_key_names_its_new_name(tmp_path, capsys):
    from conftest import data_files

    from safeprobe.cli.main import main
    files, out = data_files(tmp_path), tmp_path / "run"
    config = tmp_path / "trl.yaml"
    config.write_text(TRL_YAML.format(task=files["dataset_name"], pairs=files["safety_data"], out=out))
    assert main(["train", "--config", str(config), "--beta", "0.1"]) == 0
    run = json.loads((out / "run.json").read_text())
    args = run["training_arguments"]
    assert (args["learning_rate"], args["per_device_train_batch_size"], args["gradient_accumulation_steps"],
            args["max_length"], args["max_grad_norm"], args["probe_norm"], args["beta"]) == (2e-4, 2, 2, 64, 0.5, 0.1, 0.1)
    assert args["gradient_checkpointing"] is True and run["global_steps"] == 2
    assert run["fast_paths"]["shared_lower_forward"].startswith("off: gradient checkpointing")
    assert run["fast_paths"]["dropout_mask_replay"].startswith("off: gradient checkpointing")
    config_file = json.loads((out / "adapter_config.json").read_text())
    assert set(config_file["target_modules"]) >= {"q_proj", "down_proj"}  # all-linear
    capsys.readouterr()
    for old, new in (("lr: 1.0e-4", "learning_rate"), ("batch_size: 2", "per_device_train_batch_size"),
                     ("sap_mode: paper", "mode"), ("model: tiny-random-llama", "model_name_or_path")):
        bad = tmp_path / "old.yaml"
        bad.write_text(f"method: sap\n{old}\n")
        assert main(["train", "--config", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"old.yaml: key '{old.split(':')[0]}' is now '{new}'" in err, err
