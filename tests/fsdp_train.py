"""Helper script for test_fsdp.py: one small training run, on 1 process, or on 2 (gloo) with DDP or FSDP2.

    fsdp_train.py OUT METHOD {one,ddp,fsdp} {lora,full} [--resume]

accelerate turns FSDP on only on accelerators (GPUs and the like); on a CPU it runs the same launch as DDP. So that
its real FSDP2 preparation (`fully_shard` on every decoder layer and on the whole model, the shards as DTensors,
the full state dict gathered for saving) runs over gloo here, the accelerator state is set to FSDP after
accelerate has set up the processes: everything from there on is the code a GPU run executes.
"""
import os
import sys

import accelerate.state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
        self.distributed_type = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

from safeprobe.experiments.train import run_train, train_config  # noqa: E402

out, method, launch, weights = sys.argv[1:5]
ranks = 1 if launch == "one" else 2
fsdp = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2}) if launch == "fsdp" else {}
knobs = dict(eps=0.05, beta=1.0, safety_batch_size=4) if method == "sap" else {}
knobs.update(lisa_align_steps=2, lisa_task_steps=2) if method == "lisa" else None
# the same global batch of 4 on 1 or 2 processes; 4 steps, a checkpoint at step 2 (the resume test's point)
run_train(train_config(method=method, model_name_or_path="tiny-random-llama", dataset_name="sst2", n=24, n_safety=8,
                       max_steps=4, save_steps=2, per_device_train_batch_size=4 // ranks, max_length=96,
                       use_peft=weights == "lora", lora_dropout=0.0, learning_rate=1e-2, output_dir=out,
                       logging_steps=1, seed=3, resume="--resume" in sys.argv, **knobs, **fsdp))
