"""safeprobe: fine-tune LLMs with LoRA without losing their safety alignment (Safety-Aware Probing, SAP)."""

__version__ = "0.1.0"
