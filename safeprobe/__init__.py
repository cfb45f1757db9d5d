"""safeprobe: fine-tune LLMs with LoRA without losing their safety alignment (Safety-Aware Probing, SAP).

    from safeprobe import SAPConfig, SAPTrainer   # TRL's SFTConfig / SFTTrainer, plus SAP

The trainers and configs load on first use, so that the command line starts without importing TRL.
"""
import importlib
import os

__version__ = "0.1.0"

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL reports each trainer's construction to the Hub

_EXPORTS = {name: "safeprobe.method" for name in (
    "SAPConfig", "SAPTrainer", "LisaConfig", "LisaTrainer", "SafeInstrTrainer", "SafeprobeConfig", "SafeprobeTrainer",
    "VaccineConfig", "VaccineTrainer", "BoosterConfig", "BoosterTrainer")}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'safeprobe' has no attribute '{name}'")
