"""Finding a model's decoder blocks (where SAP probes hidden states), swapping modules' forward for a while, and
summarising a model for manifests."""
from __future__ import annotations

import contextlib

from torch import nn

from ..errors import UserError

# Where the common architectures keep their blocks, relative to the *ForCausalLM model.
_KNOWN_PATHS = (
    "model.layers",                 # Llama, Mistral, Qwen2, Gemma, Phi-3, OLMo ...
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llama 4 ...)
    "transformer.h",                # GPT-2, GPT-J, GPT-Neo, BLOOM, Falcon
    "gpt_neox.layers",              # GPT-NeoX, Pythia
    "model.decoder.layers",         # OPT
    "transformer.blocks",           # MPT
)


def base_model(model) -> nn.Module:
    """The underlying transformers model, through a PEFT wrapper if there is one."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model) -> nn.ModuleList:
    """The ModuleList of decoder blocks of `model` (a transformers model or a PeftModel around one)."""
    base = base_model(model)
    for path in _KNOWN_PATHS:
        found = _get_path(base, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    found = _longest_uniform_list(base)
    if found is None:
        raise UserError(f"cannot find the decoder layers of {type(base).__name__}")
    return found


def _get_path(module: nn.Module, path: str):
    for attribute in path.split("."):
        module = getattr(module, attribute, None)
        if module is None:
            return None
    return module


def _longest_uniform_list(model: nn.Module) -> nn.ModuleList | None:
    """Fallback: the longest ModuleList whose children all share one class, outermost lists only
    (so that e.g. the experts inside one MoE block never beat the list of blocks)."""
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    outermost = [m for name, m in candidates
                 if not any(name.startswith(other + ".") for other, _ in candidates if other != name)]
    return max(outermost, key=len, default=None)


@contextlib.contextmanager
def forwards_replaced(modules, make_forward):
    """Inside the block, each module's forward is `make_forward(module, original)`, `original` being what its
    forward was (an instance-level forward set by someone else included). Yields a function that puts every
    original back early; leaving the block does it anyway."""
    saved = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = make_forward(module, module.forward)

    def restore():
        for module, original in zip(modules, saved):
            if original is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = original
    try:
        yield restore
    finally:
        restore()


def model_summary(model) -> dict:
    """model_type, n_layers, hidden_size, n_params, n_trainable (and dtype) of `model`, for run manifests."""
    config = base_model(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    parameters = list(model.parameters())  # tied weights are counted once
    return {
        "model_type": config.model_type,
        "n_layers": len(decoder_layers(model)),
        "hidden_size": getattr(text_config, "hidden_size", None) or getattr(text_config, "n_embd", None),
        "n_params": sum(p.numel() for p in parameters),
        "n_trainable": sum(p.numel() for p in parameters if p.requires_grad),
        "dtype": str(parameters[0].dtype).removeprefix("torch.") if parameters else None,
    }
