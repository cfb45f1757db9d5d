"""The benchmark scripts refuse settings they cannot measure with a one-line usage error, before any model loads."""
import json
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--steps", "2"], "--steps 2: must be a positive multiple of 4"),  # amortised modes time every phase
    (["--steps", "0", "--modes", "sft,sap"], "--steps 0: must be a positive multiple of 1"),
    (["--modes", "sap"], "--modes sap: need sft"),
    (["--modes", "sft,fast"], "--modes sft,fast: need sft"),
    (["--batch", "0"], "--batch 0: out of range"),
])
def test_step_cost_rejects_settings_it_cannot_measure(argv, message, monkeypatch, capsys):
    step_cost = load("step_cost")
    monkeypatch.setattr(step_cost, "measure", lambda args: pytest.fail("measured despite bad settings"))
    monkeypatch.setattr(sys, "argv", ["step_cost.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        step_cost.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_step_cost_accepts_a_multiple_of_the_refresh_cycle(monkeypatch):
    step_cost = load("step_cost")

    def measure(args):
        raise RuntimeError(f"measuring {args.steps} steps")
    monkeypatch.setattr(step_cost, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["step_cost.py", "--steps", "12"])
    with pytest.raises(RuntimeError, match="measuring 12 steps"):  # reached the measurement with the settings given
        step_cost.main()


def test_step_cost_counts_the_cpu_attention_kernels_as_torch_counts_attention():
    """torch's FLOP counter knows only the GPU attention kernels; the benchmark adds the CPU one with torch's own
    formula: 4 b h s_q s_k d forward (QK^T and PV), 2.5 times that backward (the scores recomputed, then four
    gradient products); grouped-query heads are broadcast."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    step_cost = load("step_cost")
    b, h, h_kv, s, d = 2, 4, 2, 16, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    k, v = torch.randn(b, h_kv, s, d), torch.randn(b, h_kv, s, d)
    with FlopCounterMode(display=False) as plain:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    with FlopCounterMode(display=False, custom_mapping=step_cost.CPU_ATTENTION_FLOPS) as counted:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    forward = 4 * b * h * s * s * d
    assert plain.get_total_flops() == 0  # the gap this closes: the CPU kernel is not in torch's table
    assert counted.get_total_flops() == forward + 5 * forward // 2


def test_step_flops_counts_each_step_from_the_first_asked_for():
    import torch
    from transformers import TrainerControl, TrainerState

    step_cost = load("step_cost")
    recorder, state, a, w = step_cost.StepFlops(first=1), TrainerState(), torch.randn(3, 5), torch.randn(5, 7)
    q = torch.randn(1, 2, 4, 8)
    for step in range(3):
        state.global_step = step
        recorder.on_step_begin(None, state, TrainerControl())
        for _ in range(step + 1):
            a @ w
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # CPU attention counted too
        recorder.on_step_end(None, state, TrainerControl())
    matmul, attention = 2 * 3 * 5 * 7, 4 * 1 * 2 * 4 * 4 * 8
    assert recorder.flops == [2 * matmul + attention, 3 * matmul + attention]  # step 0 not counted


def test_the_gpu_benchmark_runs_at_the_tiny_shape_on_a_cpu(monkeypatch, capsys, tmp_path):
    sys.path.insert(0, str(BENCHMARKS))  # it imports step_cost's measurement
    monkeypatch.setattr(sys, "path", sys.path)
    gpu = load("gpu_step_cost")
    monkeypatch.setattr(sys, "argv", ["gpu_step_cost.py", "--shape", "tiny", "--seq-len", "96", "--batch", "2",
                                      "--steps", "4", "--lora-r", "4", "--output-dir", str(tmp_path)])
    gpu.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["modes"]) == {"sft", "sap", "sap_k4", "sft_gc", "sap_gc"}
    assert result["qlora"] == "skipped: needs a CUDA GPU and bitsandbytes"
    modes = result["modes"]
    assert all(m["step_s"] > 0 and m["gflop"] > 0 and m["mfu"] is None for m in modes.values())
    assert modes["sap"]["gflop"] > modes["sft"]["gflop"]  # SAP's extra passes are counted
    assert modes["sap_gc"]["gflop"] > modes["sap"]["gflop"]  # checkpointing recomputes the forward
