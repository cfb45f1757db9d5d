"""SAPConfig: every setting of an SAP run, TRL's SFTConfig plus SAP's knobs."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import SafeprobeConfig, _help, check_choice, check_minimum
from .probe import parse_layers

EPS_MODES = ("relative", "absolute")
SAFETY_LOSSES = ("paper", "dpo")
MODES = ("paper", "reference")


def default_safety_batch_size(task_batch_size: int) -> int:
    """Safety pairs per step when none is given: as many safety sequences (a safe and a harmful answer per pair) as
    task examples, so that step 1 costs about one task batch."""
    return max(1, task_batch_size // 2)


@dataclass
class SAPConfig(SafeprobeConfig):
    """Every setting of an SAP run: `trl.SFTConfig`'s (see `SafeprobeConfig` for the defaults changed) plus SAP's."""

    eps: float = _help("size of the harmful perturbation dW (relative: a fraction of ||W_trainable||)", 0.01)
    eps_mode: str = _help("relative (eps * ||W_trainable||, the authors' code) or absolute (eps)", "relative")
    beta: float = _help("probe ascent step: V_safe = beta * g_V (paper default 0.05)", 0.05)
    probe_layers: str = _help("probed decoder layers: middle (the paper's 11..20 of 32, scaled), all, '3,9', "
                              "'10:20' or '0.3:0.6'", "middle")
    probe_norm: float | None = _help("rescale V_safe to this global L2 norm instead of beta * |g_V|")
    safety_loss: str = _help("paper (L(safe) - L(harmful), mean losses) or dpo (the authors' -logsigmoid margin)",
                             "paper")
    safety_every: int = _help("recompute the safety direction s every K steps, reuse it in between", 1)
    probe_every: int = _help("recompute V_safe every K steps, reuse it in between (amortised SAP)", 1)
    mode: str = _help("paper (Algorithm 1) or reference (the authors' lagged-probe schedule)", "paper")
    probe_lr: float = _help("reference mode only: AdamW learning rate of the probe", 0.05)
    safety_batch_size: int | None = _help("safety pairs per step (None: half the task batch, as many safety sequences "
                                          "as task examples; a larger batch runs in chunks of the task batch)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("eps", "beta", "probe_lr"):
            check_minimum(self, name, 0)
        for name in ("safety_every", "probe_every"):
            check_minimum(self, name, 1)
        for name, valid in (("eps_mode", EPS_MODES), ("safety_loss", SAFETY_LOSSES), ("mode", MODES)):
            check_choice(self, name, valid)
        if self.probe_norm is not None:
            check_minimum(self, "probe_norm", 0)
        if self.safety_batch_size is None:  # resolved here, so that the saved arguments record what the run used
            self.safety_batch_size = default_safety_batch_size(self.per_device_train_batch_size)
        check_minimum(self, "safety_batch_size", 1)
        parse_layers(self.probe_layers)  # the syntax now; the indices against the model's depth once it loads
