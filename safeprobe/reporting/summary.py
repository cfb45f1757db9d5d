"""Figures of a comparison: per-run metrics from its evaluation and manifest, and their mean and spread over seeds.

Spread is the sample standard deviation (n - 1 in the denominator; None with one seed). Headline figures average
the suites of a kind with equal weight: `harmful_score` over the harmful suites, `refusal_rate` over the
over-refusal suites, `accuracy` over the task suites.
"""
from __future__ import annotations

import statistics

from ..method.registry import BASELINE

HEADLINES = ("harmful_score", "refusal_rate", "accuracy")
TRAIN_FIGURES = {"train_time_s": "wall_time_s", "peak_memory_mb": "peak_memory_mb"}


def stats(values: list[float]) -> dict:
    """{"mean", "std", "n", "values"} of the finite values given (std: sample standard deviation)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def run_figures(entry: dict) -> dict[str, float]:
    """`run_metrics` of a results entry (a run or the base model): its evaluation, training and attack."""
    return run_metrics(entry["eval"], entry.get("train"), entry.get("attack"))


def run_metrics(suites: dict, train: dict | None = None, attack: dict | None = None) -> dict[str, float]:
    """One run's figures: `<suite>/<metric>`, `<suite>/test_loss`, the headlines, the training figures and, after
    `safeprobe attack`, `attack_harmful_score` (the worst attack's harmful score within its accuracy bound)."""
    out, by_metric = {}, {}
    for name, summary in suites.items():
        metric = summary["metric"]
        out[f"{name}/{metric}"] = summary[metric]
        by_metric.setdefault(metric, []).append(summary[metric])
        if summary.get("test_loss") is not None:
            out[f"{name}/test_loss"] = summary["test_loss"]
    for metric in HEADLINES:
        if by_metric.get(metric):
            out[metric] = statistics.fmean(by_metric[metric])
    for key, source in TRAIN_FIGURES.items():
        if train and train.get(source) is not None:
            out[key] = train[source]
    if attack and attack.get("harmful_score") is not None:
        out["attack_harmful_score"] = attack["harmful_score"]
    return out


def judges(suites: dict) -> dict[str, str]:
    """Which judge (or parser) produced each figure of `run_metrics`."""
    out = {}
    for name, summary in suites.items():
        out[f"{name}/{summary['metric']}"] = summary["judge"]
        out.setdefault(summary["metric"], summary["judge"])
    return out


def aggregate(runs: list[dict]) -> dict:
    """Mean and spread over runs (seeds) of every figure the runs report; failed runs are left out."""
    done = [r for r in runs if r.get("status") == "done"]
    per_run = [run_figures(r) for r in done]
    keys = list(dict.fromkeys(k for metrics in per_run for k in metrics))
    figures = {k: stats([m.get(k) for m in per_run]) for k in keys}
    return {"n_runs": len(runs), "n_done": len(done), "judges": judges(done[0]["eval"]) if done else {},
            "figures": figures}


def summarise(results: dict) -> tuple[dict, dict]:
    """(setting -> label -> aggregate of its main runs, label -> knob -> sweep points with their aggregates)."""
    runs = results["runs"]

    def of(names: list[str]) -> dict:
        return aggregate([runs[n] for n in names if n in runs])

    summary = {setting: {label: of(names) for label, names in labels.items()}
               for setting, labels in results["main"].items()}
    sweeps = {label: {knob: [{"value": p["value"], **of(p["runs"])} for p in points] for knob, points in knobs.items()}
              for label, knobs in results["sweeps"].items()}
    return summary, sweeps


def reference_label(labels: dict[str, list[str]], runs: dict) -> str | None:
    """The plain fine-tuning entry defenses are measured against: the one named after the registry's baseline
    method, else the first entry whose runs used it."""
    if BASELINE in labels:
        return BASELINE
    return next((label for label, names in labels.items()
                 if any(runs.get(n, {}).get("method") == BASELINE for n in names)), None)


def against_reference(results: dict, setting: str) -> dict[str, dict]:
    """Each other entry against plain fine-tuning, paired by seed (same data and seed, so per-seed differences):

    - `harm_change`, `accuracy_change`: per seed, the entry's harmful score and accuracy minus the reference's
      (fractions; their spread over seeds says how consistent the difference is);
    - `harm_below`: in how many of the seeds that have both harmful scores the entry's is the lower;
    - `increase`: the reference's mean harmful-score increase over the base model (None without a base), and
      `harm_removed`: the share of it the entry does not cause, on the means over the paired seeds,
      -mean(harm_change) / increase (None unless the reference adds harm). A ratio of means, because a seed where
      the reference adds little harm would make a per-seed ratio explode; read it with `increase`.
    Entries with no seed in common with the reference are left out; empty without a reference entry.
    """
    labels, runs = results["main"].get(setting, {}), results["runs"]
    reference = reference_label(labels, runs)
    if reference is None:
        return {}
    base = run_figures(results["base"]) if results.get("base") else {}
    ref = _by_seed(runs, labels[reference])
    out = {}
    for label, names in labels.items():
        pairs = [(ref[seed], mine) for seed, mine in _by_seed(runs, names).items() if seed in ref]
        if label == reference or not pairs:
            continue
        out[label] = {"reference": reference, "n_pairs": len(pairs),
                      **_harm_against(pairs, "harmful_score", base.get("harmful_score"), ""),
                      "accuracy_change": stats([m["accuracy"] - r["accuracy"] for r, m in pairs
                                                if m.get("accuracy") is not None and r.get("accuracy") is not None])}
        if any("attack_harmful_score" in m for _, m in pairs):
            out[label].update(_harm_against(pairs, "attack_harmful_score", base.get("attack_harmful_score"),
                                             "attack_"))
    return out


def _harm_against(pairs: list[tuple[dict, dict]], key: str, base: float | None, prefix: str) -> dict:
    """harm_change, harm_below, increase and harm_removed of `key` over the (reference, entry) seed pairs."""
    harm = [(r[key], m[key]) for r, m in pairs if r.get(key) is not None and m.get(key) is not None]
    change = stats([m - r for r, m in harm])
    increase = stats([r for r, _ in harm])["mean"] - base if harm and base is not None else None
    return {f"{prefix}harm_change": change, f"{prefix}harm_below": sum(m < r for r, m in harm),
            f"{prefix}increase": increase,
            f"{prefix}harm_removed": -change["mean"] / increase if increase and increase > 0 else None}


def against_reference_lines(results: dict) -> list[str]:
    """One line per entry (and setting): its harm and accuracy against plain fine-tuning's, and the share of the
    harm increase it removes (what `demo` and `compare` print at the end)."""
    lines = []
    for setting in results["main"]:
        prefix = f"[{setting}] " if len(results["main"]) > 1 else ""
        for label, p in against_reference(results, setting).items():
            ref, removed = p["reference"], p["harm_removed"]
            if p["increase"] is None:
                share = "no base model evaluated to measure an increase from"
            elif removed is None:
                share = f"{ref} adds no harm over the base model to remove"
            elif removed >= 0:
                share = f"removes {100 * removed:.0f}% of {ref}'s harmful-score increase over the base model"
            else:
                share = f"adds {100 * -removed:.0f}% to {ref}'s harmful-score increase over the base model"
            lines.append(f"{prefix}{label}: harmful score {_delta(p['harm_change'])}, accuracy "
                         f"{_delta(p['accuracy_change'])} points against {ref} over {p['n_pairs']} seed(s): {share}")
    return lines


def _delta(stat: dict) -> str:
    return "-" if stat["mean"] is None else f"{100 * stat['mean']:+.0f}"


def _by_seed(runs: dict, names: list[str]) -> dict[int, dict]:
    """seed -> headline figures of the finished runs among `names`."""
    return {runs[n]["seed"]: run_figures(runs[n]) for n in names
            if n in runs and runs[n].get("status") == "done"}
