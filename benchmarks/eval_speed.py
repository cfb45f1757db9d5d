"""Time to answer and judge N harmful prompts with the embedded model (default: 100 JBB prompts x 64 tokens).

    python benchmarks/eval_speed.py [--n 100] [--max-new-tokens 64] [--batch-size 32] [--judges keyword,moderation]

Model loading is timed separately; the figure that matters is generation + judging. Judges that are not built
yet are skipped with a note (build the moderation judge with `safeprobe judge train`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import time
from unittest import mock

import torch

from safeprobe.data import load_prompts
from safeprobe.errors import UserError
from safeprobe.evaluation import generate, get_judge
from safeprobe.model import load_model

generate_module = importlib.import_module("safeprobe.evaluation.generate")  # the module, not its function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--suite", default="jbb-harmful")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--judges", default="keyword,moderation")
    parser.add_argument("--check-ieee", type=int, default=16,
                        help="regenerate this many answers without flushing subnormals (untimed) and compare")
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - start
    prompts = load_prompts(args.suite)[:args.n]
    print(f"model {args.model} loaded in {load_s:.1f} s; {len(prompts)} prompts from {args.suite}, "
          f"{args.max_new_tokens} new tokens, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, device {next(model.parameters()).device}")

    start = time.perf_counter()
    answers = generate(model, tokenizer, [p.chat for p in prompts], args.max_new_tokens, args.batch_size)
    gen_s = time.perf_counter() - start
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    print(f"generation: {gen_s:.1f} s ({tokens} answer tokens, {tokens / gen_s:.0f} tokens/s)")

    judge_s = 0.0
    for name in args.judges.split(","):
        try:
            judge = get_judge(name)
        except UserError as e:
            print(f"judge {name}: skipped ({e})")
            continue
        start = time.perf_counter()
        verdicts = judge.judge([p.prompt for p in prompts], answers)
        elapsed = time.perf_counter() - start
        judge_s += elapsed
        print(f"judge {name}: {elapsed:.1f} s, harmful score {sum(v.harmful for v in verdicts) / len(verdicts):.2f}")
    if args.check_ieee:
        same = ieee_agreement(model, tokenizer, prompts[:args.check_ieee], answers, args)
        print(f"subnormals flushed vs IEEE arithmetic: {same}/{min(args.check_ieee, len(prompts))} answers identical")
    print(f"total (generate + judge): {gen_s + judge_s:.1f} s for {len(prompts)} prompts x {args.max_new_tokens} "
          "new tokens")


def ieee_agreement(model, tokenizer, prompts, answers, args) -> int:
    """How many answers come out the same when generation keeps subnormal numbers (torch's default)."""
    with mock.patch.object(generate_module, "flush_denormals", contextlib.nullcontext):
        ieee = generate(model, tokenizer, [p.chat for p in prompts], args.max_new_tokens, args.batch_size,
                        progress=False)
    return sum(a == b for a, b in zip(ieee, answers))


if __name__ == "__main__":
    main()
