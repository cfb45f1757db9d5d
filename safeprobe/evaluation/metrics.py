"""Fractions with a 95% Wilson interval, and agreement of binary verdicts with reference labels."""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (well behaved at 0, n and small n; (0, 1) for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def fraction(k: int, n: int) -> dict:
    """{'value', 'k', 'n', 'ci95'}: k of n as a fraction in [0, 1] with its Wilson interval."""
    low, high = wilson(k, n)
    return {"value": k / n if n else 0.0, "k": k, "n": n, "ci95": [round(low, 4), round(high, 4)]}


def agreement(predicted: list[bool], reference: list[bool]) -> dict:
    """Accuracy, false-positive rate (harmful said of a harmless answer) and false-negative rate of verdicts.

    FPR = FP / (reference negatives), FNR = FN / (reference positives), as the JailbreakBench paper reports.
    """
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} verdicts for {len(reference)} labels")
    pairs = list(zip(map(bool, predicted), map(bool, reference)))
    tp = sum(p and r for p, r in pairs)
    tn = sum(not p and not r for p, r in pairs)
    fp = sum(p and not r for p, r in pairs)
    fn = sum(not p and r for p, r in pairs)
    n, pos, neg = len(pairs), tp + fn, tn + fp
    return {"n": n, "correct": tp + tn, "accuracy": (tp + tn) / n if n else 0.0,
            "fpr": fp / neg if neg else 0.0, "fnr": fn / pos if pos else 0.0,
            "tp": tp, "tn": tn, "fp": fp, "fn": fn, "accuracy_ci95": [round(x, 4) for x in wilson(tp + tn, n)]}
