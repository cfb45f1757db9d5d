"""Model layer: loading (built-in, local, Hub), LoRA / full fine-tuning set-up, and model introspection."""
from .adapters import apply_lora, default_target_modules, make_trainable, prepare_full_finetune, trainable_parameters
from .layers import decoder_layers, model_summary
from .loading import MODEL_NAMES, load_model
from .tokenizer import prepare_tokenizer

__all__ = [
    "MODEL_NAMES",
    "apply_lora",
    "make_trainable",
    "decoder_layers",
    "default_target_modules",
    "load_model",
    "model_summary",
    "prepare_full_finetune",
    "prepare_tokenizer",
    "trainable_parameters",
]
