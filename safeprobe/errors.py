"""User-facing errors: one line, exit code 2, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (file, config, flag). The CLI prints it on one line and exits 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def choices_hint(name: str, valid) -> str:
    return f"unknown {name}; valid choices: {', '.join(sorted(valid))}"


def check_seed(seed: int, name: str = "seed") -> None:
    """Seeds go to numpy, whose seeds are unsigned 32-bit integers."""
    if not 0 <= seed < 2**32:
        raise UserError(f"{name} must be in [0, 2**32 - 1], got {seed}")


class TrainingDiverged(UserError):
    """Too many optimiser steps in a row had a non-finite loss or gradient. The CLI exits 3."""

    exit_code = 3
