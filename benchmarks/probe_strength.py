"""How strongly does a SAP probe of a given size change the training step? A tuning aid on training data only.

    python benchmarks/probe_strength.py --model MODEL --task sst2 --poison-ratio 0.1 [--norms 0.1,0.3,1,3,10]

To first order SAP's step is the SFT step plus a descent step on the safety loss (method/sap/algorithm.py), and its size grows with
the probe's norm |V_safe| = beta * |g_V|. This script measures, on a few task batches and safety batches drawn as
SAP would draw them (fresh LoRA, no optimiser step), for probes of fixed norms along g_V:

- hidden: the mean per-token norm of the hidden states at the probed layers (the scale the probe is added to);
- |g_V|: so that a norm c corresponds to beta = c / |g_V|;
- drift: <g_0, s_hat> / |g_0|, the SFT gradient's component along the harmful direction s (negative: a descent
  step makes harmful answers likelier);
- change: |g_V(c) - g_0| / |g_0|, how much of the step the probe rewrites;
- cancel: <g_V(c) - g_0, s_hat> / |<g_0, s_hat>|, the probe's push away from harm in units of SFT's drift
  toward it (1: the step no longer moves along s to first order).

A probe that cancels the drift several times over while rewriting well under all of the step is a reasonable
starting point for a validation sweep (`configs/tune-sap.yaml`). Prints a table per batch and, last, one JSON
line with the medians over batches.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import set_seed

from safeprobe.data.tokenize import PairCollator, collator, encode_all
from safeprobe.experiments import method_data
from safeprobe.experiments.train import TrainConfig, train_config, prepare_model, task_examples
from safeprobe.method import get_method
from safeprobe.method.losses import response_loss
from safeprobe.method.sap.probe import Probe
from safeprobe.method.weights import global_norm
from safeprobe.method.sap.algorithm import perturbation, probe_gradient, safety_direction
from safeprobe.model.layers import decoder_layers


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="sst2")
    p.add_argument("--safety-data", default="pku-saferlhf-pairs")
    p.add_argument("--poison-ratio", type=float, default=0.1)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--safety-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--probe-layers", default="middle")
    p.add_argument("--norms", default="0.1,0.3,1,3,10")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def dot(a: list, b: list) -> float:
    return float(sum((x.float() * y.float()).sum() for x, y in zip(a, b)))


def weight_gradient(model, probe, params, batch, V=None) -> list:
    with probe.active(V):
        return [g.float() for g in torch.autograd.grad(response_loss(model, batch), params)]


@torch.no_grad()
def hidden_norms(model, layers: list[int], batch: dict) -> list[float]:
    """Mean per-token L2 norm of the hidden states leaving each probed layer (padding included)."""
    norms, blocks = [], decoder_layers(model)
    hooks = [blocks[i].register_forward_hook(
        lambda m, a, out: norms.append(float((out[0] if isinstance(out, tuple) else out).norm(dim=-1).mean())))
        for i in layers]
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    return norms


def measure(model, probe, params, batch, pairs, eps: float, norms: list[float]) -> dict:
    s, _ = safety_direction(model, params, pairs)
    delta, _ = perturbation(params, s, eps, "relative")
    g_V, _, _ = probe_gradient(model, probe, params, delta, batch)
    g_V_norm, s_norm = float(global_norm(g_V)), float(global_norm(s))
    g0 = weight_gradient(model, probe, params, batch)
    g0_norm, drift = float(global_norm(g0)), dot(g0, s) / s_norm
    row = {"g_V": g_V_norm, "drift": drift / g0_norm, "change": {}, "cancel": {}}
    for c in norms:
        g = weight_gradient(model, probe, params, batch, [v * (c / g_V_norm) for v in g_V])
        diff = [a - b for a, b in zip(g, g0)]
        row["change"][c] = float(global_norm(diff)) / g0_norm
        row["cancel"][c] = dot(diff, s) / s_norm / abs(drift)
    return row


def main():
    args = parse_args()
    set_seed(args.seed)  # python, numpy and torch
    norms = [float(x) for x in args.norms.split(",")]
    cfg = train_config(method="sap", model_name_or_path=args.model, dataset_name=args.task, safety_data=args.safety_data, n=args.n,
                      poison_ratio=args.poison_ratio, per_device_train_batch_size=args.batch, max_length=args.max_length,
                      n_safety=args.batches * args.safety_batch, eps=args.eps, probe_layers=args.probe_layers,
                      lora_dropout=0.0, seed=args.seed)
    model, tokenizer = prepare_model(cfg)
    examples, _ = task_examples(cfg)
    features = encode_all(tokenizer, examples, cfg.max_length).features
    pairs = method_data.features(get_method("sap"), cfg, tokenizer)["safety_dataset"]
    params = [p for p in model.parameters() if p.requires_grad]
    probe = Probe(model, cfg.value("probe_layers"))
    task_batch, pair_batch = collator(tokenizer), PairCollator(tokenizer)
    first = task_batch(features[:args.batch])
    hidden = hidden_norms(model, probe.layers, first)
    print(f"probed layers {probe.layers}; mean hidden-state norm there {statistics.mean(hidden):.1f} "
          f"(min {min(hidden):.1f}, max {max(hidden):.1f})")
    rows = []
    for b in range(args.batches):
        batch = task_batch(features[b * args.batch:(b + 1) * args.batch])
        safety = pair_batch(pairs[b * args.safety_batch:(b + 1) * args.safety_batch])
        row = measure(model, probe, params, batch, safety, args.eps, norms)
        rows.append(row)
        print(f"batch {b}: |g_V| {row['g_V']:.4f}  drift cos(g_0, s) {row['drift']:+.4f}")
        for c in norms:
            print(f"  |V| {c:<6g} beta ~ {c / row['g_V']:<8.3g} change {row['change'][c]:.3f}  "
                  f"cancel {row['cancel'][c]:+.2f}")
    median = statistics.median
    print(json.dumps({"hidden_norm": statistics.mean(hidden), "g_V": median(r["g_V"] for r in rows),
                      "drift": median(r["drift"] for r in rows),
                      "change": {c: median(r["change"][c] for r in rows) for c in norms},
                      "cancel": {c: median(r["cancel"][c] for r in rows) for c in norms}}))


if __name__ == "__main__":
    main()
