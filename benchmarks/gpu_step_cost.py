"""SAP's cost over SFT at the shapes of real models: randomly initialised weights of a real architecture's config
(nothing to download), so time, memory and FLOPs are those of the real model.

    python benchmarks/gpu_step_cost.py --shape llama-3.1-8b [--seq-len 1024] [--batch 4] [--steps 8]
        [--variants plain,gc,qlora]

Each variant is one `step_cost.py` measurement (every mode in ONE process, steps in turn, same batches), with
bf16 weights and compute on a GPU and LoRA r = 16 on every linear layer:
- plain: SFT, SAP paper mode, amortised SAP (k = 4);
- gc: SFT and SAP with activation checkpointing;
- qlora: SFT and SAP on 4-bit base weights (bitsandbytes, CUDA only), with checkpointing.
Model FLOPs utilisation is the counted FLOPs per step over the step time and the device's dense bf16 peak (none
on a CPU). The `tiny` shape runs anywhere (the tests run it on a CPU). Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from types import SimpleNamespace

import torch
from step_cost import measure
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from safeprobe.method.sap.config import default_safety_batch_size
from safeprobe.model.cache import cached_model_dir
from safeprobe.model.compat import dtype_kwarg
from safeprobe.model.embedded import embedded_dir
from safeprobe.model.tokenizer import prepare_tokenizer

# Public configs of the real models (the fields that set shape and cost); vocabularies as the real ones.
SHAPES = {
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   rope_theta=500000.0, tie_word_embeddings=True)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 rope_theta=1000000.0, tie_word_embeddings=False)),
}
VARIANTS = {"plain": "sft,sap,sap_k4", "gc": "sft_gc,sap_gc", "qlora": "sft_qlora,sap_qlora"}
# Dense bf16 peak FLOP/s by device name (vendor datasheets, SXM parts): the denominator of MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12}


def shape_dir(shape: str):
    """A cached checkpoint of `shape`: seeded random weights in bf16, the SmolLM2 tokenizer (its ids fit every
    vocabulary here)."""
    model_type, overrides = SHAPES[shape]

    def build(out):
        tokenizer = AutoTokenizer.from_pretrained(embedded_dir())
        config = AutoConfig.for_model(model_type, max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **overrides)
        with torch.random.fork_rng(devices=[]), torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(torch.bfloat16))
        prepare_tokenizer(tokenizer, model, add_bos=False)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return cached_model_dir(f"random-{shape}", build, 1)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def skipped(variant: str) -> str | None:
    """Why a variant cannot run on this machine, or None."""
    if variant == "qlora" and not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")):
        return "needs a CUDA GPU and bitsandbytes"
    return None


def run_variant(variant: str, args, model_dir) -> dict:
    gpu = torch.cuda.is_available()
    run = SimpleNamespace(model=str(model_dir), seq_len=args.seq_len, batch=args.batch, steps=args.steps,
                          warmup=args.warmup, lora_r=args.lora_r, lora_target_modules="all-linear",
                          probe_layers="middle", bf16=gpu, dtype="bfloat16" if gpu else "float32", threads=None,
                          clock="wall", modes=VARIANTS[variant], output_dir=f"{args.output_dir}/{variant}",
                          safety_pairs=default_safety_batch_size(args.batch))
    return measure(run)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode (a multiple of 4)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--variants", default="plain,gc,qlora", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--output-dir", default="runs/bench-gpu")
    args = p.parse_args()
    variants = args.variants.split(",")
    if any(v not in VARIANTS for v in variants) or args.steps % 4 or args.steps < 4:
        p.error(f"--variants from {', '.join(VARIANTS)}; --steps a positive multiple of 4")
    model_dir, peak = shape_dir(args.shape), peak_flops()
    rows, notes = {}, {}
    for variant in variants:
        reason = skipped(variant)
        if reason:
            notes[variant] = f"skipped: {reason}"
            continue
        rows.update(run_variant(variant, args, model_dir))
    sft = rows.get("sft")
    print(f"{'mode':<10} {'step s':>8} {'tok/s':>9} {'peak MB':>10} {'GFLOP':>10} {'MFU':>6} {'x SFT time':>10} "
          f"{'x SFT FLOP':>10}")
    for mode, r in rows.items():
        r["mfu"] = r["gflop"] * 1e9 / r["step_s"] / peak if peak else None
        base = rows.get(mode.replace("sap_k4", "sft").replace("sap", "sft")) or sft  # same variant's SFT
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.0%}"
        print(f"{mode:<10} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {r['peak_mb']:>10.1f} {r['gflop']:>10.1f} "
              f"{mfu:>6} {r['step_s'] / base['step_s']:>10.2f} {r['gflop'] / base['gflop']:>10.2f}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"shape": args.shape, "device": device, "seq_len": args.seq_len, "batch": args.batch,
                      "lora_r": args.lora_r, "steps": args.steps, "modes": rows, **notes}))


if __name__ == "__main__":
    main()
