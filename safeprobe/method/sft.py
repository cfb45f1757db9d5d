"""Plain supervised fine-tuning: the baseline every result is reported against."""
from .base import SafeprobeTrainer


class SFTTrainer(SafeprobeTrainer):
    """LoRA or full fine-tuning on the response tokens; nothing else."""

    method_name = "sft"
