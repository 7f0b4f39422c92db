"""One PNG with the curves a preference-tuning user watches, from RUN/metrics.jsonl; with a validation split,
a third row with its figures, a point a pass, and the best step (RUN/adapters/best) marked.

Works on a run that is still going: a half-written last line is skipped. matplotlib is an
optional extra (`pip install "sapo-lite[plot]"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RunDirError, SapoError
from ..run.layout import RunDir
from ..run.records import read_metrics

PANELS = (
    ("loss", ["loss"], "loss"),
    ("reward margin", ["rewards/margins"], "chosen - rejected reward"),
    ("preference accuracy", ["rewards/accuracies"], "share of pairs with chosen > rejected"),
    ("log-probs", ["logps/chosen", "logps/rejected"], "summed response log-prob"),
    ("learning rate", ["lr"], "lr"),
    ("generation share of the step", ["gen_share"], "share of step time"),
    ("buffer fill", ["buffer_fill"], "pairs / capacity"),
    ("pairs without a signal", ["pairs/identical", "pairs/cut_off"], "share"),
)
# Legends where a panel's curves are shares of different sets (docs/run-directory.md).
LEGENDS = {"pairs/identical": "identical (of the step's new rewrites)",
           "pairs/cut_off": "cut off (of the pairs in the buffer)"}
NOISY = {"loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "gen_share",
         "pairs/identical", "pairs/cut_off"}


def read_records(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise RunDirError(f"`{run_dir}` has no metrics.jsonl yet", "point at a run directory that has trained a step")
    records = read_metrics(path)
    if not records:
        raise RunDirError(f"`{path}` has no complete step yet", "wait for the first optimizer step")
    return records


def smoothing_window(steps: int) -> int:
    """Steps in the trailing mean: a tenth of the run, at least 5 (so 32 steps are smoothed too), at most 50."""
    return min(50, max(5, steps // 10))


def series(records: list[dict], key: str, buffer_capacity: int) -> np.ndarray:
    """The values a curve plots, one a step (NaN where a step logged none): metrics.jsonl's numbers as they are."""
    if key == "buffer_fill":
        return np.array([r.get("buffer_size", np.nan) for r in records], dtype=float) / buffer_capacity
    return np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)


def panel_keys(keys: list[str], records: list[dict]) -> list[str]:
    """A panel's keys, each followed by its per-origin split where the run logged one (`rewards/accuracies/data`
    beside `rewards/accuracies` in a `sapo.pairs=mix` run)."""
    logged = dict.fromkeys(k for r in records for k in r)
    return [k for key in keys for k in [key, *(name for name in logged if name.startswith(key + "/"))]]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps (NaN-aware), so the curve stays aligned with its steps."""
    out = np.empty_like(values)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        chunk = chunk[np.isfinite(chunk)]
        out[i] = chunk.mean() if len(chunk) else np.nan
    return out


VALIDATION_PANELS = (
    ("validation NLL (lower is better)", "val/nll", "chosen-response NLL per token"),
    ("validation preference accuracy", "val/accuracy", "share of validation pairs"),
    ("validation reward margin", "val/margin", "implicit reward margin"),
    ("validation constraints met", "val/constraints", "share of constraints"),
)


@dataclass
class PlotReport:
    """What the figure shows: for the line `plot` prints."""

    path: Path
    steps: int
    validation_passes: int = 0
    best_step: int | None = None


def validation_records(records: list[dict]) -> list[dict]:
    """The records of validation passes (step 0, before training, included)."""
    return [r for r in records if r.get("val/nll") is not None]


def plot_run(run_dir: Path, out: Path, buffer_capacity: int) -> PlotReport:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SapoError("plotting needs matplotlib, which is not installed",
                        'pip install "sapo-lite[plot]" (or pip install matplotlib)') from exc
    records = read_records(run_dir)
    validation = validation_records(records)
    records = [r for r in records if r["step"] > 0]  # step 0 is the validation pass before training, not a step
    steps = np.array([r["step"] for r in records])
    window = smoothing_window(len(records))
    rows = 3 if validation else 2
    fig, axes = plt.subplots(rows, 4, figsize=(18, 3.75 * rows), constrained_layout=True, squeeze=False)
    for ax, (title, keys, ylabel) in zip(axes.flat, PANELS):
        keys = panel_keys(keys, records)
        for key in keys:
            values = series(records, key, buffer_capacity)
            label = LEGENDS.get(key, key.split("/")[-1] if key.count("/") < 2 else f"{key.split('/')[-1]} pairs")
            label = label if len(keys) > 1 else None
            if key in NOISY or key.rpartition("/")[0] in NOISY:
                line = ax.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
                ax.plot(steps, smooth(values, window), color=line.get_color(), linewidth=1.8, label=label)
            else:
                ax.plot(steps, values, linewidth=1.8, label=label)
        _label(ax, title, ylabel, legend=len(keys) > 1)
    best_step = validation[-1].get("val/best_step") if validation else None
    if validation:
        _plot_validation(axes[2], validation, best_step)
    passes = f", {len(validation)} validation passes" if validation else ""
    fig.suptitle(f"{run_dir.name}: {len(records)} steps{passes} (faint: raw, solid: trailing mean over {window} "
                 "steps)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return PlotReport(out, len(records), len(validation), best_step)


def _plot_validation(axes: Any, validation: list[dict], best_step: int | None) -> None:
    """One panel a validation figure, a point a pass, and the step RUN/adapters/best was taken from."""
    steps = np.array([r["step"] for r in validation])
    for ax, (title, key, ylabel) in zip(axes, VALIDATION_PANELS):
        values = series(validation, key, 1)
        if not np.isfinite(values).any():
            ax.set_axis_off()  # a figure this run's data cannot give (constraints on data without them)
            continue
        ax.plot(steps, values, marker="o", linewidth=1.8)
        if best_step is not None:
            ax.axvline(best_step, color="tab:green", linestyle="--", linewidth=1.2,
                       label=f"best: step {best_step} (adapters/best)")
        _label(ax, title, ylabel, legend=best_step is not None)


def _label(ax: Any, title: str, ylabel: str, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
