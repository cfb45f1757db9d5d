"""Fine-tuning methods, one trainer per method. Add a defense by adding one module and one registry line."""
from .base import SafeprobeTrainer
from .lisa import LisaTrainer
from .probe import Probe, resolve_layers
from .sap import SAPConfig
from .safeinstr import SafeInstrTrainer
from .sap_trainer import SAPTrainer
from .sft import SFTTrainer

TRAINERS = {"sft": SFTTrainer, "sap": SAPTrainer, "safeinstr": SafeInstrTrainer, "lisa": LisaTrainer}

__all__ = ["LisaTrainer", "Probe", "SAPConfig", "SAPTrainer", "SFTTrainer", "SafeInstrTrainer", "SafeprobeTrainer",
           "TRAINERS", "resolve_layers"]
