"""Helper script for test_ddp.py: one small SAP run (launched by accelerate with 1 or 2 processes)."""
import sys

from safeprobe.experiments.train import TrainConfig, train_config, run_train

out, per_device_batch = sys.argv[1], int(sys.argv[2])  # same global batch: 1 x 4 or 2 x 2
run_train(train_config(method="sap", model_name_or_path="tiny-random-llama", dataset_name="sst2", n=24, n_safety=8, max_steps=3,
                      per_device_train_batch_size=per_device_batch, safety_batch_size=4, max_length=96, lora_dropout=0.0,
                      eps=0.05, beta=1.0, learning_rate=1e-2, output_dir=out, logging_steps=1, seed=3))
import torch.distributed as dist  # noqa: E402
if not dist.is_initialized() or dist.get_rank() == 0:  # one line only: ranks' prints interleave
    print("WORLD", dist.get_world_size() if dist.is_initialized() else 1, flush=True)
