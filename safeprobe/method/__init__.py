"""Fine-tuning methods, one trainer per method. Add a defense by adding one module and one registry line.

TRAINERS are the fine-tuning-stage methods (`safeprobe train`); ALIGNERS the alignment-stage ones (`safeprobe
align`), which make the aligned base that fine-tuning later starts from.
"""
from .base import SafeprobeTrainer
from .booster import BoosterTrainer
from .lisa import LisaTrainer
from .probe import Probe, resolve_layers
from .sap import SAPConfig
from .safeinstr import SafeInstrTrainer
from .sap_trainer import SAPTrainer
from .sft import SFTTrainer
from .vaccine import VaccineTrainer

TRAINERS = {"sft": SFTTrainer, "sap": SAPTrainer, "safeinstr": SafeInstrTrainer, "lisa": LisaTrainer}
ALIGNERS = {"plain": SFTTrainer, "vaccine": VaccineTrainer, "booster": BoosterTrainer}

__all__ = ["ALIGNERS", "BoosterTrainer", "LisaTrainer", "Probe", "SAPConfig", "SAPTrainer", "SFTTrainer",
           "SafeInstrTrainer", "SafeprobeTrainer", "TRAINERS", "VaccineTrainer", "resolve_layers"]
