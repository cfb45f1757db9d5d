"""The comparison report's figures, each returned as PNG bytes.

matplotlib's object API with the Agg canvas: no pyplot state, no display, safe in a headless process and in tests.
Every function takes plain numbers (the report module extracts them), so each plot can be read on its own.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f")
PANEL = (4.6, 3.6)  # inches per subplot


def colours(labels: list[str]) -> dict[str, str]:
    """One fixed colour per method label, the same in every figure of a report."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def _figure(n_panels: int, height: float = PANEL[1], width: float = PANEL[0]):
    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, axes


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def tradeoff_scatter(panels: list[dict], colour: dict[str, str], xlabel: str, ylabel: str) -> bytes:
    """Per panel (setting): one point per method, error bars = spread over seeds; the base model as a star.

    panels: [{"title", "points": [{"label", "x", "xerr", "y", "yerr"}], "base": {"x", "y"} or None}] (percent).
    """
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        for p in panel["points"]:
            ax.errorbar(p["x"], p["y"], xerr=p["xerr"] or 0, yerr=p["yerr"] or 0, fmt="o", capsize=3,
                        color=colour[p["label"]], label=p["label"])
        if panel.get("base"):
            ax.plot(panel["base"]["x"], panel["base"]["y"], marker="*", markersize=14, color="black",
                    linestyle="none", label="base model")
        ax.set_title(panel["title"])
        _axes(ax, xlabel, ylabel)
        ax.legend(fontsize="small")
    return _png(fig)


def frontiers(lines: list[dict], colour: dict[str, str], base: dict | None, xlabel: str, ylabel: str,
              others: list[dict] = ()) -> bytes:
    """Each method's sweep as a line through its points (sorted by the knob), labelled with the knob values, and
    the methods without a sweep as single points beside them.

    lines: [{"label", "knob", "points": [{"value", "x", "y", "xerr", "yerr"}]}]; others: [{"label", "x", "y",
    "xerr", "yerr"}] (percent).
    """
    fig, axes = _figure(1, height=4.5, width=7.5)
    ax = axes[0]
    styles = ("-", "--", ":", "-.")
    for i, line in enumerate(lines):
        pts = [p for p in line["points"] if p["x"] is not None and p["y"] is not None]
        if not pts:
            continue
        ax.errorbar([p["x"] for p in pts], [p["y"] for p in pts], xerr=[p["xerr"] or 0 for p in pts],
                    yerr=[p["yerr"] or 0 for p in pts], marker="o", capsize=2, color=colour[line["label"]],
                    linestyle=styles[i % len(styles)], label=f"{line['label']} ({line['knob']})")
        for p in pts:
            ax.annotate(f"{p['value']:g}" if isinstance(p["value"], float) else str(p["value"]), (p["x"], p["y"]),
                        textcoords="offset points", xytext=(4, 4), fontsize="x-small", color=colour[line["label"]])
    for p in others:
        ax.errorbar([p["x"]], [p["y"]], xerr=[p["xerr"] or 0], yerr=[p["yerr"] or 0], marker="s", capsize=2,
                    color=colour[p["label"]], linestyle="none", label=p["label"])
    if base:
        ax.plot(base["x"], base["y"], marker="*", markersize=14, color="black", linestyle="none", label="base model")
    ax.set_title("sweep frontiers: lower is safer at the same accuracy")
    _axes(ax, xlabel, ylabel)
    ax.legend(fontsize="small")
    return _png(fig)


def step_curves(panels: list[dict], colour: dict[str, str], xlabel: str = "optimiser step") -> bytes:
    """Per panel, one line per method over optimiser steps, or any other x (mean over seeds, band = +- spread).

    panels: [{"title", "ylabel", "series": {label: {"steps", "mean", "std"}}}] ("steps": the x values).
    """
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        for label, s in panel["series"].items():
            steps, mean, std = (np.asarray(s[k], dtype=float) for k in ("steps", "mean", "std"))
            ax.plot(steps, mean, color=colour[label], label=label, marker="." if len(steps) < 30 else None)
            if np.any(std > 0):
                ax.fill_between(steps, mean - std, mean + std, color=colour[label], alpha=0.2, linewidth=0)
        ax.set_title(panel["title"])
        if xlabel == "optimiser step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _axes(ax, xlabel, panel["ylabel"])
        if panel["series"]:
            ax.legend(fontsize="small")
    return _png(fig)


def layer_heatmaps(maps: dict[str, dict]) -> bytes:
    """Per method, cos(useful gradient, harmful-answer gradient) by decoder layer (rows) and step (columns).

    maps: {label: {"steps": [...], "cos": [[layer 0 over steps], [layer 1 ...], ...]}}; one colour scale, -1..1.
    """
    fig, axes = _figure(len(maps), height=3.8)
    image = None
    for ax, (label, m) in zip(axes, maps.items()):
        matrix = np.asarray(m["cos"], dtype=float)
        steps = m["steps"]
        image = ax.imshow(matrix, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1,
                          interpolation="nearest")
        ticks = np.linspace(0, len(steps) - 1, num=min(len(steps), 6)).round().astype(int)
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("decoder layer")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="cos(useful grad, harmful grad)", shrink=0.9)
    return _png(fig)
