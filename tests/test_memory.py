"""Freed CPU memory stays in the process (glibc): a step's large buffers are not page-faulted in again each step."""
import os
import platform
import subprocess
import sys

STEPS = '''
import resource, torch
import torch.nn.functional as F
from safeprobe.memory import keep_freed_memory
kept = keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
hidden = torch.randn(135, 64, requires_grad=True)
head = torch.randn(49152, 64)  # a vocabulary head: its logits and their gradient are 27 MB each
targets = torch.randint(0, 49152, (135,))
step = lambda: F.cross_entropy(hidden @ head.T, targets).backward()
for _ in range(20):  # malloc's heap settles
    step()
before = faults()
for _ in range(10):
    step()
print(kept, faults() - before)
'''


def page_faults(keep: str) -> tuple[bool, int]:
    """(whether malloc was set, page faults in 10 steps) in a fresh process."""
    env = {**os.environ, "SAFEPROBE_KEEP_FREED_MEMORY": keep}
    kept, faults = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()
    return kept == "True", int(faults)


def test_kept_memory_spares_the_page_faults_of_every_step_and_can_be_turned_off():
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    kept, kept_faults = page_faults("1")
    default, default_faults = page_faults("0")
    print(f"page faults in 10 steps: {kept_faults} kept, {default_faults} with glibc's defaults")
    assert kept is glibc and default is False  # elsewhere than glibc nothing is changed
    if glibc:
        assert default_faults > 3000 and kept_faults < default_faults / 10
