"""`load_model(spec)`: the one entry point that turns a model spec into (model, tokenizer).

A spec is, in this order: a built-in name (MODEL_NAMES), an existing local checkpoint directory, or a
Hugging Face Hub id. Built-in models are converted / built once into `home_dir()/models/<name>/` and then
loaded from there like any local checkpoint.
"""
from __future__ import annotations

import difflib
import re
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


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str | None = None):
    """Load a causal LM and its (fixed-up) tokenizer from a built-in name, a local directory or a Hub id.

    `device` None means the best available: cuda, then mps, then cpu. Returns (model, tokenizer), the
    model in eval mode on `device`.
    """
    torch_dtype, target = resolve_dtype(dtype), resolve_device(device)
    spec = str(spec).strip()
    if spec.lower() in MODEL_NAMES:  # built-in names are case-insensitive and win over same-named folders
        name = spec.lower()
        source = embedded_dir() if name == EMBEDDED_NAME else tiny_dir(name)
        model, tokenizer = _from_pretrained(str(source), torch_dtype)
        prepare_tokenizer(tokenizer, model, add_bos=False)  # pinned: SmolLM2's ChatML tokenizer adds no BOS
    else:
        model, tokenizer = _load_user_spec(spec, torch_dtype)
        prepare_tokenizer(tokenizer, model)
    return model.to(target), tokenizer


def _load_user_spec(spec: str, torch_dtype):
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
        return _from_pretrained(str(path), torch_dtype)
    if not _HUB_ID.match(spec):
        close = difflib.get_close_matches(spec.lower(), MODEL_NAMES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"model '{spec}': not a built-in name, a directory or a Hub id (org/name); {hint}"
                        f"{_valid_specs()}")
    try:
        return _from_pretrained(spec, torch_dtype)
    except (OSError, ValueError) as e:  # offline, unknown repo, gated repo, not a causal LM...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        close = difflib.get_close_matches(spec, MODEL_NAMES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"model '{spec}' could not be loaded from the Hugging Face Hub ({reason}); "
                        f"{hint}{_valid_specs()}") from None


def _valid_specs() -> str:
    return f"use a built-in model ({', '.join(MODEL_NAMES)}), a local checkpoint directory or a Hub id (org/name)"


def _from_pretrained(source: str, torch_dtype):
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, **dtype_kwarg(torch_dtype))
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
        if torch.cuda.is_available():
            return torch.device("cuda")
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
