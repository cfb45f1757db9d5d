"""The comparison report: DIR/report.md (figures as DIR/figures/*.png) and a self-contained DIR/report.html
(the same content, figures inline as base64 PNG, no external assets).

The report is built from results.json's content plus each run's step log (`train_log.jsonl`) and diagnostics
(`diagnostics.jsonl`), as a list of blocks that both writers render.
"""
from __future__ import annotations

import base64
import html
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..evaluation.limits import describe_limit
from ..io import read_step_log, write_text
from ..method.diagnostics import read_diagnostics
from ..method.registry import method_of_run
from . import plots
from .summary import HEADLINES, against_reference, run_figures

METRIC_NAMES = {"harmful_score": "harmful score", "refusal_rate": "over-refusal", "accuracy": "accuracy",
                "test_loss": "test loss", "attack_harmful_score": "harmful score after attack (worst)"}
PERCENT = (*HEADLINES, "attack_harmful_score")
FRONTIER_NOTE = ("A method only counts as better where its frontier lies below the others' (a lower harmful score "
                 "at the same task accuracy). One point below another can be a different trade-off on the same "
                 "frontier rather than a better method.")
NOTES = ("Figures are mean ± sample standard deviation over seeds (n - 1; no spread with one seed). A headline "
         "figure averages the suites of its kind with equal weight. Harmful suites are scored by the first judge "
         "named; over-refusal always by the keyword judge's notion of a refusal; task suites by their parser. "
         "Train time and peak memory come from each run's manifest (run.json); peak memory is the GPU's peak "
         "allocation when training on a GPU, else the process's peak resident memory, reset before each run (it "
         "includes what the process already held, such as the evaluation judge).")
DIAGNOSTICS_NOTE = ("Measured every k steps on a fixed probe set (a few useful training examples; harmful answers "
                    "of safety pairs from the SAP safety data, its held-out side when it has one; held-out useful "
                    "examples), in eval mode, without touching training. Positive cosine between the gradient of "
                    "the useful loss and that of the harmful-answer loss means that descending the task loss also "
                    "makes harmful answers likelier (the paper's Figure 3); a falling harmful-answer loss is the "
                    "drift it causes (their Figure 2). Cumulative L_su sums SAP's per-step estimate "
                    "L(W + dW) - L(W) on the steps where the probe was computed.")


@dataclass
class Block:
    kind: str  # "h1", "h2", "h3", "p", "table", "figure"
    text: str = ""
    headers: list | None = None
    rows: list | None = None
    png: bytes | None = None
    name: str = ""  # figure file name


def write_report(out: str | Path, results: dict) -> None:
    """Write report.md, figures/*.png and report.html into `out` (atomically, file by file)."""
    out = Path(out)
    blocks = build(out, results)
    for block in blocks:
        if block.kind == "figure":
            (out / "figures").mkdir(exist_ok=True)
            (out / "figures" / block.name).write_bytes(block.png)
    write_text(out / "report.md", markdown(blocks))
    write_text(out / "report.html", to_html(blocks))


def build(out: Path, results: dict) -> list[Block]:
    colour = plots.colours(_labels(results))
    blocks = _header(results)
    for setting in results["main"]:
        title = f" — setting {setting}" if len(results["main"]) > 1 else ""
        blocks += [Block("h2", f"Results{title}"), _results_table(results, setting)]
        blocks += _against_reference(results, setting)
        blocks += _tradeoff(results, setting, colour) + _harm_curve(results, setting, colour)
    blocks += _across_settings(results, colour)
    blocks += _sweeps(results, colour)
    for setting in results["main"]:
        title = f" — setting {setting}" if len(results["main"]) > 1 else ""
        blocks += _training(out, results, setting, colour, title)
    return blocks + _runs_table(results)


def results_markdown(results: dict) -> str:
    """The results tables of every setting (figures, and each method against plain fine-tuning), as Markdown."""
    return markdown(results_blocks(results, figures=False))


def results_blocks(results: dict, figures: bool = True) -> list[Block]:
    """Every setting's tables (and trade-off plot), then the sweeps: a results page's body."""
    colour = plots.colours(_labels(results))
    blocks = []
    for setting in results["main"]:
        if len(results["main"]) > 1:
            blocks.append(Block("h3", f"Setting {setting}"))
        blocks += [_results_table(results, setting), *_against_reference(results, setting)]
        blocks += _tradeoff(results, setting, colour) + _harm_curve(results, setting, colour) if figures else []
    blocks += _across_settings(results, colour) if figures else []
    return blocks + _sweeps(results, colour, figures)


def _labels(results: dict) -> list[str]:
    return list(dict.fromkeys(label for labels in results["main"].values() for label in labels))


# -- sections --------------------------------------------------------------------------------------------------
def _header(results: dict) -> list[Block]:
    cfg, evaluation = results["config"], results["eval"]
    base = cfg.get("base") or {}
    done = sum(r["status"] == "done" for r in results["runs"].values())
    model, task = base.get("model_name_or_path", "default"), base.get("dataset_name", "default")
    text = (f"model `{model}`, task `{task}`, seeds "
            f"{cfg.get('seeds')}; evaluation: suites {', '.join(evaluation['suites'])}, judges "
            f"{', '.join(evaluation['judges'])}, {describe_limit(evaluation['limit'])}, greedy, "
            f"max_new_tokens {evaluation['max_new_tokens']}. {done} of {len(results['runs'])} runs finished.")
    return [Block("h1", "safeprobe compare"), Block("p", text), Block("p", NOTES)]


def _columns(results: dict) -> list[str]:
    """Figure keys in table order: headlines, each suite's metric (and test loss), train time, peak memory."""
    keys = ["harmful_score"]
    if any("attack_harmful_score" in a["figures"] for a in _aggregates(results)):
        keys.append("attack_harmful_score")
    kinds = {}
    for aggregate in _aggregates(results):
        for key in aggregate["figures"]:
            if "/" in key:
                kinds.setdefault(key.split("/")[1], []).append(key)
    for metric in HEADLINES[1:]:
        if len(set(kinds.get(metric, []))) > 1:
            keys.append(metric)
    for aggregate in _aggregates(results):
        keys += [k for k in aggregate["figures"] if "/" in k]
    return list(dict.fromkeys(keys + ["train_time_s", "peak_memory_mb"]))


def _aggregates(results: dict) -> list[dict]:
    return [a for labels in results["summary"].values() for a in labels.values()]


def _column_title(key: str, judge: str | None) -> str:
    if key == "train_time_s":
        return "train time (s)"
    if key == "peak_memory_mb":
        return "peak memory (MB)"
    suite, _, metric = key.rpartition("/")
    title = f"{suite} {METRIC_NAMES[metric]}" if suite else f"{METRIC_NAMES[metric]} (mean of suites)"
    return f"{title} (judge: {judge})" if judge else title


def _results_table(results: dict, setting: str) -> Block:
    keys = _columns(results)
    summary = results["summary"].get(setting, {})
    judges = {k: v for a in summary.values() for k, v in a["judges"].items()}
    headers = ["method", "seeds done"] + [_column_title(k, judges.get(k)) for k in keys]
    rows = []
    if results.get("base"):
        figures = run_figures(results["base"])
        rows.append(["base model (no fine-tuning)", "-"] + [_cell(k, figures.get(k)) for k in keys])
    for label, aggregate in summary.items():
        figures = aggregate["figures"]
        rows.append([label, f"{aggregate['n_done']}/{aggregate['n_runs']}"]
                    + [_seed_cell(k, figures[k], aggregate["n_done"]) if k in figures else "-" for k in keys])
    return Block("table", headers=headers, rows=rows)


def _seed_cell(key: str, stat: dict, n_done: int) -> str:
    """A mean over fewer seeds than the entry finished (an attack not run yet, or one that broke every model)
    says so: it is not comparable with its neighbours as it stands."""
    cell = _cell(key, stat["mean"], stat["std"])
    return cell if stat["n"] >= n_done or cell == "-" else f"{cell} ({stat['n']} of {n_done} seeds)"


def _against_reference(results: dict, setting: str) -> list[Block]:
    paired = against_reference(results, setting)
    if not paired:
        return []
    ref = next(iter(paired.values()))["reference"]
    text = (f"Each entry against plain fine-tuning (`{ref}`), seed by seed on the same data: its harmful score and "
            f"accuracy minus {ref}'s, in points (mean ± standard deviation over the paired seeds), and in how "
            f"many seeds it is less harmful. Harm increase removed: the share of {ref}'s harmful-score increase "
            f"over the base model (its own column) that the entry does not cause, on the means (100% = as safe as "
            f"the base, 0% = as harmful as {ref}, negative = more harmful); a small increase makes it swing. A "
            f"lower harmful score bought with accuracy can lie on {ref}'s own frontier: read it with the "
            "trade-off plot.")
    rows = [[label, str(p["n_pairs"]), _points(p["harm_change"]), f"{p['harm_below']} of {p['harm_change']['n']}",
             _points(p["accuracy_change"]), _signed_points(p["increase"]), _share(p["harm_removed"])]
            for label, p in paired.items()]
    headers = ["entry", "seeds paired", f"harmful score vs {ref} (points)", f"seeds less harmful than {ref}",
               f"accuracy vs {ref} (points)", f"{ref}'s harm increase over the base (points)",
               f"{ref}'s harm increase removed"]
    if any("attack_harm_change" in p for p in paired.values()):
        headers += [f"after attack: harmful score vs {ref} (points)", f"after attack: seeds less harmful",
                    f"after attack: {ref}'s harm increase removed"]
        for row, p in zip(rows, paired.values()):
            row += [_points(p["attack_harm_change"]), f"{p['attack_harm_below']} of {p['attack_harm_change']['n']}",
                    _share(p["attack_harm_removed"])] if "attack_harm_change" in p else ["-", "-", "-"]
    return [Block("p", text), Block("table", headers=headers, rows=rows)]


def _points(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return _signed_points(stat["mean"]) + (f" ± {100 * stat['std']:.1f}" if stat["std"] is not None else "")


def _signed_points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _cell(key: str, mean, std=None) -> str:
    if mean is None:
        return "-"
    metric = key.rpartition("/")[2]
    if metric in PERCENT:
        text = f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
        return text + "%"
    digits = 4 if metric == "test_loss" else 1
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _point(figures: dict, x_key: str = "accuracy", y_key: str = "harmful_score") -> dict | None:
    x, y = figures.get(x_key), figures.get(y_key)
    if not x or not y or x["mean"] is None or y["mean"] is None:
        return None
    return {"x": 100 * x["mean"], "xerr": 100 * (x["std"] or 0), "y": 100 * y["mean"], "yerr": 100 * (y["std"] or 0)}


def _base_point(results: dict) -> dict | None:
    if not results.get("base"):
        return None
    figures = run_figures(results["base"])
    if "accuracy" not in figures or "harmful_score" not in figures:
        return None
    return {"x": 100 * figures["accuracy"], "y": 100 * figures["harmful_score"]}


def _axis_labels(results: dict) -> tuple[str, str]:
    judges = {k: v for a in _aggregates(results) for k, v in a["judges"].items()}
    return (f"task accuracy (%, {judges.get('accuracy', 'parser')})",
            f"harmful score (%, judge: {judges.get('harmful_score', '?')})")


def _tradeoff(results: dict, setting: str, colour: dict) -> list[Block]:
    points = []
    for label, aggregate in results["summary"].get(setting, {}).items():
        point = _point(aggregate["figures"])
        if point:
            points.append({"label": label, **point})
    if not points:
        return [Block("p", "No harmful-score vs accuracy plot: it needs a harmful suite, a task suite and at least "
                           "one finished run.")]
    xlabel, ylabel = _axis_labels(results)
    png = plots.tradeoff_scatter([{"title": f"setting {setting}", "points": points, "base": _base_point(results)}],
                                 colour, xlabel, ylabel)
    return [Block("figure", f"Harmful score vs task accuracy ({setting}): one point per method, error bars over seeds",
                  png=png, name=_file_name("tradeoff", setting))]


def setting_knob(results: dict) -> tuple[str, dict[str, float]] | None:
    """(knob, setting -> value) when the settings differ in one numeric knob only (a poisoning sweep:
    `{p0: {poison_ratio: 0}, p10: {poison_ratio: 0.1}, ...}`), else None."""
    settings = results["config"].get("settings") or {}
    knobs = {knob for overrides in settings.values() for knob in overrides}
    if len(settings) < 2 or len(knobs) != 1:
        return None
    knob = knobs.pop()
    values = {name: overrides.get(knob) for name, overrides in settings.items()}
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values())
    return (knob, values) if numeric and len(set(values.values())) == len(values) else None


def _across_settings(results: dict, colour: dict) -> list[Block]:
    found = setting_knob(results)
    if found is None:
        return []
    knob, values = found
    panels = []
    for metric in HEADLINES:
        series = {}
        for setting in sorted(values, key=values.get):
            for label, aggregate in results["summary"].get(setting, {}).items():
                stat = aggregate["figures"].get(metric)
                if stat and stat["mean"] is not None:
                    line = series.setdefault(label, {"steps": [], "mean": [], "std": []})
                    line["steps"].append(values[setting])
                    line["mean"].append(100 * stat["mean"])
                    line["std"].append(100 * (stat["std"] or 0))
        if series:
            panels.append({"title": f"{METRIC_NAMES[metric]} against {knob}", "ylabel": f"{METRIC_NAMES[metric]} (%)",
                           "series": series})
    if not panels:
        return []
    return [Block("h2", f"Against {knob}"),
            Block("figure", f"Each method's headline figures against {knob}, one point per setting (mean over "
                            "seeds, band ± spread)", png=plots.step_curves(panels, colour, knob),
                  name=_file_name("against", knob))]


def _sweeps(results: dict, colour: dict, figures: bool = True) -> list[Block]:
    sweeps = results.get("sweep_summary") or {}
    if not sweeps:
        return []
    headers = ["method", "knob", "value", "runs done", "harmful score", "accuracy", "over-refusal"]
    rows, lines = [], []
    for label, knobs in sweeps.items():
        for knob, points in knobs.items():
            line = {"label": label, "knob": knob, "points": []}
            for p in points:
                figures = p["figures"]
                rows.append([label, knob, str(p["value"]), f"{p['n_done']}/{p['n_runs']}"]
                            + [_cell(m, figures[m]["mean"], figures[m]["std"]) if m in figures else "-"
                               for m in ("harmful_score", "accuracy", "refusal_rate")])
                point = _point(figures)
                if point:
                    line["points"].append({"value": p["value"], **point})
            lines.append(line)
    blocks = [Block("h2", "Sweeps"), Block("p", FRONTIER_NOTE), Block("table", headers=headers, rows=rows)]
    if figures and any(line["points"] for line in lines):
        xlabel, ylabel = _axis_labels(results)
        first = next(iter(results["summary"].values()), {})
        others = [{"label": label, **point} for label, aggregate in first.items()
                  if label not in sweeps and (point := _point(aggregate["figures"]))]
        png = plots.frontiers(lines, colour, _base_point(results), xlabel, ylabel, others)
        blocks.append(Block("figure", "Each method's sweep frontier (points labelled with the knob's value); the "
                            "methods without a sweep as squares (first setting, mean over seeds)",
                            png=png, name="frontiers.png"))
    return blocks


def harm_curves(results: dict, setting: str) -> dict:
    """label -> {"steps", "mean", "std"} of the harmful score during training (eval_harm_every) over the seeds,
    from the curves results.json keeps for each run; {} when the curve was off."""
    curves = {label: [results["runs"][n].get("harm_curve", []) for n in names if n in results["runs"]]
              for label, names in results["main"][setting].items()}
    return _series(curves, "eval_harmful_score")


def _harm_curve(results: dict, setting: str, colour: dict) -> list[Block]:
    harm = harm_curves(results, setting)
    if not harm:
        return []
    percent = {label: {"steps": s["steps"], "mean": [100 * v for v in s["mean"]],
                       "std": [100 * v for v in s["std"]]} for label, s in harm.items()}
    panels = [{"title": "harmful score during training", "ylabel": "harmful score (%, keyword judge)",
               "series": percent}]
    return [Block("figure", "Harmful score against optimiser step (eval_harm_every; mean of the harmful suites, "
                  "mean over seeds, band ± spread; the SAP paper's Figure 5)",
                  png=plots.step_curves(panels, colour), name=_file_name("harm-curve", setting))]


def _training(out: Path, results: dict, setting: str, colour: dict, title: str) -> list[Block]:
    runs = {label: [results["runs"][n] for n in names if results["runs"].get(n, {}).get("status") == "done"]
            for label, names in results["main"][setting].items()}
    logs = {label: [read_step_log(out / r["folder"] / "train_log.jsonl") for r in rs] for label, rs in runs.items()}
    diagnostics = {label: [read_diagnostics(out / r["folder"]) for r in rs] for label, rs in runs.items()}
    blocks = [Block("h2", f"Training{title}")]
    task_loss = _series(logs, "task_loss")
    if task_loss:
        panels = [{"title": "task loss per step", "ylabel": "task loss", "series": task_loss}]
        for series in _method_series(runs):
            values = _series(logs, series.key, series.cumulative)
            if values:
                panels.append({"title": series.title, "ylabel": series.ylabel, "series": values})
        blocks.append(Block("figure", "Task loss per optimiser step (mean over seeds, band ± spread), and the "
                            "series each method declares; for SAP, the loss it descends is taken with the probe on", png=plots.step_curves(panels, colour),
                            name=_file_name("task-loss", setting)))
    blocks += [Block("h3", "Diagnostics (SAP paper, Figures 2 and 3)"), Block("p", DIAGNOSTICS_NOTE)]
    maps = _cosine_maps(diagnostics)
    if maps:
        blocks.append(Block("figure", "Per-layer cos(useful gradient, harmful-answer gradient) over training",
                            png=plots.layer_heatmaps(maps), name=_file_name("layer-cosine", setting)))
    panels = [{"title": "cos over all layers", "ylabel": "cosine", "series": _series(diagnostics,
                                                                                     "cos_useful_harmful_all")},
              {"title": "loss on harmful answers", "ylabel": "loss", "series": _series(diagnostics, "loss_harmful")},
              {"title": "loss on held-out useful data", "ylabel": "loss",
               "series": _series(diagnostics, "loss_useful_heldout")}]
    panels = [p for p in panels if p["series"]]
    if panels:
        blocks.append(Block("figure", "Harmful-answer and held-out useful losses", name=_file_name(
            "diagnostics", setting), png=plots.step_curves(panels, colour)))
    elif not maps:
        blocks.append(Block("p", "No diagnostics recorded (diagnostics_every was 0)."))
    return blocks


def _runs_table(results: dict) -> list[Block]:
    headers = ["run", "method", "setting", "seed", "sweep", "status", "harmful score", "accuracy", "train time (s)",
               "folder"]
    rows = []
    for name, run in results["runs"].items():
        figures = run_figures(run) if run["status"] == "done" else {}
        sweep = f"{run['sweep']['knob']}={run['sweep']['value']}" if run.get("sweep") else "-"
        rows.append([name, run["method"], run["setting"], str(run["seed"]), sweep, run["status"]]
                    + [_cell(k, figures.get(k)) for k in ("harmful_score", "accuracy", "train_time_s")]
                    + [run["folder"]])
    return [Block("h2", "Runs"), Block("table", headers=headers, rows=rows)]


# -- step series -----------------------------------------------------------------------------------------------
def _method_series(runs: dict[str, list[dict]]) -> list:
    """The step series the compared runs' methods declare in the registry, each once, in table order."""
    found = {}
    for rs in runs.values():
        for run in rs:
            method = method_of_run(run.get("method", ""))
            for series in method.series if method else ():
                found.setdefault(series.key, series)
    return list(found.values())


def _series(per_label: dict[str, list[list[dict]]], key: str, cumulative: bool = False) -> dict:
    """label -> {"steps", "mean", "std"} of `key` over the runs' rows, aligned by step (optionally summed up)."""
    out = {}
    for label, runs in per_label.items():
        per_run = []
        for rows in runs:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if cumulative:
                total, summed = 0.0, []
                for step, value in points:
                    total += value
                    summed.append((step, total))
                points = summed
            if points:
                per_run.append(dict(points))
        if per_run:
            out[label] = _mean_by_step(per_run)
    return out


def _mean_by_step(per_run: list[dict]) -> dict:
    steps = sorted({s for run in per_run for s in run})
    values = [[run[s] for run in per_run if s in run] for s in steps]
    return {"steps": steps, "mean": [statistics.fmean(v) for v in values],
            "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]}


def _cosine_maps(diagnostics: dict[str, list[list[dict]]]) -> dict:
    """label -> {"steps", "cos": layers x steps}, averaged over seeds (no cosine, e.g. a zero gradient: 0)."""
    maps = {}
    for label, runs in diagnostics.items():
        runs = [rows for rows in runs if rows]
        n_layers = max((len(r.get("cos_useful_harmful") or []) for rows in runs for r in rows), default=0)
        if n_layers:
            layers = [_mean_by_step([{r["step"]: _layer_cosine(r, layer) for r in rows} for rows in runs])
                      for layer in range(n_layers)]
            maps[label] = {"steps": layers[0]["steps"], "cos": [m["mean"] for m in layers]}
    return maps


def _layer_cosine(row: dict, layer: int) -> float:
    values = row.get("cos_useful_harmful") or []
    return values[layer] if layer < len(values) and values[layer] is not None else 0.0


def _file_name(kind: str, setting: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{kind}-{setting}") + ".png"


# -- writers ---------------------------------------------------------------------------------------------------
def markdown(blocks: list[Block]) -> str:
    lines = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines += ["| " + " | ".join(b.headers) + " |", "|" + "---|" * len(b.headers)]
            lines += ["| " + " | ".join(row) + " |" for row in b.rows] + [""]
        elif b.kind == "figure":
            lines += [f"![{b.text}](figures/{b.name})", "", f"*{b.text}*", ""]
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
         "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
         "td:first-child,th:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%}"
         "figcaption{font-style:italic;color:#555}code{background:#f3f3f3;padding:0 3px}")


def to_html(blocks: list[Block]) -> str:
    """One self-contained page: inline CSS, figures as data: URIs, no scripts, no external references."""
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_code(html.escape(b.text))}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>safeprobe compare</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline_code(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
