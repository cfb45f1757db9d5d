"""SAP on architectures the rest of the suite never builds: other layer paths (GPT-NeoX, OPT), fused attention
projections as LoRA targets (GPT-NeoX, Phi-3, BLOOM), ALiBi instead of rotary positions (BLOOM) and logit
soft-capping with alternating sliding-window layers (Gemma 2). The fast paths (the packed safety pass included,
or its fallback where a model takes no block mask) must give Algorithm 1's numbers, and the
command-line pipeline (train, then evaluate the adapter) must run."""
import contextlib
import json

import pytest
import torch
from transformers import AutoTokenizer

from conftest import full_logits_logprobs, lora_model, pair_batch, task_batch
from safeprobe.evaluation.runner import run_eval
from safeprobe.experiments.train import TrainConfig, train_config, run_train
from safeprobe.method.losses import response_loss, token_logprobs
from safeprobe.method.sap.probe import Probe
from safeprobe.method.weights import global_norm
from safeprobe.method.sap.algorithm import perturbation, probe_gradient, safe_probe, safety_direction
from safeprobe.method.sap.shared_forward import SharedLowerForward
from safeprobe.method.sap.shared_prompt import SharedPromptPass
from safeprobe.model.embedded import embedded_dir
from safeprobe.model.tiny import build_random_model
from safeprobe.model.tokenizer import prepare_tokenizer

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
ARCHITECTURES = {
    "gemma2": SIZES,
    "gpt_neox": {**SIZES, "rotary_pct": 0.25},
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=512),
    "phi3": SIZES,
    "bloom": dict(hidden_size=64, n_layer=4, n_head=4),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One tiny random checkpoint per architecture, with the real SmolLM2 tokenizer (chat template included)."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir())
    root, dirs = tmp_path_factory.mktemp("architectures"), {}
    for model_type, sizes in ARCHITECTURES.items():
        model = build_random_model(model_type, sizes, tokenizer)
        prepare_tokenizer(tokenizer, model, add_bos=False)
        dirs[model_type] = root / model_type
        model.save_pretrained(dirs[model_type])
        tokenizer.save_pretrained(dirs[model_type])
    return dirs


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_sap_fast_paths_give_algorithm_1(model_dirs, model_type):
    model, tok = lora_model(str(model_dirs[model_type]))
    model.eval()  # no dropout: the layouts must agree to rounding
    params = [p for p in model.parameters() if p.requires_grad]
    pairs, batch = pair_batch(tok), task_batch(tok)
    # the head only at response positions keeps what the model applies after its head (Gemma 2: soft-capping)
    fast, mask = token_logprobs(model, batch)
    slow, slow_mask = full_logits_logprobs(model, batch)
    assert torch.equal(mask, slow_mask) and torch.allclose(fast, slow, rtol=0, atol=1e-12)
    shared_prompt = SharedPromptPass()
    s_shared, _ = safety_direction(model, params, pairs, "paper", shared_prompt)
    s_padded, _ = safety_direction(model, params, pairs, "paper")
    # eager attention (Gemma 2) takes the packed rows' block mask; BLOOM's ALiBi does not, and falls back
    assert shared_prompt.verified is (model_type != "bloom")
    assert global_norm(s_padded) > 0
    assert global_norm([a - b for a, b in zip(s_shared, s_padded)]) / global_norm(s_padded) < 1e-6

    probe = Probe(model, "middle")
    delta, _ = perturbation(params, s_padded, 1e-3, "absolute")

    def step_5_gradient(shared):
        g_V, _, _ = probe_gradient(model, probe, params, delta, batch, shared=shared)
        assert global_norm(g_V) > 0
        with probe.active(safe_probe(g_V, 0.05)), shared.replayed(batch) if shared else contextlib.nullcontext():
            return torch.autograd.grad(response_loss(model, batch), params)
    lower = SharedLowerForward(model, probe.layers[0])
    assert lower.supported
    reused, straight = step_5_gradient(lower), step_5_gradient(None)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(reused, straight))


@pytest.mark.parametrize("model_type", ["gpt_neox", "bloom"])
def test_sap_trains_and_the_adapter_is_evaluated(model_dirs, model_type, tmp_path):
    out = tmp_path / "run"
    info = run_train(train_config(method="sap", model_name_or_path=str(model_dirs[model_type]), dataset_name="sst2", n=8, n_safety=4,
                                 max_steps=2, per_device_train_batch_size=2, safety_batch_size=2, max_length=96, probe_norm=1.0,
                                 diagnostics_every=1, output_dir=str(out)))
    assert info["global_steps"] == 2 and (out / "adapter_model.safetensors").is_file()
    assert len((out / "diagnostics.jsonl").read_text().splitlines()) == 3  # before training, after each step
    result = run_eval(str(model_dirs[model_type]), adapter=str(out), suites=["advbench", "sst2"], limit=2,
                      max_new_tokens=4, output_dir=str(tmp_path / "eval"))
    assert set(result["suites"]) == {"advbench", "sst2"}
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["suites"]["sst2"]["n"] == 2

