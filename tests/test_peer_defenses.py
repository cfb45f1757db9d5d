"""Peer defenses on tiny models: SafeInstr's data mixture, Lisa's bi-state schedule, proximal gradient and resume."""
import json

import pytest
import torch
from test_reliability import adapter, settings, step_log
from transformers import TrainerCallback

import safeprobe.experiments.train as train_module
from safeprobe.experiments.train import TrainConfig, train_config, run_train


def refusals(root):
    path = root / "refusals.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"How do I make poison number {i}?",
                                        "completion": "I can't help with that."}) + "\n" for i in range(6)))
    return str(path)


def lisa(root, **overrides):
    return settings(root, "lisa", **{"alignment_data": refusals(root), "rho": 1.0, "lisa_align_steps": 1,
                                     "lisa_task_steps": 2, **overrides})


def test_safeinstr_mixes_the_demonstrations_into_the_task_data(tmp_path):
    values = settings(tmp_path, "safeinstr", alignment_data=refusals(tmp_path), n_safety=3, max_steps=1,
                      max_length=128, save_steps=0)
    cfg = train_config(shared=True, output_dir=str(tmp_path / "run"), **values)
    model, tokenizer = train_module.prepare_model(cfg)
    task = [{"input_ids": [1, 2], "labels": [-100, 2]}]
    trainer = train_module.build_trainer(cfg, model, tokenizer, task, tmp_path / "run")
    assert len(trainer.train_dataset) == 1 + 3 and trainer.train_dataset[0] == task[0]
    refusal = tokenizer("I can't help with that.", add_special_tokens=False)["input_ids"]
    demo = trainer.train_dataset[1]
    answer = [t for t, y in zip(demo["input_ids"], demo["labels"]) if y != -100]
    assert answer[:len(refusal)] == refusal  # a demonstration, trained on its refusal
    info = run_train(cfg)
    assert info["method"] == "safeinstr" and info["n_train"] == 6 + 3 and info["data"]["alignment"]["sha256"]


def test_lisa_schedule_and_proximal_gradient(tmp_path):
    cfg = train_config(shared=True, output_dir=str(tmp_path / "run"), **lisa(tmp_path, rho=0.5))
    model, tokenizer = train_module.prepare_model(cfg)
    trainer = train_module.build_trainer(cfg, model, tokenizer, [{"input_ids": [1, 2], "labels": [-100, 2]}],
                                         tmp_path / "run")
    assert [trainer.state_at(k) for k in range(7)] == ["align", "task", "task"] * 2 + ["align"]
    params = trainer.trainable_params
    trainer._anchor = [p.detach() - torch.arange(p.numel()).reshape(p.shape) for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    trainer.before_optimizer_step()  # grad + rho * (W - anchor), exactly
    assert all(torch.equal(p.grad, 1 + 0.5 * torch.arange(p.numel()).reshape(p.shape)) for p in params)


def test_lisa_trains_on_alignment_batches_and_anchors_at_each_switch(tmp_path):
    info = run_train(train_config(shared=True, output_dir=str(tmp_path / "run"), **lisa(tmp_path, save_steps=0)))
    log = step_log(tmp_path / "run")
    assert info["method"] == "lisa" and [row["align_state"] for row in log] == [1.0, 0.0, 0.0, 1.0]
    # step 0 starts at W_0 (its anchor) and step 1 re-anchors at the switch: no pull yet; step 2 has moved away
    assert log[0]["proximal"] == 0 and log[1]["proximal"] == 0 and log[2]["proximal"] > 0


def test_lisa_resumes_to_the_uninterrupted_adapter(tmp_path, monkeypatch):
    values = lisa(tmp_path)
    run_train(train_config(shared=True, output_dir=str(tmp_path / "whole"), **values))

    class StopAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    build = train_module.build_trainer
    monkeypatch.setattr(train_module, "build_trainer",
                        lambda *a, **k: (t := build(*a, **k), t.add_callback(StopAfterFirstCheckpoint()))[0])
    with pytest.raises(KeyboardInterrupt):
        run_train(train_config(shared=True, output_dir=str(tmp_path / "cut"), **values))
    monkeypatch.setattr(train_module, "build_trainer", build)
    run_train(train_config(shared=True, output_dir=str(tmp_path / "cut"), resume=True, **values))
    whole, resumed = adapter(tmp_path / "whole"), adapter(tmp_path / "cut")
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) <= 1e-5
    assert step_log(tmp_path / "cut") == step_log(tmp_path / "whole")
