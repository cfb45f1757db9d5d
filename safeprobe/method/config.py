"""`SafeprobeConfig`: TRL's `SFTConfig` with the settings every safeprobe method shares; each method's config
(`SAPConfig`, `LisaConfig`, ...) extends it with its own knobs, so one object holds every setting of a run."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from ..errors import UserError


def _help(text: str, default=None, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class SafeprobeConfig(SFTConfig):
    """`trl.SFTConfig` plus the fault guard, with two defaults changed:

    - `bf16`: None means bf16 where the GPU supports it, else fp32 (TRL's None means bf16 everywhere, which fails
      on a machine without a GPU, and on a CPU bf16 autocast also changes the numerics of every method).
    - `gradient_checkpointing`: off (TRL: on), chosen by measurement (docs/performance.md). It lowers the peak
      memory and costs time, and SAP pays more than SFT: two of its fast paths (the lower layers shared between its
      clean probe pass and its step 5, and the dropout masks replayed across its passes) reuse activations that
      checkpointing would recompute, so they switch off under it (the run manifest records which fast paths were
      on), and each of SAP's passes recomputes its forward. Turn it on for models whose activations do not fit.
    """

    bf16: bool | None = _help("bf16 mixed precision (None: where the GPU supports it, else fp32)")
    gradient_checkpointing: bool | None = _help("recompute activations in the backward pass to save memory (off by "
                                                "default: see SafeprobeConfig)")
    max_bad_steps: int = _help("stop after this many steps in a row with a non-finite loss or gradient (each such "
                               "step is skipped)", 5)

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()
        if self.max_bad_steps < 1:
            raise UserError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")


def check_choice(config, name: str, valid) -> None:
    """One-line error for a field outside its choices (YAML values are not checked against argparse choices)."""
    if getattr(config, name) not in valid:
        raise UserError(f"{name} '{getattr(config, name)}' unknown; valid choices: {', '.join(valid)}")


def check_minimum(config, name: str, low) -> None:
    if getattr(config, name) < low:
        raise UserError(f"{name} must be >= {low}, got {getattr(config, name)}")
