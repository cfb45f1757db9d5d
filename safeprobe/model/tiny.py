"""Tiny randomly-initialised models for tests and smoke runs, one per common architecture.

They use the real SmolLM2 tokenizer (vocab 49152, ChatML template) so that the whole pipeline, chat
templates included, runs exactly as with a real model. Weights come from a fixed seed, so every machine
builds the same model; the build takes about a second and is cached under `home_dir()/models/<name>/`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .cache import cached_model_dir
from .compat import dtype_kwarg
from .embedded import embedded_dir
from .tokenizer import prepare_tokenizer

SEED = 0
FORMAT = 2  # bump when the configs below change, so cached copies are rebuilt

_DECODER = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=2048)

# name -> (model_type, config overrides); tied embeddings keep the 49152-token vocab cheap.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-random-llama": ("llama", _DECODER),
    "tiny-random-qwen2": ("qwen2", _DECODER),
    "tiny-random-mistral": ("mistral", {**_DECODER, "sliding_window": None}),
    "tiny-random-gpt2": ("gpt2", dict(n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=1024)),
}
TINY_NAMES = tuple(TINY_CONFIGS)


def tiny_dir(name: str) -> Path:
    """Cached checkpoint directory of the tiny model `name` (built on first use)."""
    return cached_model_dir(name, lambda out: _build(name, out), FORMAT)


def build_tiny_model(name: str, tokenizer):
    """A freshly initialised tiny model `name` sized for `tokenizer` (deterministic: fixed seed)."""
    return build_random_model(*TINY_CONFIGS[name], tokenizer)


def build_random_model(model_type: str, overrides: dict, tokenizer):
    """A freshly initialised model of `model_type` with config `overrides`, sized for `tokenizer` (fixed seed)."""
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,  # set below: at init, Llama-style models zero the embedding row of the pad id
        tie_word_embeddings=True,
        use_cache=True,
        **overrides,
    )
    # A private RNG state: a fixed seed without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(torch.float32))
    # pad = <|im_end|>, a real token: it needs a random embedding like any other
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _build(name: str, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir())  # the real SmolLM2 tokenizer
    model = build_tiny_model(name, tokenizer)
    prepare_tokenizer(tokenizer, model, add_bos=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
