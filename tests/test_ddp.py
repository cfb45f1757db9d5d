"""DDP (2 CPU processes, gloo) reaches the same SAP adapter as 1 process with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_train.py")
# Relative L2 difference of the adapters. Not bit-exact: the gradients are reduced in another order, and AdamW
# amplifies that noise on coordinates whose gradient is near zero.
TOLERANCE = 1e-4


def run(args, tmp_path, name):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_two_process_ddp_matches_one_process(tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert "WORLD 1" in run([str(SCRIPT), str(one), "4"], tmp_path, "one")
    stdout = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), str(two), "2"],
                 tmp_path, "two")
    assert "WORLD 2" in stdout
    a = load_file(str(one / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    norm = lambda tensors: float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))  # noqa: E731
    diff = norm([a[k] - b[k] for k in a]) / norm(a.values())
    print(f"|DDP - single| / |single| = {diff:.2e}")
    assert diff < TOLERANCE, diff
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3  # the adapter did train


def test_a_model_first_built_under_a_two_process_launch_is_complete_on_every_rank(tmp_path):
    env = {**os.environ, "SAFEPROBE_HOME": str(tmp_path / "home")}  # nothing cached yet
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(SCRIPT.with_name("ddp_cache.py"))], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = [line.split() for line in out.stdout.splitlines() if line.startswith("LOADED")]
    assert sorted(rank for _, rank, _ in loaded) == ["0", "1"] and len({n for _, _, n in loaded}) == 1
