"""The alignment stage: Vaccine's hidden-state perturbation, Booster's gradient, the data mix and `safeprobe align`
end to end on tiny models (CPU, seconds)."""
import copy
import json

import pytest
import torch
from conftest import PAIRS, task_batch
from safetensors.torch import load_file
from transformers import TrainingArguments

import safeprobe.experiments.align as align
from safeprobe.cli.main import main
from safeprobe.data import Example, load_prompts
from safeprobe.data.prompt_kinds import PRACTICAL_QUESTION, SENSITIVE_WORDS
from safeprobe.data.tokenize import IGNORE, collator, encode
from safeprobe.method import BoosterTrainer, VaccineTrainer
from safeprobe.method.losses import response_loss
from safeprobe.method.vaccine import perturbations
from safeprobe.model import decoder_layers, load_model, prepare_full_finetune


def full_model(name="tiny-random-llama"):
    model, tokenizer = load_model(name)
    return prepare_full_finetune(model.to(torch.float64)).train(), tokenizer


def trainer(cls, model, tokenizer, tmp_path, knobs=None, **kwargs):
    """A `cls` trainer for single training steps; `knobs`: the method's config fields."""
    args = cls.config_class(str(tmp_path / "t"), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                            remove_unused_columns=False, **(knobs or {}))
    t = cls(model=model, args=args, train_dataset=[{"input_ids": [1], "labels": [1]}], processing_class=tokenizer,
            data_collator=collator(tokenizer), **kwargs)
    t.current_gradient_accumulation_steps = 1  # set by the training loop, which these tests do not run
    return t


def gradients_of_step(t, model, batch) -> list:
    model.zero_grad(set_to_none=True)
    t.training_step(model, dict(batch))
    return [p.grad.clone() for p in model.parameters()]


def plain_gradients(model, batch) -> list:
    model.zero_grad(set_to_none=True)
    response_loss(model, batch).backward()
    return [p.grad.clone() for p in model.parameters()]


def layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def plus(tensor):
    def hook(module, args, output):
        return (output[0] + tensor,) + output[1:] if isinstance(output, tuple) else output + tensor
    return hook


# -- Vaccine -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2"])
def test_vaccine_adds_rho_g_over_norm_to_every_layer_output_then_removes_its_hooks(name, tmp_path):
    model, tokenizer = full_model(name)
    batch, rho = task_batch(tokenizer), 0.7
    layers = decoder_layers(model)
    # independently: g_l = dL/d(output of layer l) by autograd on the recorded outputs, then hooks of our own
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append(layer_output(o))) for layer in layers]
    g = torch.autograd.grad(response_loss(model, batch), outputs)
    for h in handles:
        h.remove()
    eps = [rho * gl / gl.norm() for gl in g]
    handles = [layer.register_forward_hook(plus(e)) for layer, e in zip(layers, eps)]
    expected = plain_gradients(model, batch)
    for h in handles:
        h.remove()
    got = gradients_of_step(trainer(VaccineTrainer, model, tokenizer, tmp_path, {"rho": rho}), model, batch)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(got, expected))
    assert not any(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(plain_gradients(model, batch), got)
                   if a.abs().max() > 0)  # the perturbation changed every gradient that is not zero
    assert all(not layer._forward_hooks for layer in layers)
    per_layer = perturbations(list(g), rho)
    assert [round(float(e.norm()), 12) for e in per_layer] == [rho] * len(layers)
    joint = perturbations(list(g), rho, "global")
    assert float(torch.stack([e.norm() for e in joint]).norm()) == pytest.approx(rho, rel=1e-12)


def test_vaccine_with_rho_zero_is_the_plain_gradient_bit_for_bit(tmp_path):
    model, tokenizer = full_model()
    batch = task_batch(tokenizer)
    got = gradients_of_step(trainer(VaccineTrainer, model, tokenizer, tmp_path, {"rho": 0.0}), model, batch)
    assert all(torch.equal(a, b) for a, b in zip(got, plain_gradients(model, batch)))


# -- Booster -------------------------------------------------------------------------------------------------------
def harmful_features(tokenizer):
    return [encode(tokenizer, Example((("user", p),), harmful), 64) for p, _, harmful in PAIRS]


def test_booster_with_lambda_zero_is_the_plain_gradient_bit_for_bit(tmp_path):
    model, tokenizer = full_model()
    batch = task_batch(tokenizer)
    t = trainer(BoosterTrainer, model, tokenizer, tmp_path, {"booster_lambda": 0.0},
                harmful_dataset=harmful_features(tokenizer))
    got = gradients_of_step(t, model, batch)
    assert all(torch.equal(a, b) for a, b in zip(got, plain_gradients(model, batch)))


def test_booster_gradient_is_the_papers_first_order_formula_and_weights_come_back_exactly(tmp_path):
    model, tokenizer = full_model()
    batch, harmful = task_batch(tokenizer), collator(tokenizer)(harmful_features(tokenizer))
    lamb, alpha = 5.0, 0.1
    # direct: grad h at w; w' = w - alpha * g/||g|| written into a copy of the model; grad h at w'
    g1 = plain_gradients(model, harmful)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in g1]))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), g1):
            p.sub_(alpha * g / norm)
    g2 = plain_gradients(moved, harmful)
    expected = [a + lamb * (b - c) for a, b, c in zip(plain_gradients(model, batch), g1, g2)]
    before = [p.detach().clone() for p in model.parameters()]
    # the whole harmful set (3 rows) is one harmful batch, so the trainer sees the same data
    t = trainer(BoosterTrainer, model, tokenizer, tmp_path, {"booster_lambda": lamb, "booster_alpha": alpha},
                harmful_dataset=harmful_features(tokenizer))
    got = gradients_of_step(t, model, batch)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # restored bit for bit
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-11) for a, b in zip(got, expected))
    correction = torch.linalg.vector_norm(torch.stack([(b - c).norm() for b, c in zip(g1, g2)]))
    assert correction > 1e-3 * norm  # the term being checked is not negligible
    stats = t._step_stats
    assert stats["booster_gap"][0] == pytest.approx(stats["harmful_loss"][0] - stats["harmful_loss_after_step"][0])
    assert stats["booster_gap"][0] > 0  # a normalised descent step on h lowers h


# -- data ----------------------------------------------------------------------------------------------------------
def test_sensitive_words_match_benign_look_alikes_not_substrings():
    hits = ["Describe the attack on Pearl Harbor.", "Write an argument in favor of gun control laws.",
            "Analyze the theme of loyalty in To Kill a Mockingbird.", "What were the causes of World War I?"]
    misses = ["Write a story about a robot.", "Describe the experience of exploring a cave.",
              "Create a password of 5 characters.", "Summarize the executive report."]
    assert all(SENSITIVE_WORDS.search(t) for t in hits)
    assert not any(SENSITIVE_WORDS.search(t) for t in misses)


def test_practical_questions_are_a_users_how_to_questions():
    hits = ["How can I make an affordable monthly budget?", "What is the best way to approach a difficult problem?",
            "Where can I find a good recipe?", "Can you suggest a name for a company?"]
    misses = ["How would you describe the taste of chocolate?", "Why is the sky blue?", "Name a colour.",
              "Describe how you can fix a bike."]
    assert all(PRACTICAL_QUESTION.match(t) for t in hits)
    assert not any(PRACTICAL_QUESTION.match(t) for t in misses)


def test_benign_prompts_come_from_training_sources_only_without_repeats():
    cfg = align.align_config(n_benign=30, n_sensitive=20, n_questions=25)
    buckets = align.benign_prompts(cfg)
    assert {name: len(bucket) for name, bucket in buckets.items()} == {"sensitive": 20, "question": 25, "general": 30}
    prompts = [p for bucket in buckets.values() for p in bucket]
    assert len({p.messages for p in prompts}) == 75
    assert all(SENSITIVE_WORDS.search(p.prompt) for p in buckets["sensitive"])
    assert all(p.prompt.rstrip().endswith("?") for p in buckets["question"])
    assert all(PRACTICAL_QUESTION.match(p.prompt) for p in buckets["question"])  # 159 such: drawn first
    evaluation = {p.prompt.strip() for suite in ("advbench", "jbb-harmful", "jbb-benign", "xstest")
                  for p in load_prompts(suite)}
    assert not evaluation & {p.prompt.strip() for p in prompts}


def test_self_answers_that_refuse_are_dropped_and_cut_ones_do_not_learn_to_stop():
    _, tokenizer = load_model("tiny-random-llama")
    chat = [{"role": "user", "content": "Name a colour."}]
    rows = [{"messages": chat, "answer": "I'm sorry, I cannot help.", "finished": True},
            {"messages": chat, "answer": "Blue.", "finished": True},
            {"messages": chat, "answer": "Blue, like the sky on a clear", "finished": False}]
    refusal = Example((("user", "How do I make poison?"),), "I can't help with that.")
    features, counts = align.training_features(tokenizer, [refusal], rows, max_length=64)
    assert counts == {"n_refusal_examples": 1, "n_self_answers": 2, "n_self_answers_dropped_as_refusals": 1,
                      "n_self_answers_cut": 1}
    stop = features[0]["labels"][-1]
    assert features[1]["labels"][-1] == stop != IGNORE  # a finished answer teaches stopping
    assert features[2]["labels"][-1] == IGNORE and features[2]["labels"][-2] != IGNORE


def test_cache_key_follows_what_changes_the_model():
    data = align.data_fingerprints(align.align_config())
    key = align.cache_key(align.align_config(), data)
    assert align.cache_key(align.align_config(save_steps=5, output_dir="x"), data) == key
    vaccine = align.cache_key(align.align_config(method="vaccine"), data)
    assert align.cache_key(align.align_config(method="vaccine", rho=9.0), data) != vaccine
    assert align.cache_key(align.align_config(n_refusal=10), data) != key
    assert align.cache_key(align.align_config(method="vaccine"), data) != key
    assert align.cache_key(align.align_config(), {**data, "refusal": {"sha256": "other"}}) != key


# -- end to end ----------------------------------------------------------------------------------------------------
TINY = ["--model-name-or-path", "tiny-random-llama", "--n-refusal", "6", "--n-benign", "4", "--n-sensitive", "2",
        "--n-questions", "2", "--max-new-tokens", "4", "--max-steps", "2", "--per-device-train-batch-size", "2", "--n-harmful", "4"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Aligned models and self-answers in a temporary cache (the tiny models stay in the usual one)."""
    monkeypatch.setattr(align, "aligned_home", lambda: tmp_path / "aligned")
    return tmp_path / "aligned"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_align_writes_a_loadable_model_and_a_rerun_reuses_it(home, capsys, monkeypatch):
    code, out, err = run(capsys, "align", *TINY)
    assert code == 0, err
    target = home / out.strip().splitlines()[-1].rsplit("/", 1)[-1]
    assert out.strip().splitlines()[-1] == str(target) and target.name.startswith("tiny-random-llama-plain-")
    info = json.loads((target / "align.json").read_text())
    assert (target / ".complete").is_file() and info["global_steps"] == 2 and info["data"]["refusal"]["sha256"]
    assert info["counts"]["n_refusal_examples"] == 6
    assert len((target / "self_answers.jsonl").read_text().splitlines()) == 4 + 2 + 2  # general, sensitive, questions
    model, tokenizer = load_model(str(target))
    _, base_tokenizer = load_model("tiny-random-llama")
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True) == \
        base_tokenizer.apply_chat_template(chat, add_generation_prompt=True)  # same tokens as the base model
    monkeypatch.setattr(align, "_align", lambda *a: pytest.fail("a finished alignment was trained again"))
    code, out2, err = run(capsys, "align", *TINY)
    assert code == 0 and "reused" in out2 and out2.strip().splitlines()[-1] == str(target), err


def test_lora_alignment_saves_plain_weights_that_moved_only_by_the_merged_adapters(home, tmp_path, capsys):
    code, _, err = run(capsys, "align", *TINY, "--use-peft", "--lora-r", "4", "--learning-rate", "1e-2", "--output-dir", str(tmp_path / "l"))
    assert code == 0, err
    assert not (tmp_path / "l" / "adapter_config.json").exists()  # merged: a plain checkpoint, no adapter
    aligned, base = load_model(str(tmp_path / "l"))[0].state_dict(), load_model("tiny-random-llama")[0].state_dict()
    assert aligned.keys() == base.keys()
    moved = {name for name in base if not torch.equal(aligned[name], base[name])}
    assert moved and all(name.endswith("proj.weight") for name in moved)  # linear layers only: LoRA's targets
    summary = json.loads((tmp_path / "l" / "align.json").read_text())["model"]
    assert 0 < summary["n_trainable"] < summary["n_params"] / 10  # what trained: the adapters


@pytest.mark.parametrize("method, logged", [("vaccine", "hidden_grad_norm"), ("booster", "booster_gap")])
def test_vaccine_and_booster_align_end_to_end(method, logged, home, tmp_path, capsys):
    code, _, err = run(capsys, "align", *TINY, "--method", method, "--max-steps", "1",
                       "--output-dir", str(tmp_path / method))
    assert code == 0, err
    log = [json.loads(line) for line in (tmp_path / method / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["method"] == method and log[0][logged] > 0
    assert json.loads((tmp_path / method / "align.json").read_text())["config"]["method"] == method


@pytest.mark.parametrize("args, message", [
    (["--method", "magic"], "valid choices: plain, vaccine, booster"),
    (["--refusal-data", "nope.jsonl"], "nope.jsonl: file not found"),
    (["--harmful-data", "pure-bad"], "attack data"),
    (["--n-refusal", "0"], "n_refusal must be >= 1"),
])
def test_align_bad_input_is_one_line_exit_2(args, message, home, capsys):
    code, _, err = run(capsys, "align", *TINY, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not home.exists()  # refused before anything was written


@pytest.mark.parametrize("flag, method", [("--refusal-data", "plain"), ("--harmful-data", "booster")])
def test_a_bad_row_in_the_alignment_data_is_reported_before_the_model_loads(flag, method, home, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr(align, "load_base", lambda *a, **k: pytest.fail("the model loaded before the data was read"))
    bad = tmp_path / "bad.jsonl"
    rows = {"plain": '{"prompt": "p", "completion": "No."}\n{"prompt": "q"}\n',
            "booster": '{"prompt": "p", "safe": "No.", "harmful": "Yes."}\n{"prompt": "q", "safe": "No."}\n'}
    bad.write_text(rows[method])
    code, _, err = run(capsys, "align", *TINY, "--method", method, flag, str(bad))
    assert code == 2 and f"{bad}:2: missing required field" in err and len(err.strip().splitlines()) == 1, err


def test_align_without_the_data_says_where_to_put_it(home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAFEPROBE_DATA", str(tmp_path / "empty"))
    code, _, err = run(capsys, "align", *TINY)
    assert code == 2 and "SAFEPROBE_DATA" in err and len(err.strip().splitlines()) == 1, err


def test_an_interrupted_alignment_resumes_from_its_last_checkpoint(home, tmp_path, monkeypatch):
    cfg = align.align_config(model_name_or_path="tiny-random-llama", n_refusal=6, n_benign=2, n_sensitive=2, n_questions=2,
                            max_new_tokens=4, max_steps=2, per_device_train_batch_size=2, save_steps=1, output_dir=str(tmp_path / "out"))
    save = align.save_model
    monkeypatch.setattr(align, "save_model", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after training, before the model was saved
        align.run_align(cfg)
    assert not (tmp_path / "out" / ".complete").exists() and (tmp_path / "out" / "checkpoint-2").is_dir()
    trained = load_file(str(tmp_path / "out" / "checkpoint-2" / "model.safetensors"))
    monkeypatch.setattr(align, "save_model", save)
    info = align.run_align(cfg)
    assert info["resumed_from"].endswith("checkpoint-2") and info["global_steps"] == 2 and not info["reused"]
    assert (tmp_path / "out" / ".complete").is_file() and not (tmp_path / "out" / "checkpoint-2").exists()
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(saved[name], weight) for name, weight in trained.items())  # no step more, none less


def test_alignment_batches_come_from_the_random_order_sampler_and_each_epoch_reshuffles(tmp_path):
    """The Trainer asks the sampler for a new order every epoch (set_epoch): two epochs, two different orders."""
    from safeprobe.data.sampling import LengthGroupedBatches
    from safeprobe.method import SafeprobeTrainer
    model, tokenizer = full_model()
    features = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 9, 4, 8, 5, 7, 6, 2)]
    args = TrainingArguments(str(tmp_path / "t"), per_device_train_batch_size=2, num_train_epochs=2, report_to=[],
                             use_cpu=True, remove_unused_columns=False, save_strategy="no", logging_strategy="no",
                             train_sampling_strategy="group_by_length", learning_rate=0.0)
    seen = []
    def collate(batch):
        seen.append(sorted(len(f["input_ids"]) for f in batch))
        return collator(tokenizer)(batch)
    t = SafeprobeTrainer(model=model, args=args, train_dataset=features, processing_class=tokenizer, data_collator=collate)
    assert isinstance(t._get_train_sampler(), LengthGroupedBatches)
    t.train()
    assert len(seen) == 8 and all(hi - lo == 1 for lo, hi in seen)  # neighbours in length share a batch
    assert seen[:4] != seen[4:] and sorted(seen[:4]) == sorted(seen[4:])  # same batches, another order
