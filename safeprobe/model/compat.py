"""Small differences between the transformers versions we support (>= 4.46)."""
from __future__ import annotations

import functools
import inspect

import transformers
from packaging.version import Version

from .layers import base_model

# `dtype=` replaced `torch_dtype=` in from_pretrained / from_config in transformers 4.56.
_DTYPE_KEY = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def dtype_kwarg(dtype) -> dict:
    """`{"dtype": dtype}` or, on older transformers, `{"torch_dtype": dtype}`."""
    return {_DTYPE_KEY: dtype}


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward_class: type) -> str:
    parameters = inspect.signature(forward_class.forward).parameters
    # a forward that takes only **kwargs: the older name, still accepted (deprecated) where it was renamed
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwarg(model) -> str:
    """The keyword a model's forward takes its KV cache under: `cache` (newer transformers) or `past_key_values`.

    Asked of the transformers model itself, through DDP and PEFT wrappers (whose forwards take **kwargs)."""
    return _cache_keyword(type(base_model(getattr(model, "module", model))))
