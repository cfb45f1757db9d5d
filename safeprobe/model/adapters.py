"""What gets trained: LoRA adapters (via PEFT) or every parameter (full fine-tuning)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import UserError
from .identity import check_base
from .layers import decoder_layers

logger = logging.getLogger(__name__)

# PEFT's per-architecture defaults (q_proj + v_proj for Llama-style models, as in the SAP paper; c_attn for
# GPT-2; query_key_value for GPT-NeoX ...), plus architectures PEFT lacks.
_EXTRA_TARGETS = {
    "phi3": ["qkv_proj"],  # Phi-3 fuses q, k and v into one projection: q_proj / v_proj do not exist
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "granite": ["q_proj", "v_proj"],
}
_LINEAR_TYPES = (nn.Linear, Conv1D)  # GPT-2 style models use transformers' Conv1D for their projections


def apply_lora(model, r: int = 8, alpha: float = 16, dropout: float = 0.05,
               target_modules: Sequence[str] | str | None = None) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapter weights are trainable afterwards.

    `target_modules`: module names (matched as name suffixes, PEFT's rule), "all-linear", or None for the
    architecture's default (see `default_target_modules`).
    """
    if isinstance(model, PeftModel):
        raise UserError("the model already has adapters; apply LoRA to a plain model")
    _check_hyperparameters(r, alpha, dropout)
    if target_modules is None:
        target_modules = default_target_modules(model)
    elif isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    if not isinstance(target_modules, str):
        _check_targets(model, list(target_modules))
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        # Conv1D stores its weight transposed (fan_in x fan_out); PEFT only warns and fixes it otherwise.
        fan_in_fan_out=model.config.model_type in ("gpt2", "gpt_bigcode"),
    )
    try:
        with _quiet_peft():
            return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target that is a container or an unsupported layer type
        raise UserError(f"cannot apply LoRA: {e}") from None


def load_adapter(model, adapter: str | Path, spec: str | None = None,
                 allow_base_mismatch: bool = False) -> tuple[PeftModel, dict]:
    """`model` with the saved PEFT adapter in folder `adapter`, in eval mode, and the check of `model` (loaded from
    `spec`, default its name_or_path) against the base the adapter was trained on (see `identity.check_base`)."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"adapter '{adapter}': no adapter_config.json there (expected a PEFT adapter directory)")
    base_check = check_base(model, spec or model.name_or_path, adapter, allow_base_mismatch)
    return _apply_adapter(model, adapter), base_check


def _apply_adapter(model, adapter: str | Path) -> PeftModel:
    try:
        with _quiet_peft():
            return PeftModel.from_pretrained(model, str(adapter)).eval()
    except (ValueError, RuntimeError, KeyError) as e:  # target modules or tensor shapes of another model
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"adapter '{adapter}' does not fit this model ({model.config.model_type}): {reason}") from None


@contextlib.contextmanager
def _quiet_peft():
    with warnings.catch_warnings():
        # PEFT probes `model.is_gradient_checkpointing`, which transformers 5 deprecates: noise, not news.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def default_target_modules(model) -> list[str] | str:
    """LoRA targets for `model`'s architecture; unknown ones get every linear layer of the decoder blocks."""
    model_type = model.config.model_type
    targets = _EXTRA_TARGETS.get(model_type) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if targets is not None:
        return targets if isinstance(targets, str) else list(targets)
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in decoder_layers(model).named_modules()
                      if isinstance(m, _LINEAR_TYPES)})
    logger.warning("no default LoRA targets for model type '%s'; targeting every linear layer of its decoder "
                   "blocks: %s", model_type, ", ".join(targets))
    return targets


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers (excluding the LM head), the useful values for target_modules."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, _LINEAR_TYPES) and not name.endswith("lm_head")})


def _check_targets(model, targets: list[str]) -> None:
    """Fail early, naming the candidates, if a target matches no module (PEFT only fails if all miss)."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not targets or missing:
        raise UserError(f"LoRA target modules not found in the model: {', '.join(missing) or '(none given)'}; "
                        f"linear modules are: {', '.join(linear_module_names(model))}")


def _check_hyperparameters(r, alpha, dropout) -> None:
    if not isinstance(r, int) or r <= 0:
        raise UserError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def make_trainable(model, lora_r: int = 0, **lora):
    """LoRA adapters of rank lora_r (`lora`: apply_lora's other arguments), or with lora_r 0 every parameter."""
    return apply_lora(model, r=lora_r, **lora) if lora_r > 0 else prepare_full_finetune(model)


def prepare_full_finetune(model):
    """Make every parameter trainable (full fine-tuning); returns `model`."""
    if isinstance(model, PeftModel):
        raise UserError("the model has LoRA adapters; full fine-tuning needs a plain model")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def trainable_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter that requires grad, in `named_parameters` order (stable)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
