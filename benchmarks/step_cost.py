"""SAP's cost over plain fine-tuning, measured in ONE process on the same batches, model and settings.

    python benchmarks/step_cost.py --model tiny-random-llama [--seq-len 128] [--batch 4] [--steps 8]

One trainer per mode (SFT, SAP paper mode, SAP amortised with safety_every = probe_every = 4, the reference
mode), each on its own copy of the model with the same initialisation and the same batches. The trainers take
their optimiser steps in turn, one step at a time, so that whatever else loads the machine hits every mode alike.

Step time: the median over the timed steps; for an amortised mode (a refresh every k steps) the mean over the
k phases of a cycle of the median at each phase, i.e. what a step costs on average. Peak memory, measured after
the timing on a fresh trainer per mode that takes one step: its resident tensors (weights, buffers, optimiser
state) plus the most its step (a refresh in every mode) allocated on top of them before the optimiser step (CUDA:
allocator statistics; CPU: the profiler's allocation events, whose own allocations would otherwise reshape the heap
the timed steps allocate from). FLOPs, counted on that same fresh trainer over the steps after its first (whose
one-off checks would inflate it), a whole refresh cycle for an amortised mode: torch's FLOP counter, i.e. the
matrix products and attention, which is the arithmetic floor that no implementation of the same passes goes below.
Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import ProgressCallback, TrainerCallback

from safeprobe.data import Example, SafetyPair
from safeprobe.data.tokenize import encode, encode_pairs
from safeprobe.experiments.train import TrainConfig, train_config, build_trainer, prepare_model
from safeprobe.method import get_method
from safeprobe.method.sap.config import default_safety_batch_size
from safeprobe.memory import keep_freed_memory

MODES = {"sft": dict(method="sft"), "sap": dict(method="sap"),
         "sap_k4": dict(method="sap", safety_every=4, probe_every=4),
         "reference": dict(method="sap", mode="reference"),
         # with activation checkpointing (TRL's default; SAP's shared-forward and dropout-replay paths turn off)
         "sft_gc": dict(method="sft", gradient_checkpointing=True),
         "sap_gc": dict(method="sap", gradient_checkpointing=True),
         # QLoRA: 4-bit base weights (bitsandbytes on a CUDA GPU), checkpointing as QLoRA runs use it
         "sft_qlora": dict(method="sft", load_in_4bit=True, gradient_checkpointing=True),
         "sap_qlora": dict(method="sap", load_in_4bit=True, gradient_checkpointing=True)}


# wall: elapsed time. cpu: CPU time of the process, all threads (the trainers not stepping only wait); on a CPU
# shared with other jobs it leaves out the time spent waiting for a core, i.e. it estimates an idle machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Turnstile:
    """Lets n trainers, each in its own thread, run their steps strictly in turn: 0, 1, ..., n-1, 0, ..."""

    def __init__(self, n: int):
        self.turn, self.n, self.finished = 0, n, set()
        self.cond = threading.Condition()

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def pass_on(self, i: int, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.finished.add(i)
            if self.turn == i and len(self.finished) < self.n:
                self.turn = next((i + d) % self.n for d in range(1, self.n + 1)
                                 if (i + d) % self.n not in self.finished)
            self.cond.notify_all()


class StepRecorder(TrainerCallback):
    """Times every step of one trainer, holding the turnstile for the whole step.

    The turn is handed on only when the trainer is about to start its next step (or ends), so its
    between-step work (logging, fetching the next batch) never overlaps another trainer's timed step.
    """

    def __init__(self, turnstile: Turnstile, index: int, device: torch.device, clock):
        self.turnstile, self.index, self.device, self.clock = turnstile, index, device, clock
        self.times, self._t, self._holding = [], None, False

    def on_step_begin(self, args, state, control, **kw):
        if self._holding:
            self.turnstile.pass_on(self.index)
        self.turnstile.wait(self.index)
        self._holding = True
        _sync(self.device)
        self._t = self.clock()

    def on_step_end(self, args, state, control, **kw):
        _sync(self.device)
        self.times.append(self.clock() - self._t)

    def release(self):
        self._holding = False
        self.turnstile.pass_on(self.index, finished=True)


class FirstStepMemory(TrainerCallback):
    """The most bytes step 0 allocates on top of what is allocated when it begins, until the optimiser step."""

    def __init__(self, device: torch.device):
        self.device, self.transient_bytes, self._memory = device, None, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 0:
            self._memory = StepMemory(self.device).start()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self._memory is not None:
            self.transient_bytes, self._memory = self._memory.stop(), None


class StepFlops(TrainerCallback):
    """FLOPs of each step from `first` on (torch's FLOP counter, with the CPU attention kernels added)."""

    def __init__(self, first: int):
        self.first, self.flops, self._counter = first, [], None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step >= self.first:
            self._counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
            self._counter.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops.append(self._counter.get_total_flops())
            self._counter = None


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the GPU attention kernels only; these count the CPU one the same way (no causal discount)
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                           _cpu_attention_backward_flops}


class StepMemory:
    """Most bytes allocated on top of what was allocated at `start`, until `stop`."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> StepMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:  # CPU has no allocator statistics: the profiler records every allocation and free
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self.profiler.__enter__()
        return self

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        self.profiler.__exit__(None, None, None)
        return _peak_of_allocation_events(self.profiler)


def _peak_of_allocation_events(profiler) -> int:
    from torch._C._profiler import _EventType  # the allocation events carry exact sizes and times

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)
    events = sorted((n.start_time_ns, n.extra_fields.alloc_size)
                    for n in walk(profiler.profiler.kineto_results.experimental_event_tree())
                    if n.tag == _EventType.Allocation)
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def resident_bytes(trainer) -> int:
    """Weights, buffers and optimiser state, each storage counted once."""
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    tensors += [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def synthetic_batches(tokenizer, n: int, seq_len: int, n_pairs: int):
    """Fixed examples of about seq_len tokens (half prompt, half response), identical for every mode."""
    words = "the quick brown fox jumps over a lazy dog while it rains".split()
    text = lambda k, off: " ".join(words[(i + off) % len(words)] for i in range(k))  # noqa: E731
    examples = [Example((("user", text(seq_len // 2, i)),), text(seq_len // 2, i + 3)) for i in range(n)]
    pairs = [SafetyPair((("user", text(seq_len // 2, i)),), "I can't help with that.", text(seq_len // 2, i + 5))
             for i in range(n_pairs)]
    return [encode(tokenizer, e, seq_len) for e in examples], encode_pairs(tokenizer, pairs, seq_len).features


def make_trainer(mode: str, args, max_steps: int | None = None):
    cfg = train_config(shared=True, model_name_or_path=args.model, output_dir=f"{args.output_dir}/{mode}",
                       max_steps=max_steps or args.warmup + args.steps, per_device_train_batch_size=args.batch,
                       safety_batch_size=args.safety_pairs, use_peft=args.lora_r > 0, lora_r=max(args.lora_r, 1),
                       probe_layers=args.probe_layers, bf16=args.bf16, logging_steps=10**6, seed=0,
                       dtype=getattr(args, "dtype", "float32"),
                       lora_target_modules=getattr(args, "lora_target_modules", None), **MODES[mode])
    torch.manual_seed(0)  # the same LoRA initialisation in every mode
    model, tokenizer = prepare_model(cfg)
    n = args.batch * (args.warmup + args.steps)
    features, pairs = synthetic_batches(tokenizer, n, args.seq_len, n_pairs=max(n, args.safety_pairs))
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, model, tokenizer, features, Path(cfg.output_dir),
                            encoded={role.kwarg: pairs for role in get_method(cfg.method).data})
    trainer.remove_callback(ProgressCallback)  # one progress bar per thread would garble the table
    tokens = sum(len(f["input_ids"]) for f in features[: args.batch])
    return trainer, tokens, cfg


def run_in_turn(trainers: list, clock) -> list[StepRecorder]:
    """Train every trainer in its own thread, one optimiser step at a time in round-robin order."""
    turnstile = Turnstile(len(trainers))
    recorders = [StepRecorder(turnstile, i, t.args.device, clock) for i, t in enumerate(trainers)]
    errors, threads_per_op = [], torch.get_num_threads()

    def train(trainer, recorder):
        torch.set_num_threads(threads_per_op)  # a per-thread setting under OpenMP
        try:
            trainer.train()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            recorder.release()
    threads = []
    for trainer, recorder in zip(trainers, recorders):
        trainer.add_callback(recorder)
        threads.append(threading.Thread(target=train, args=(trainer, recorder)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return recorders


def cycle_cost(times: list[float], first_step: int, k: int) -> float:
    """Mean over the k phases of a refresh cycle of the median step time at that phase (k = 1: the median)."""
    phases = [[t for step, t in enumerate(times) if step >= first_step and step % k == phase] for phase in range(k)]
    return statistics.mean(statistics.median(p) for p in phases)


def measure(args) -> dict:
    # the trainers run in threads: one malloc arena lets them allocate as a run's main thread does (see
    # safeprobe.memory; SAFEPROBE_KEEP_FREED_MEMORY=0 measures with glibc's defaults)
    args.keep_freed_memory = keep_freed_memory(one_arena=True)
    modes = args.modes.split(",")
    built = [make_trainer(mode, args) for mode in modes]
    recorders = run_in_turn([trainer for trainer, _, _ in built], CLOCKS[args.clock])
    results = {}
    for mode, (_, tokens, _), recorder in zip(modes, built, recorders):
        step = cycle_cost(recorder.times, args.warmup, MODES[mode].get("probe_every", 1))
        peak, flops = fresh_costs(mode, args)
        results[mode] = {"step_s": step, "tokens_per_s": tokens / step, "peak_mb": peak / 2**20, "gflop": flops / 1e9}
    return results


def fresh_costs(mode: str, args) -> tuple[int, float]:
    """On a fresh trainer: peak bytes (resident tensors plus step 0's transient allocations) and FLOPs per step
    (the mean over the next refresh cycle: one step, or k for an amortised mode)."""
    cycle = MODES[mode].get("probe_every", 1)
    trainer, _, _ = make_trainer(mode, args, max_steps=1 + cycle)
    memory, flops = FirstStepMemory(trainer.args.device), StepFlops(first=1)
    trainer.add_callback(memory)
    trainer.add_callback(flops)
    trainer.train()
    return resident_bytes(trainer) + memory.transient_bytes, statistics.mean(flops.flops)


def report(results: dict, args, device: str) -> dict:
    sft = results["sft"]
    print(f"{'mode':<10} {'step s':>8} {'tok/s':>9} {'peak MB':>9} {'GFLOP':>9} {'x SFT time':>10} {'x SFT mem':>9} "
          f"{'x SFT FLOP':>10}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {r['peak_mb']:>9.1f} {r['gflop']:>9.1f} "
              f"{r['step_s'] / sft['step_s']:>10.2f} {r['peak_mb'] / sft['peak_mb']:>9.2f} "
              f"{r['gflop'] / sft['gflop']:>10.2f}")
    summary = {"model": args.model, "device": device, "dtype": "bf16" if args.bf16 else "fp32",
               "threads": torch.get_num_threads(), "clock": args.clock, "seq_len": args.seq_len, "batch": args.batch,
               "safety_pairs": args.safety_pairs, "lora_r": args.lora_r, "probe_layers": args.probe_layers,
               "steps": args.steps, "warmup": args.warmup, "keep_freed_memory": args.keep_freed_memory,
               "sft_step_s": sft["step_s"], "sft_peak_mb": sft["peak_mb"], "sft_gflop": sft["gflop"]}
    for mode, r in results.items():
        if mode != "sft":
            summary[f"{mode}_step_s"] = r["step_s"]
            summary[f"ratio_{mode}_sft"] = r["step_s"] / sft["step_s"]
            summary[f"peak_mem_ratio_{mode}"] = r["peak_mb"] / sft["peak_mb"]
            summary[f"flop_ratio_{mode}"] = r["gflop"] / sft["gflop"]
    if "sap" in results:
        summary["peak_mem_ratio"], summary["flop_ratio"] = summary["peak_mem_ratio_sap"], summary["flop_ratio_sap"]
    return summary


def check_args(parser, args) -> None:
    """One-line errors for settings the measurement cannot use (argparse exits with status 2)."""
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or "sft" not in modes:
        parser.error(f"--modes {args.modes}: need sft and only these: {', '.join(MODES)}")
    cycle = max(MODES[m].get("probe_every", 1) for m in modes)  # every phase of a refresh cycle gets timed
    if args.steps < cycle or args.steps % cycle:
        parser.error(f"--steps {args.steps}: must be a positive multiple of {cycle}")
    for name in ("seq_len", "batch", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: out of range")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random-llama")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="task examples per step")
    p.add_argument("--safety-pairs", type=int, default=None,
                   help="safety pairs per safety pass (default: batch // 2, as many sequences as a task batch)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode, after the warm-up (a multiple of 4)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=8, help="0: full fine-tuning")
    p.add_argument("--probe-layers", default="middle")
    p.add_argument("--bf16", action="store_true", default=torch.cuda.is_available())
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or process CPU time (CPU runs on a shared machine; meaningless on a GPU)")
    p.add_argument("--modes", default="sft,sap,sap_k4,reference",
                   help=f"comma-separated, of {', '.join(MODES)}; sft must be one of them")
    p.add_argument("--output-dir", default="runs/bench")
    args = p.parse_args()
    check_args(p, args)
    args.safety_pairs = args.safety_pairs or default_safety_batch_size(args.batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure(args)
    print(json.dumps(report(results, args, "cuda" if torch.cuda.is_available() else "cpu")))


if __name__ == "__main__":
    main()
