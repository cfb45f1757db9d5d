"""How SAP's overhead over SFT scales: sequence length, number of probed layers, LoRA versus full fine-tuning.

    python benchmarks/scaling.py [--model smollm2-135m-instruct] [--batch 4] [--steps 4]

Each row is one `step_cost.py` measurement (SFT and SAP paper mode in ONE process, steps in turn, same batches),
varying one setting from the reference row (seq 128, the middle probe band, LoRA r = 8). Prints a Markdown table
for the README and, last, one JSON line with every row.
"""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

from step_cost import measure

from safeprobe.method.sap.config import default_safety_batch_size
from safeprobe.model import load_model, model_summary

REFERENCE = dict(seq_len=128, probe_layers="middle", lora_r=8)


def settings(n_layers: int) -> list[tuple[str, dict]]:
    mid = n_layers // 2
    return [("seq 128, middle layers, LoRA", {}), ("seq 256", dict(seq_len=256)), ("seq 512", dict(seq_len=512)),
            ("2 probed layers", dict(probe_layers=f"{mid - 1},{mid}")), ("all layers probed", dict(probe_layers="all")),
            ("full fine-tuning", dict(lora_r=0))]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--output-dir", default="runs/bench-scaling")
    args = p.parse_args()
    n_layers = model_summary(load_model(args.model)[0])["n_layers"]
    rows = []
    for label, change in settings(n_layers):
        run = SimpleNamespace(model=args.model, batch=args.batch, safety_pairs=default_safety_batch_size(args.batch),
                              steps=args.steps, warmup=1, bf16=False, clock="wall", modes="sft,sap",
                              output_dir=args.output_dir, **{**REFERENCE, **change})
        result = measure(run)
        rows.append({"setting": label, **{**REFERENCE, **change}, "sft_step_s": result["sft"]["step_s"],
                     "sap_step_s": result["sap"]["step_s"], "ratio": result["sap"]["step_s"] / result["sft"]["step_s"],
                     "mem_ratio": result["sap"]["peak_mb"] / result["sft"]["peak_mb"],
                     "flop_ratio": result["sap"]["gflop"] / result["sft"]["gflop"]})
        print(f"{label}: SFT {rows[-1]['sft_step_s']:.2f} s, SAP {rows[-1]['sap_step_s']:.2f} s, "
              f"{rows[-1]['ratio']:.2f}x time, {rows[-1]['mem_ratio']:.2f}x memory, {rows[-1]['flop_ratio']:.2f}x FLOPs",
              flush=True)
    print(f"\n| setting ({args.model}, batch {args.batch}) | SFT step | SAP step | SAP / SFT time | SAP / SFT memory "
          "| SAP / SFT FLOPs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['sft_step_s']:.2f} s | {r['sap_step_s']:.2f} s | {r['ratio']:.2f}x "
              f"| {r['mem_ratio']:.2f}x | {r['flop_ratio']:.2f}x |")
    print(json.dumps({"model": args.model, "batch": args.batch, "steps": args.steps, "n_layers": n_layers,
                      "rows": rows}))


if __name__ == "__main__":
    main()
