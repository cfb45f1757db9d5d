"""`load_model(spec)`: the one entry point that turns a model spec into (model, tokenizer).

A spec is, in this order: a built-in name (MODEL_NAMES), an existing local checkpoint directory, or a
Hugging Face Hub id. Built-in models are converted / built once into `home_dir()/models/<name>/` and then
loaded from there like any local checkpoint. `LoadOptions` are TRL's `ModelConfig` keys: weight dtype, revision,
attention implementation, remote code, and 4-/8-bit quantisation through bitsandbytes (QLoRA).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import UserError
from .compat import dtype_kwarg
from .embedded import EMBEDDED_NAME, embedded_dir
from .tiny import TINY_NAMES, tiny_dir
from .tokenizer import prepare_tokenizer

MODEL_NAMES = (EMBEDDED_NAME, *TINY_NAMES)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "auto": "auto",  # whatever the checkpoint was saved in
}

# "name" or "owner/name"; anything else (several slashes, ./, ~, absolute) can only be a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name (a bare name is more often a typo than a model)


@dataclass(frozen=True)
class LoadOptions:
    """How a checkpoint is loaded, under TRL's `ModelConfig` names."""

    revision: str = "main"  # branch, tag or commit of a Hub model
    attn_implementation: str | None = None  # eager, sdpa, flash_attention_2...; None: transformers' choice
    trust_remote_code: bool = False  # run the model code a Hub repository ships
    load_in_4bit: bool = False  # QLoRA: 4-bit base weights (bitsandbytes, CUDA)
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = False
    bnb_4bit_quant_storage: str | None = None

    @property
    def quantised(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def check(self) -> None:
        """One-line errors for options this machine or this combination cannot load."""
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("load_in_4bit and load_in_8bit exclude each other; choose one")
        if self.quantised:
            key = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
            if importlib.util.find_spec("bitsandbytes") is None:
                raise UserError(f"{key} needs the bitsandbytes package (pip install bitsandbytes)")
            if not torch.cuda.is_available():
                raise UserError(f"{key} needs a CUDA GPU (bitsandbytes quantises on the GPU); this machine has none")

    def from_pretrained_kwargs(self, torch_dtype) -> dict:
        kwargs = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.quantised:
            from transformers import BitsAndBytesConfig
            compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit,
                bnb_4bit_quant_type=self.bnb_4bit_quant_type, bnb_4bit_use_double_quant=self.use_bnb_nested_quant,
                bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=self.bnb_4bit_quant_storage)
        return kwargs


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str | None = None,
               options: LoadOptions = LoadOptions()):
    """Load a causal LM and its (fixed-up) tokenizer from a built-in name, a local directory or a Hub id.

    `dtype`: the weights' dtype (`auto`: as saved). `device` None means the best available: this process's GPU
    (LOCAL_RANK under `accelerate launch`), then mps, then cpu. Returns (model, tokenizer), the model in eval mode
    on `device` (a quantised model is placed there as it loads).
    """
    options.check()
    torch_dtype, target = resolve_dtype(dtype), resolve_device(device)
    kwargs = options.from_pretrained_kwargs(torch_dtype)
    if options.quantised:
        kwargs["device_map"] = {"": target.index or 0}
    spec = str(spec).strip()
    if spec.lower() in MODEL_NAMES:  # built-in names are case-insensitive and win over same-named folders
        name = spec.lower()
        source = embedded_dir() if name == EMBEDDED_NAME else tiny_dir(name)
        model, tokenizer = _from_pretrained(str(source), torch_dtype, {**kwargs, "revision": None})
        prepare_tokenizer(tokenizer, model, add_bos=False)  # pinned: SmolLM2's ChatML tokenizer adds no BOS
    else:
        model, tokenizer = _load_user_spec(spec, torch_dtype, kwargs)
        prepare_tokenizer(tokenizer, model)
    return (model if options.quantised else model.to(target)), tokenizer


def _load_user_spec(spec: str, torch_dtype, kwargs: dict):
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
        return _from_pretrained(str(path), torch_dtype, {**kwargs, "revision": None})
    if not _HUB_ID.match(spec):
        close = difflib.get_close_matches(spec.lower(), MODEL_NAMES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"model '{spec}': not a built-in name, a directory or a Hub id (org/name); {hint}"
                        f"{_valid_specs()}")
    try:
        return _from_pretrained(spec, torch_dtype, kwargs)
    except (OSError, ValueError) as e:  # offline, unknown repo, gated repo, not a causal LM...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        close = difflib.get_close_matches(spec, MODEL_NAMES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"model '{spec}' could not be loaded from the Hugging Face Hub ({reason}); "
                        f"{hint}{_valid_specs()}") from None


def _valid_specs() -> str:
    return f"use a built-in model ({', '.join(MODEL_NAMES)}), a local checkpoint directory or a Hub id (org/name)"


def _from_pretrained(source: str, torch_dtype, kwargs: dict):
    tokenizer = AutoTokenizer.from_pretrained(source, revision=kwargs.get("revision"),
                                              trust_remote_code=kwargs.get("trust_remote_code", False))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **dtype_kwarg(torch_dtype), **kwargs)
    except (ImportError, ValueError) as e:  # an attention implementation that is not installed or not supported
        if "attn_implementation" not in kwargs:
            raise
        raise UserError(f"model '{source}': {str(e).strip().splitlines()[0]}") from None
    return model, tokenizer


def resolve_dtype(dtype: str | torch.dtype):
    """A torch dtype (or "auto") from a torch dtype or one of the names in DTYPES."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise UserError(f"unknown dtype '{dtype}'; valid choices: {', '.join(DTYPES)}") from None


def resolve_device(device: str | None) -> torch.device:
    """`device` checked to exist here, or the best available one when None."""
    if device is None:
        if torch.cuda.is_available():  # under accelerate/torchrun each process has its own GPU
            rank = os.environ.get("LOCAL_RANK")
            return torch.device("cuda", int(rank) if rank is not None else torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{device}'; valid choices: cpu, cuda, cuda:N, mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(target.type, True):
        raise UserError(f"device '{device}' is not available on this machine; use cpu")
    return target
