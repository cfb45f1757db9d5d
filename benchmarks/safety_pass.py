"""SAP step 1 with the safety pairs packed (each prompt once, under a block mask) against the padded batch.

    python benchmarks/safety_pass.py --model smollm2-135m-instruct [--data pku-saferlhf-pairs] [--pairs 2]

On the same batches of real safety pairs, in ONE process, alternating the two layouts batch by batch: median time
of s = grad_W L_safety (LoRA, train mode), tokens each layout feeds the model, and the largest difference of
L_safety between them in eval mode (no dropout: they must agree to rounding). Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from safeprobe.data import load_pairs
from safeprobe.data.tokenize import PairCollator, encode_pairs
from safeprobe.experiments.train import TrainConfig, train_config, prepare_model
from safeprobe.method.sap.safety_loss import contrastive_safety_loss
from safeprobe.method.sap.algorithm import safety_direction
from safeprobe.method.sap.shared_prompt import SharedPromptPass, layout_tokens


def batches(tokenizer, args) -> list[dict]:
    pairs = load_pairs(args.data)
    random.Random(args.seed).shuffle(pairs)
    features = encode_pairs(tokenizer, pairs[: args.pairs * args.batches], args.max_length).features
    collate = PairCollator(tokenizer)
    return [collate(features[i: i + args.pairs]) for i in range(0, len(features) - args.pairs + 1, args.pairs)]


def tokens(batch: dict) -> tuple[int, int]:
    return batch["input_ids"].numel(), layout_tokens(batch["shared_prompt"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random-llama")
    p.add_argument("--data", default="pku-saferlhf-pairs")
    p.add_argument("--pairs", type=int, default=2, help="safety pairs per batch (the trainer's default for batch 4)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer = prepare_model(train_config(model_name_or_path=args.model, output_dir="unused", method="sap"))
    params = [q for q in model.parameters() if q.requires_grad]
    data = batches(tokenizer, args)
    shared = SharedPromptPass()
    model.eval()
    with torch.no_grad():
        gap = max(abs(float(contrastive_safety_loss(model, b, logprobs=shared.logprobs)
                            - contrastive_safety_loss(model, b))) for b in data)
    model.train()
    times = {"padded": [], "packed": []}
    safety_direction(model, params, data[0])  # warm-up
    for batch in data:
        for layout, pass_ in (("padded", None), ("packed", shared)):
            start = time.perf_counter()
            safety_direction(model, params, batch, "paper", pass_)
            times[layout].append(time.perf_counter() - start)
    padded_tokens, packed_tokens = map(sum, zip(*(tokens(b) for b in data)))
    median = {layout: statistics.median(t) for layout, t in times.items()}
    print(f"{'layout':<8} {'median s':>9} {'tokens':>8}")
    print(f"{'padded':<8} {median['padded']:>9.3f} {padded_tokens:>8}")
    print(f"{'packed':<8} {median['packed']:>9.3f} {packed_tokens:>8}")
    print(json.dumps({"model": args.model, "data": args.data, "pairs": args.pairs, "batches": len(data),
                      "threads": torch.get_num_threads(), "padded_s": median["padded"], "packed_s": median["packed"],
                      "time_ratio": median["packed"] / median["padded"], "token_ratio": packed_tokens / padded_tokens,
                      "verified": shared.verified, "max_loss_gap_eval": gap}))


if __name__ == "__main__":
    main()
