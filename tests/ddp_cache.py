"""Helper script for test_ddp.py: every process of a 2-process launch asks for a tiny model not built yet."""
import torch.distributed as dist

from safeprobe.model import load_model

dist.init_process_group("gloo")  # as under `accelerate launch`, before the model is loaded
model, _ = load_model("tiny-random-llama")  # transformers saves on rank 0 only: a rank's own build holds no weights
print("LOADED", dist.get_rank(), sum(p.numel() for p in model.parameters()), flush=True)
dist.destroy_process_group()
