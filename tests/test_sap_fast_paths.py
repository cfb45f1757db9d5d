"""SAP's fast paths compute exactly what the straightforward computation does (fp64, tiny models)."""
import contextlib

import pytest
import torch

from safetensors.torch import load_file

from conftest import PAIRS, full_logits_logprobs, lora_model, pair_batch, task_batch
from safeprobe.experiments.train import TrainConfig, train_config, run_train
from safeprobe.method.losses import response_loss, token_logprobs
from safeprobe.method.sap.probe import Probe
from safeprobe.method.sap.algorithm import perturbation, probe_gradient, safe_probe, safety_direction
from safeprobe.method.weights import global_norm, perturbed, same_randomness
from safeprobe.method.sap import shared_forward
from safeprobe.method.sap.dropout_masks import DropoutMasks
from safeprobe.method.sap.shared_forward import SharedLowerForward
from safeprobe.model import decoder_layers


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_head_at_response_positions_only_gives_the_full_logits_result(name):
    model, tok = lora_model(name)
    model.eval()
    for batch in (task_batch(tok), pair_batch(tok)):  # pairs: short and long answers in one padded batch
        fast, mask = token_logprobs(model, batch)
        slow, slow_mask = full_logits_logprobs(model, batch)
        assert torch.equal(mask, slow_mask) and mask.sum() > 0
        assert torch.allclose(fast, slow, rtol=0, atol=1e-12), float((fast - slow).abs().max())
        grads = [torch.autograd.grad(lp.sum(), params_of(model)) for lp in (fast, slow)]
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(*grads))


def straightforward_probe_gradient(model, probe, params, delta, batch, seed):
    """g_V with the weights still requiring grad: autograd records their graph in every layer."""
    V = probe.zeros(batch["input_ids"], requires_grad=True)
    with probe.active(V):
        with same_randomness(seed, batch["input_ids"].device), perturbed(params, delta):
            g_perturbed = torch.autograd.grad(response_loss(model, batch), V)
        with same_randomness(seed, batch["input_ids"].device):
            g_clean = torch.autograd.grad(response_loss(model, batch), V)
    return [a - b for a, b in zip(g_perturbed, g_clean)]


@pytest.mark.parametrize("lora_r", [4, 0])  # 0: full fine-tuning, every weight trainable
def test_probe_passes_with_frozen_weights_give_the_straightforward_g_V(lora_r):
    model, tok = lora_model(dropout=0.1) if lora_r else _full_model()
    probe, batch, params = Probe(model, "1,2"), task_batch(tok), params_of(model)
    s, _ = safety_direction(model, params, pair_batch(tok))
    delta, _ = perturbation(params, s, 1e-3, "absolute")
    fast, _, _ = probe_gradient(model, probe, params, delta, batch, seed=5)
    slow = straightforward_probe_gradient(model, probe, params, delta, batch, seed=5)
    error = float(global_norm([a - b for a, b in zip(fast, slow)]) / global_norm(slow))
    print(f"relative error of g_V, frozen vs straightforward: {error:.2e}")
    assert global_norm(slow) > 0 and error < 1e-6


def _full_model():
    from safeprobe.model import load_model, prepare_full_finetune
    model, tok = load_model("tiny-random-llama")
    model = prepare_full_finetune(model.to(torch.float64))
    model.train()
    return model, tok


def test_probe_passes_record_no_graph_below_the_lowest_probed_layer_and_restore_flags():
    model, tok = lora_model(dropout=0.1)
    probe, batch, params = Probe(model, "2,3"), task_batch(tok), params_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    s, _ = safety_direction(model, params, pair_batch(tok))
    delta, _ = perturbation(params, s, 1e-3, "absolute")
    with graph_recorded_per_layer(model) as seen:
        probe_gradient(model, probe, params, delta, batch, seed=0)
    assert seen == {0: False, 1: False, 2: True, 3: True}  # a graph only from the first probed layer up
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with graph_recorded_per_layer(model) as seen:
        response_loss(model, batch)  # outside the probe passes, the weights' graph is recorded again
    assert seen == {0: True, 1: True, 2: True, 3: True}


@contextlib.contextmanager
def graph_recorded_per_layer(model):
    """{layer index: whether its output (probe included) is part of an autograd graph}, first pass only."""
    seen = {}

    def hook(index):
        def record(module, args, output):
            seen.setdefault(index, (output[0] if isinstance(output, tuple) else output).requires_grad)
        return record
    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(decoder_layers(model))]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def test_fused_norm_and_copy_free_perturbation_match_the_per_tensor_formulas():
    model, tok = lora_model()
    params = params_of(model)
    assert torch.allclose(global_norm(params), torch.sqrt(sum(p.detach().pow(2).sum() for p in params)),
                          rtol=1e-14, atol=0)
    s, _ = safety_direction(model, params, pair_batch(tok))
    delta, eps = perturbation(params, s, 0.05, "relative")
    assert abs(float(global_norm(delta.direction)) * delta.scale - eps) < 1e-12 * eps
    before = [(p.detach().clone(), p.data_ptr()) for p in params]
    with perturbed(params, delta):  # W + dW, to the last bit but one (the fused add may round alpha * d once less)
        assert all(float((p.detach() - (b + delta.scale * d)).abs().max()) <= 1e-15 * float(b.abs().max())
                   and not torch.equal(p, b) for p, (b, _), d in zip(params, before, delta.direction))
    # each parameter has its own storage back, untouched: nothing was copied or written in place
    assert all(p.data_ptr() == ptr and torch.equal(p, b) for p, (b, ptr) in zip(params, before))


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-gpt2"])
def test_step_5_reusing_the_clean_pass_lower_layers_is_the_straightforward_step(name):
    model, tok = lora_model(name, dropout=0.1)  # dropout: the passes must draw the same masks
    probe, batch, params = Probe(model, "2,3"), task_batch(tok), params_of(model)
    s, _ = safety_direction(model, params, pair_batch(tok))
    delta, _ = perturbation(params, s, 1e-3, "absolute")

    def sap_step(shared):
        torch.manual_seed(7)
        g_V, _, _ = probe_gradient(model, probe, params, delta, batch, shared=shared)
        replay = shared.replayed(batch) if shared else contextlib.nullcontext()
        with probe.active(safe_probe(g_V, 0.05)), replay:
            grads = torch.autograd.grad(response_loss(model, batch), params)
        return g_V, grads, torch.get_rng_state()

    with lower_layer_runs(model, 2) as straight_runs:
        straight = sap_step(None)
    with lower_layer_runs(model, 2) as shared_runs:
        shared = sap_step(SharedLowerForward(model, probe.layers[0]))
    assert straight_runs == [3, 3] and shared_runs == [2, 2]  # perturbed, clean (, step 5)
    assert all(torch.equal(a, b) for a, b in zip(straight[0], shared[0]))  # g_V
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(shared[1], straight[1]) if b.norm() > 0]
    print(f"{name}: max relative error of the step-5 weight gradient, shared vs straightforward: {max(errors):.1e}")
    assert len(errors) == len(params) and max(errors) < 1e-6
    assert torch.equal(straight[2], shared[2])  # the training RNG stream ends where it would have


@contextlib.contextmanager
def lower_layer_runs(model, n_lower: int):
    """How often the MLP of each of the first n_lower decoder layers computed inside the block."""
    runs = [0] * n_lower

    def count(index):
        def hook(module, args, output):
            runs[index] += 1
        return hook
    handles = [decoder_layers(model)[i].mlp.register_forward_hook(count(i)) for i in range(n_lower)]
    try:
        yield runs
    finally:
        for handle in handles:
            handle.remove()


def test_sap_trainer_trains_the_same_adapter_with_and_without_lower_layer_sharing(tmp_path, monkeypatch):
    settings = dict(method="sap", model_name_or_path="tiny-random-llama", dataset_name="sst2", n=16, n_safety=8, max_steps=2,
                    per_device_train_batch_size=4, safety_batch_size=2, max_length=96, lora_dropout=0.1, eps=0.05, beta=5.0,
                    probe_layers="2,3", logging_steps=1)
    replays = []
    skipped = shared_forward._skipped
    monkeypatch.setattr(shared_forward, "_skipped", lambda *args: replays.append(1) or skipped(*args))
    run_train(train_config(shared=True, output_dir=str(tmp_path / "shared"), **settings))
    assert len(replays) == 2  # every step 5 reused its clean pass's lower layers
    original = SharedLowerForward.__init__
    monkeypatch.setattr(SharedLowerForward, "__init__",
                        lambda self, model, first, enabled=True: original(self, model, first, enabled=False))
    run_train(train_config(shared=True, output_dir=str(tmp_path / "plain"), **settings))
    shared, plain = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("shared", "plain"))
    assert shared.keys() == plain.keys()
    assert all(torch.allclose(shared[k], plain[k], rtol=1e-5, atol=1e-7) for k in shared)



@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_sap_trainer_trains_the_same_adapter_whether_or_not_it_replays_dropout_masks(tmp_path, monkeypatch, mode):
    settings = dict(method="sap", mode=mode, model_name_or_path="tiny-random-llama", dataset_name="sst2", n=16, n_safety=8,
                    max_steps=3, per_device_train_batch_size=4, safety_batch_size=2, max_length=96, lora_dropout=0.1, eps=0.05,
                    beta=5.0, probe_layers="2,3", logging_steps=1)
    replays = []
    replayed = DropoutMasks.replayed
    monkeypatch.setattr(DropoutMasks, "replayed", lambda self, batch, last=False:
                        replays.append(self.kept is not None) or replayed(self, batch, last))
    run_train(train_config(shared=True, output_dir=str(tmp_path / "replayed"), **settings))
    assert replays == [True] * 6  # the clean pass and step 5 of every step had masks to replay
    original = DropoutMasks.__init__
    monkeypatch.setattr(DropoutMasks, "__init__", lambda self, model, enabled=True: original(self, model, False))
    run_train(train_config(shared=True, output_dir=str(tmp_path / "drawn"), **settings))
    replayed, drawn = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("replayed", "drawn"))
    assert replayed.keys() == drawn.keys() and all(torch.equal(replayed[k], drawn[k]) for k in replayed)

def test_the_shared_prompt_layout_rebuilds_every_safe_and_harmful_sequence():
    from safeprobe.data.tokenize import PairCollator, encode_pairs
    _, tok = lora_model()
    batch = pair_batch(tok)
    shared, n = batch["shared_prompt"], batch["n_pairs"]

    def unpadded(ids, mask):
        return [int(t) for t, m in zip(ids, mask) if m]
    for row in range(2 * n):
        pair = row % n
        prefix = unpadded(shared["prefix_ids"][pair], shared["prefix_mask"][pair])
        mask = [int(m) for m in shared["prefix_mask"][pair]]
        # right-padded and never empty: no query of the prefix pass attends to nothing (NaN in eager attention)
        assert mask[0] == 1 and mask == sorted(mask, reverse=True)
        assert [int(p) for p, m in zip(shared["prefix_positions"][pair], mask) if m] == list(range(len(prefix)))
        tail = unpadded(shared["input_ids"][row], shared["attention_mask"][row])
        assert prefix + tail == unpadded(batch["input_ids"][row], batch["attention_mask"][row])
        labels = [int(y) for y in shared["labels"][row]]
        original = [int(y) for y in batch["labels"][row] if y != -100]
        assert [y for y in labels if y != -100] == original and labels[0] == -100  # no label in a prefix
        positions = [int(p) for p, m in zip(shared["position_ids"][row], shared["attention_mask"][row]) if m]
        assert positions == list(range(len(prefix), len(prefix) + len(tail)))
    assert shared["prefix_mask"].sum() > 0
    assert shared["prefix_ids"].numel() + shared["input_ids"].numel() < batch["input_ids"].numel()
    # answers that differ from their first token on (and nothing to share) give no shared layout
    lone = [{"input_ids": [5, 6], "labels": [-100, 6], "attention_mask": [1, 1]}]
    assert PairCollator(tok)([{"safe": f, "harmful": f} for f in lone]).get("shared_prompt") is None
    # nor does a batch where one pair shares nothing while another shares a prompt
    shares = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "attention_mask": [1, 1, 1, 1]}
    pairs = [{"safe": shares, "harmful": shares}, {"safe": lone[0], "harmful": lone[0]}]
    assert PairCollator(tok)(pairs[:1]).get("shared_prompt") is not None
    assert PairCollator(tok)(pairs).get("shared_prompt") is None
    assert encode_pairs  # the layout comes from the same encoder the trainer uses


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-gpt2"])
@pytest.mark.parametrize("kind", ["paper", "dpo"])
def test_the_shared_prompt_safety_pass_gives_the_padded_batch_s(name, kind):
    from safeprobe.method.sap.shared_prompt import SharedPromptPass
    model, tok = lora_model(name)
    model.eval()  # no dropout: the two layouts must agree to rounding
    batch, params = pair_batch(tok), params_of(model)
    shared = SharedPromptPass()
    s_shared, loss_shared = safety_direction(model, params, batch, kind, shared)
    s_padded, loss_padded = safety_direction(model, params, batch, kind)
    assert shared.verified is True
    # fp64 weights, but rotary embeddings are computed in fp32 (their last bits depend on the tensor's shape)
    assert torch.allclose(loss_shared, loss_padded, rtol=1e-6, atol=0)
    error = global_norm([a - b for a, b in zip(s_shared, s_padded)]) / global_norm(s_padded)
    assert global_norm(s_padded) > 0 and error < 1e-6, float(error)


def test_pairs_fill_rows_first_fit_decreasing():
    from safeprobe.method.sap.shared_prompt import _fill_rows
    assert _fill_rows([300, 900, 200, 500], 1024) == [[1], [3, 0, 2]]
    assert _fill_rows([2000, 10, 1014], 1024) == [[0], [2, 1]]  # a pair longer than a row has a row of its own
    assert _fill_rows([5, 5, 5], 1) == [[0], [1], [2]]
    assert _fill_rows([5, 5, 5], 10**9) == [[0, 1, 2]]


def test_the_block_mask_shows_each_answer_its_own_prompt_and_itself():
    from safeprobe.method.sap.shared_prompt import HARMFUL, PREFIX, SAFE, block_mask
    #         pair 0: prompt, safe, harmful x2 | pair 1: prompt, safe, harmful | padding
    pair = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    part = torch.tensor([[PREFIX, SAFE, HARMFUL, HARMFUL, PREFIX, SAFE, HARMFUL, PREFIX]])
    sees = (block_mask(pair, part, torch.float32) == 0)[0, 0].int().tolist()
    assert sees == [[1, 0, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0, 0],
                    [1, 0, 1, 0, 0, 0, 0, 0],  # the harmful answer does not see the safe one
                    [1, 0, 1, 1, 0, 0, 0, 0],
                    [0, 0, 0, 0, 1, 0, 0, 0],  # nor another pair
                    [0, 0, 0, 0, 1, 1, 0, 0],
                    [0, 0, 0, 0, 1, 0, 1, 0],
                    [0, 0, 0, 0, 0, 0, 0, 1]]  # padding sees itself only: never a query without keys
    assert block_mask(pair, part, torch.bfloat16).dtype == torch.bfloat16


# short beside long, and once the other way round: rows of very different lengths
REFUSAL_PAIRS = [(prompt, "No.", f"{harmful} " * 6) for prompt, _, harmful in PAIRS]
REFUSAL_PAIRS[1] = (PAIRS[1][0], f"{PAIRS[1][1]} " * 6, "Sure.")


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_pairs_packed_into_shared_rows_give_the_padded_batch_s(name, monkeypatch):
    from safeprobe.method.sap import shared_prompt
    model, tok = lora_model(name)
    model.eval()
    batch, params = pair_batch(tok, REFUSAL_PAIRS), params_of(model)
    layout = batch["shared_prompt"]
    sizes = (layout["prefix_mask"].sum(1) + layout["attention_mask"].sum(1).view(2, -1).sum(0)).tolist()
    row_tokens = sum(sorted(sizes)[:2])  # the two shortest pairs share a row, the others have their own
    shared = shared_prompt.SharedPromptPass(row_tokens=row_tokens)
    shared.logprobs(model, batch)  # the one-time check, all pairs in one row and one pair a row
    assert shared.verified is True
    passes = []
    original = shared_prompt.token_logprobs
    monkeypatch.setattr(shared_prompt, "token_logprobs", lambda m, b: passes.append(b["input_ids"].shape) or
                        original(m, b))
    s_shared, loss_shared = safety_direction(model, params, batch, "paper", shared)  # dpo saturates here
    assert passes == [(len(sizes) - 1, row_tokens)]  # one pass, one row fewer than pairs
    assert shared_prompt.layout_tokens(layout, row_tokens) < batch["input_ids"].numel()
    s_padded, loss_padded = safety_direction(model, params, batch, "paper")
    assert torch.allclose(loss_shared, loss_padded, rtol=1e-6, atol=0)
    error = global_norm([a - b for a, b in zip(s_shared, s_padded)]) / global_norm(s_padded)
    assert global_norm(s_padded) > 0 and error < 1e-6, float(error)


def test_the_packed_safety_pass_runs_under_gradient_checkpointing():
    from safeprobe.method.sap.shared_prompt import SharedPromptPass
    model, tok = lora_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing acts in training mode only; no dropout, so the layouts agree to rounding
    batch, params = pair_batch(tok), params_of(model)
    shared = SharedPromptPass()
    shared.logprobs(model, batch)  # the one-time check
    checkpointed, layer = [], decoder_layers(model)[0]
    checkpoint = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: checkpointed.append(1) or checkpoint(*a, **k)
    s_packed, _ = safety_direction(model, params, batch, "paper", shared)
    assert shared.verified is True and checkpointed == [1]  # the packed pass ran the layer checkpointed
    s_padded, _ = safety_direction(model, params, batch, "paper")
    error = global_norm([a - b for a, b in zip(s_packed, s_padded)]) / global_norm(s_padded)
    assert global_norm(s_padded) > 0 and error < 1e-6, float(error)


def test_a_model_that_ignores_the_block_mask_falls_back_to_the_padded_batch(monkeypatch, caplog):
    from safeprobe.method.sap import shared_prompt
    model, tok = lora_model()
    batch, params = pair_batch(tok), params_of(model)
    # a model that ignores the block mask: every token sees every other one
    monkeypatch.setattr(shared_prompt, "block_mask", lambda pair, part, dtype: torch.zeros(
        pair.shape[0], 1, pair.shape[1], pair.shape[1], dtype=dtype))
    shared = shared_prompt.SharedPromptPass()
    with same_randomness(0, torch.device("cpu")):
        s_fallback, _ = safety_direction(model, params, batch, "paper", shared)
    with same_randomness(0, torch.device("cpu")):
        s_padded, _ = safety_direction(model, params, batch, "paper")
    assert shared.verified is False and "uses the padded batch" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(s_fallback, s_padded))  # the check drew no random numbers


def test_the_sap_trainer_takes_its_safety_direction_through_shared_prompts(tmp_path, monkeypatch):
    from safeprobe.method.sap import shared_prompt
    calls = []
    original = shared_prompt.packed_logprobs
    monkeypatch.setattr(shared_prompt, "packed_logprobs", lambda *a: calls.append(1) or original(*a))
    run_train(train_config(method="sap", model_name_or_path="tiny-random-llama", dataset_name="sst2", n=8, n_safety=4, max_steps=2,
                          per_device_train_batch_size=4, safety_batch_size=2, max_length=96, output_dir=str(tmp_path / "out")))
    assert len(calls) == 4  # the one-time check (one row, then one pair a row), then step 1 of each of the two steps


def test_a_sliding_window_shorter_than_the_shared_layout_uses_the_padded_batch(monkeypatch):
    import safeprobe.method.sap.shared_prompt as shared_prompt
    model, tok = lora_model()
    batch = pair_batch(tok)
    layout = batch["shared_prompt"]
    monkeypatch.setattr(model.config, "sliding_window", layout["prefix_ids"].shape[1] + layout["input_ids"].shape[1],
                        raising=False)
    shared_pass = shared_prompt.SharedPromptPass()
    shared_pass.logprobs(model, batch)
    assert shared_pass.verified is True  # fits the window: the shared layout is used
    monkeypatch.setattr(model.config, "sliding_window", layout["input_ids"].shape[1], raising=False)
    monkeypatch.setattr(shared_prompt, "packed_logprobs", lambda *a: pytest.fail("window exceeded"))
    logp, mask = shared_pass.logprobs(model, batch)
    expected, expected_mask = token_logprobs(model, batch)
    assert torch.equal(mask, expected_mask) and torch.equal(logp, expected)


@pytest.mark.parametrize("batch_size, safety_batch_size, chunks", [
    (2, 5, [2, 2, 1]),  # larger than the task batch: chunks of the task batch
    (4, None, [2]),  # the default (the CLI's and SAPTrainer's): half the task batch, as many sequences as examples
])
def test_the_safety_batch_defaults_to_half_the_task_batch_and_runs_in_chunks_of_at_most_the_task_batch(
        tmp_path, monkeypatch, batch_size, safety_batch_size, chunks):
    from safeprobe.method.sap import trainer as sap_trainer
    sizes = []
    original = sap_trainer.safety_direction
    def recording(model, params, chunks, *args):
        sizes.append([chunk["n_pairs"] for chunk in chunks])
        return original(model, params, chunks, *args)
    monkeypatch.setattr(sap_trainer, "safety_direction", recording)
    info = run_train(train_config(method="sap", model_name_or_path="tiny-random-llama", dataset_name="sst2", n=8, n_safety=10, max_steps=2,
                                 per_device_train_batch_size=batch_size, safety_batch_size=safety_batch_size, max_length=96,
                                 output_dir=str(tmp_path / "out")))
    assert sizes == [chunks, chunks]
    assert info["config"]["safety_batch_size"] == sum(chunks)  # the manifest records the size the run used


def test_recorded_dropout_masks_are_torchs_own_and_replay_without_drawing():
    model, tok = lora_model(dropout=0.1)
    batch, masks = task_batch(tok), DropoutMasks(model)
    torch.manual_seed(3)
    plain, plain_end = response_loss(model, batch), torch.get_rng_state()  # torch's own dropout
    torch.manual_seed(3)
    with masks.recorded(batch):
        recorded = response_loss(model, batch)
    assert masks.kept is not None and torch.equal(recorded, plain) and torch.equal(torch.get_rng_state(), plain_end)
    with dropout_draws(model) as draws:
        for seed in (11, 12):  # whatever the RNG state, the masks are the recorded ones
            torch.manual_seed(seed)
            with masks.replayed(batch):
                assert torch.equal(response_loss(model, batch), plain)
            assert torch.equal(torch.get_rng_state(), plain_end)  # where drawing the masks would have left it
    assert draws == [0, 0] * len(masks.modules)
    with masks.replayed(task_batch(tok)):  # another batch (even with the same rows) gets nothing recorded
        assert not torch.equal(response_loss(model, batch), plain)
    with masks.replayed(batch, last=True):
        pass
    assert masks.kept is None


def test_a_model_drawing_random_numbers_outside_its_dropout_modules_keeps_no_masks():
    model, tok = lora_model(dropout=0.1)
    batch, masks = task_batch(tok), DropoutMasks(model)
    noisy = decoder_layers(model)[1].register_forward_hook(lambda module, args, output: torch.rand(1) and None)
    with masks.recorded(batch):
        response_loss(model, batch)
    assert masks.kept is None
    noisy.remove()
    with masks.recorded(batch):
        response_loss(model, batch)
    assert masks.kept is not None
    model.eval()  # no dropout: nothing to record
    with masks.recorded(batch):
        response_loss(model, batch)
    assert masks.kept is None


@contextlib.contextmanager
def dropout_draws(model):
    """Per call of every nn.Dropout module inside the block: 1 if it moved the RNG (drew a mask), else 0."""
    draws, before = [], {}
    modules = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    handles = [h for m in modules for h in (
        m.register_forward_pre_hook(lambda module, args: before.__setitem__(module, torch.get_rng_state())),
        m.register_forward_hook(lambda module, args, output: draws.append(
            int(not torch.equal(before[module], torch.get_rng_state())))))]
    try:
        yield draws
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-gpt2"])
def test_sap_step_with_replayed_dropout_masks_is_bit_identical_and_draws_them_once(name):
    model, tok = lora_model(name, dropout=0.1)
    probe, batch, params = Probe(model, "2,3"), task_batch(tok), params_of(model)
    s, _ = safety_direction(model, params, pair_batch(tok))
    delta, _ = perturbation(params, s, 1e-3, "absolute")
    n_dropouts = sum(type(m) is torch.nn.Dropout for m in model.modules())

    def sap_step(masks):
        shared = SharedLowerForward(model, probe.layers[0])
        torch.manual_seed(7)
        with dropout_draws(model) as draws:
            g_V, loss, loss_perturbed = probe_gradient(model, probe, params, delta, batch, shared=shared,
                                                       masks=masks)
            with probe.active(safe_probe(g_V, 0.05)), shared.replayed(batch), masks.replayed(batch, last=True):
                grads = torch.autograd.grad(response_loss(model, batch), params)
        return (*g_V, loss, loss_perturbed, *grads, torch.get_rng_state()), sum(draws)

    drawn_again, draws_again = sap_step(DropoutMasks(model, enabled=False))
    replayed, draws_once = sap_step(DropoutMasks(model))
    assert all(torch.equal(a, b) for a, b in zip(drawn_again, replayed))  # g_V, losses, step 5, RNG: every bit
    if name == "tiny-random-gpt2":  # its attention dropout draws inside the attention kernel: no replay
        assert draws_once == draws_again
    else:
        assert draws_once == n_dropouts and draws_again == n_dropouts * 2 + n_dropouts // 2  # step 5: layers 2, 3
