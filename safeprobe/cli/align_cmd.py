"""`safeprobe align`: make (or find in the cache) an aligned base model; the last line printed is its directory."""
from __future__ import annotations


def align_config():
    from ..experiments.align import AlignConfig
    return AlignConfig


def run_align_command(cfg, console) -> None:
    from ..experiments.align import run_align
    info = run_align(cfg)
    if info["reused"]:
        console.print(f"[green]reused[/green]: {cfg.method} alignment of {cfg.model_name_or_path} with these settings")
    else:
        console.print(f"[green]done[/green]: {cfg.method} alignment, {info['global_steps']} steps, train loss "
                      f"{info['train_loss']:.4f}, {info['wall_time_s']} s (self-answers {info['generation_s']} s)")
    print(info["output_dir"])  # plain print: a long path is never wrapped, so `| tail -1` gives it whole
