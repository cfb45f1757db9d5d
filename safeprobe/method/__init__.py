"""Fine-tuning methods, one trainer per method. Add a defense by adding one module and one registry line."""
from .base import SafeprobeTrainer
from .probe import Probe, resolve_layers
from .sap import SAPConfig
from .sap_trainer import SAPTrainer
from .sft import SFTTrainer

TRAINERS = {"sft": SFTTrainer, "sap": SAPTrainer}

__all__ = ["Probe", "SAPConfig", "SAPTrainer", "SFTTrainer", "SafeprobeTrainer", "TRAINERS", "resolve_layers"]
