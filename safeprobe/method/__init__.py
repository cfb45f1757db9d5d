"""Fine-tuning methods, one trainer per method. Add a defense by adding one module and one registry line.

TRAINERS are the fine-tuning-stage methods (`safeprobe train`); ALIGNERS the alignment-stage ones (`safeprobe
align`), which make the aligned base that fine-tuning later starts from.
"""
from .base import SafeprobeTrainer
from .booster import BoosterTrainer
from .config import SafeprobeConfig
from .lisa import LisaConfig, LisaTrainer
from .probe import Probe, resolve_layers
from .sap import SAPConfig
from .safeinstr import SafeInstrTrainer
from .sap_trainer import SAPTrainer
from .vaccine import VaccineTrainer

# plain fine-tuning (sft, plain) is SafeprobeTrainer itself: TRL's SFTTrainer with the fault guard and step log
TRAINERS = {"sft": SafeprobeTrainer, "sap": SAPTrainer, "safeinstr": SafeInstrTrainer, "lisa": LisaTrainer}
ALIGNERS = {"plain": SafeprobeTrainer, "vaccine": VaccineTrainer, "booster": BoosterTrainer}

__all__ = ["ALIGNERS", "BoosterTrainer", "LisaConfig", "LisaTrainer", "Probe", "SAPConfig", "SAPTrainer",
           "SafeInstrTrainer", "SafeprobeConfig", "SafeprobeTrainer", "TRAINERS", "VaccineTrainer", "resolve_layers"]
