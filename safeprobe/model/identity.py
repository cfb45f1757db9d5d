"""Which base model an adapter was trained on: recorded with every adapter, checked wherever one is loaded.

An adapter's module names and shapes fit every base of the same architecture and size, so PEFT applies it to the
wrong base (another checkpoint, or the same one re-aligned or edited since) without a word, and every figure
computed from that is wrong. The record (`base_model.json` in the adapter folder, `base_model` in run.json) names
the base and fingerprints it:

- `config_sha256`: the architecture's config, without the fields that name a path, a dtype or a version;
- `weights_sha256`: every base parameter's name, shape and up to `SAMPLES` evenly spaced values, exactly as
  loaded. It changes when any sampled weight changes, and costs one small gather per tensor to recompute;
- `weights_signature`: the same samples projected on fixed random signs, one pair of numbers per tensor, which lets
  a base loaded in another precision (bf16 weights of an fp32 checkpoint) be compared within that precision's
  rounding error (so less finely than in the same precision, where the hash decides).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

RECORD_FILE = "base_model.json"
SAMPLES = 4096  # values sampled per tensor
_UNSTABLE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "torch_dtype", "dtype", "transformers_version",
                         "quantization_config", "_commit_hash", "_attn_implementation_autoset", "use_cache"}


def base_identity(model, spec: str) -> dict:
    """The record of `model` (a plain model, before adapters) loaded from `spec`."""
    samples = _samples(model)
    digest = hashlib.sha256()
    for name, values in samples.items():
        digest.update(f"{name}:{tuple(values.shape)}:{values.dtype}".encode())
        digest.update(values.contiguous().view(torch.uint8).numpy().tobytes())
    return {"spec": str(spec), "name_or_path": str(getattr(model, "name_or_path", "") or ""),
            "model_type": model.config.model_type, "config_sha256": config_sha256(model.config),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "weights_sha256": digest.hexdigest(),
            "weights_signature": {name: _signature(values) for name, values in samples.items()}}


def config_sha256(config) -> str:
    values = {k: v for k, v in config.to_dict().items() if k not in _UNSTABLE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _samples(model) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            k = min(SAMPLES, flat.numel())  # evenly spaced, in integers (a float32 linspace overshoots past 2^24)
            index = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            out[name] = flat[index].cpu()
    return out


def _signature(values: torch.Tensor) -> list[float]:
    """(projection on fixed random +-1 signs, norm) of one tensor's samples, in float64."""
    v = values.double()
    signs = torch.randint(0, 2, (v.numel(),), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    return [float((v * signs).sum()), float(v.norm())]


def write_record(folder: str | Path, identity: dict) -> None:
    from ..io import write_json
    write_json(Path(folder) / RECORD_FILE, identity)


def read_record(adapter: str | Path) -> dict | None:
    path = Path(adapter) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable base-model record ({e})") from None


def check_base(model, spec: str, adapter: str | Path, allow_mismatch: bool = False) -> dict:
    """Compare `model` (the base about to receive `adapter`) with the base the adapter was trained on.

    Returns {"status": "match" | "unchecked" | "mismatch-allowed", ...}; a mismatch raises a one-line UserError
    naming both bases unless `allow_mismatch`.
    """
    recorded = read_record(adapter)
    if recorded is None:
        log.warning("adapter '%s' has no %s (trained elsewhere): its base model could not be checked against '%s'",
                    adapter, RECORD_FILE, spec)
        return {"status": "unchecked", "reason": f"no {RECORD_FILE} in the adapter folder"}
    current = base_identity(model, spec)
    reason = mismatch(recorded, current)
    if reason is None:
        return {"status": "match", "trained_on": recorded["spec"]}
    message = (f"adapter '{adapter}' was trained on base '{recorded['spec']}' ({recorded.get('name_or_path')}), "
               f"not on '{spec}' ({current['name_or_path']}): {reason}")
    if not allow_mismatch:
        raise UserError(message + "; load it onto its own base, or pass --allow-base-mismatch to apply it anyway")
    log.warning("%s (allowed by --allow-base-mismatch)", message)
    return {"status": "mismatch-allowed", "trained_on": recorded["spec"], "reason": reason}


def mismatch(recorded: dict, current: dict) -> str | None:
    """Why two base records are different models, or None when they are the same."""
    if recorded.get("config_sha256") != current["config_sha256"]:
        return f"its config differs ({recorded.get('model_type')} vs {current['model_type']})"
    if recorded.get("dtype") == current["dtype"]:
        same = recorded.get("weights_sha256") == current["weights_sha256"]
    else:  # another precision of the same checkpoint rounds each weight: compare within that rounding
        same = _close(recorded.get("weights_signature") or {}, current["weights_signature"],
                      _rounding(recorded.get("dtype"), current["dtype"]))
    return None if same else "same architecture, different weights (another checkpoint, or re-aligned or edited)"


def _rounding(*dtypes: str | None) -> float:
    eps = [torch.finfo(getattr(torch, d)).eps for d in dtypes if d and hasattr(torch, d)]
    return max(eps, default=1e-2)


def _close(recorded: dict, current: dict, eps: float) -> bool:
    """Every tensor's projection agrees within the rounding of its samples.

    Rounding moves each value by at most eps/2 of itself, independently of the random signs, so the projection
    moves by a sum with standard deviation <= eps/2 * norm / sqrt(3); the tolerance is 8 of those. A weight change
    smaller than about twice the precision's eps is therefore not seen across precisions (it is within one).
    """
    if recorded.keys() != current.keys():
        return False
    for name, (projection, norm) in current.items():
        other_projection, other_norm = recorded[name]
        if abs(projection - other_projection) > 8 * eps / 2 / math.sqrt(3) * max(norm, other_norm):
            return False
    return True
