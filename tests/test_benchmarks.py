"""The benchmark scripts refuse settings they cannot measure with a one-line usage error, before any model loads."""
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
