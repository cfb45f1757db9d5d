"""Fine-tuning methods, one trainer per method. Add a defense by adding one module that ends with its
`register(Method(...))` line (see `registry`): fine-tuning-stage methods run in `safeprobe train`, alignment-stage
ones in `safeprobe align`, which makes the aligned base that fine-tuning later starts from.
"""
# in the order the methods are listed (registration order): sft, sap, safeinstr, lisa; plain, vaccine, booster
from .base import SafeprobeTrainer  # noqa: I001
from .sap import SAPConfig, SAPTrainer
from .safeinstr import SafeInstrTrainer
from .lisa import LisaConfig, LisaTrainer
from .vaccine import VaccineConfig, VaccineTrainer
from .booster import BoosterConfig, BoosterTrainer
from .config import SafeprobeConfig
from .sap.probe import Probe, resolve_layers
from .registry import ALIGN, TRAIN, DataRole, Method, Series, get_method, methods, register

__all__ = ["ALIGN", "BoosterConfig", "BoosterTrainer", "DataRole", "LisaConfig", "LisaTrainer", "Method", "Probe", "SAPConfig",
           "SAPTrainer", "SafeInstrTrainer", "SafeprobeConfig", "SafeprobeTrainer", "Series", "TRAIN", "VaccineConfig",
           "VaccineTrainer",
           "get_method", "methods", "register", "resolve_layers"]
