"""Small differences between the transformers versions we support (>= 4.46)."""
from __future__ import annotations

import transformers
from packaging.version import Version

# `dtype=` replaced `torch_dtype=` in from_pretrained / from_config in transformers 4.56.
_DTYPE_KEY = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def dtype_kwarg(dtype) -> dict:
    """`{"dtype": dtype}` or, on older transformers, `{"torch_dtype": dtype}`."""
    return {_DTYPE_KEY: dtype}
