"""SAP's cost over plain fine-tuning, measured in ONE process on the same batches, model and settings.

    python benchmarks/step_cost.py --model tiny-random-llama [--seq-len 128] [--batch 4] [--steps 6]

Prints a table (median step time, tokens/s, peak memory, ratios to SFT) and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import TrainerCallback

from safeprobe.data import Example, SafetyPair
from safeprobe.data.tokenize import encode, encode_pairs
from safeprobe.experiments.train import TrainConfig, build_trainer, prepare_model

MODES = {"sft": dict(method="sft"), "sap": dict(method="sap"),
         "sap_k4": dict(method="sap", safety_every=4, probe_every=4),
         "reference": dict(method="sap", sap_mode="reference")}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def synthetic_batches(tokenizer, n: int, seq_len: int):
    """Fixed examples of about seq_len tokens (half prompt, half response), identical for every mode."""
    words = "the quick brown fox jumps over a lazy dog while it rains".split()
    text = lambda k, off: " ".join(words[(i + off) % len(words)] for i in range(k))  # noqa: E731
    examples = [Example((("user", text(seq_len // 2, i)),), text(seq_len // 2, i + 3)) for i in range(n)]
    pairs = [SafetyPair((("user", text(seq_len // 2, i)),), "I can't help with that.", text(seq_len // 2, i + 5))
             for i in range(n)]
    return [encode(tokenizer, e, seq_len) for e in examples], encode_pairs(tokenizer, pairs, seq_len).features


def measure(mode: str, args) -> dict:
    cfg = TrainConfig(model=args.model, output_dir=f"{args.output_dir}/{mode}", max_steps=args.warmup + args.steps,
                      batch_size=args.batch, safety_batch_size=args.batch, lora_r=args.lora_r,
                      probe_layers=args.probe_layers, bf16=args.bf16, logging_steps=10**6, seed=0, **MODES[mode])
    torch.manual_seed(0)
    model, tokenizer = prepare_model(cfg)
    features, pairs = synthetic_batches(tokenizer, args.batch * (args.warmup + args.steps), args.seq_len)
    trainer = build_trainer(cfg, model, tokenizer, features, _out(cfg), safety=pairs)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.args.disable_tqdm = True
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step = statistics.median(timer.times[args.warmup:])
    tokens = sum(len(f["input_ids"]) for f in features[: args.batch])
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"step_s": step, "tokens_per_s": tokens / step, "peak_mb": peak}


def _out(cfg):
    from pathlib import Path
    path = Path(cfg.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random-llama")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8, help="0: full fine-tuning")
    p.add_argument("--probe-layers", default="middle")
    p.add_argument("--bf16", action="store_true", default=torch.cuda.is_available())
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--output-dir", default="runs/bench")
    args = p.parse_args()
    results = {mode: measure(mode, args) for mode in args.modes.split(",")}
    sft = results["sft"]
    print(f"{'mode':<10} {'step s':>8} {'tok/s':>9} {'peak MB':>9} {'x SFT time':>10} {'x SFT mem':>9}")
    for mode, r in results.items():
        mem = f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-"
        mem_ratio = f"{r['peak_mb'] / sft['peak_mb']:.2f}" if r["peak_mb"] else "-"
        print(f"{mode:<10} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {mem:>9} "
              f"{r['step_s'] / sft['step_s']:>10.2f} {mem_ratio:>9}")
    summary = {"model": args.model, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps,
               "device": "cuda" if torch.cuda.is_available() else "cpu", "sft_step_s": sft["step_s"]}
    for mode, r in results.items():
        if mode != "sft":
            summary[f"{mode}_step_s"] = r["step_s"]
            summary[f"ratio_{mode}_sft"] = r["step_s"] / sft["step_s"]
    if sft["peak_mb"] and "sap" in results:
        summary["peak_mem_ratio"] = results["sap"]["peak_mb"] / sft["peak_mb"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
