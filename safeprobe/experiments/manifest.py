"""Run manifests: config, versions, data hashes, git commit, wall time and peak memory next to every output."""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("safeprobe", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the safeprobe checkout this code runs from (None for an installed wheel): read once, when the
    process first asks (the manifest module imports), so a checkout that moves on during a long run does not
    relabel the code that ran."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_memory_mb() -> dict:
    """Peak resident memory of this process (CPU) and peak allocated GPU memory, in MB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_peak_rss_mb": round(rss_kb / 1024, 1)}
    if torch.cuda.is_available():
        out["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def manifest(config, **extra) -> dict:
    """`config` as its YAML keys (`to_dict`), or its fields; the versions, commit and peak memory; then `extra`."""
    if hasattr(config, "to_dict"):
        cfg = config.to_dict()
    else:
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {"config": cfg, "versions": versions(), "git_commit": git_commit(), **peak_memory_mb(), **extra}


git_commit()  # now: the code this process loaded
