"""What a run reports: one JSON line per optimizer step and a rich progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..run.layout import RunDir
from ..run.records import finite_or_none


class MetricsWriter:
    """Appends one JSON object per optimizer step to RUN/metrics.jsonl, flushed at once.

    With several processes only rank 0 writes (`enabled=False` elsewhere), the figures already
    averaged over ranks.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        from ..errors import writing

        with writing(self.path, self.path.parent):
            self._file.write(json.dumps(finite_or_none(record)) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class StepTotals:
    """Sums over the micro-batches of one optimizer step, reported as means.

    The sums stay on the device until `means()`: one GPU sync per step instead of one per value.
    """

    KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")

    def __init__(self, origins: tuple[str, ...] = ()) -> None:
        self.sums: torch.Tensor | None = None
        self.keys = self.KEYS
        self.count = 0
        self.tokens = 0
        self._means: dict[str, float] | None = None
        # A run mixing sources (`sapo.pairs=mix`) also reports margin and accuracy per origin of the drawn pairs:
        # origin -> [margin sum, accuracy sum, pairs] (a step that drew none of an origin reports NaN for it).
        self.origins = origins
        self._by_origin: dict[str, list[torch.Tensor | float]] = {o: [0.0, 0.0, 0] for o in origins}

    def add(self, out: Any, logps: Any, batch: Any) -> None:
        if out.chosen_rewards is None:  # a loss without rejected responses (SFT): loss and chosen log-prob only
            self.keys = ("loss", "logps/chosen")
            values = torch.stack([out.loss.detach().float().sum(), logps.policy_chosen.detach().float().sum()])
        else:
            values = torch.stack([
                out.loss.detach().float().sum(),
                out.chosen_rewards.float().sum(),
                out.rejected_rewards.float().sum(),
                (out.chosen_rewards - out.rejected_rewards).float().sum(),
                (out.chosen_rewards > out.rejected_rewards).float().sum(),
                logps.policy_chosen.detach().float().sum(),
                logps.policy_rejected.detach().float().sum(),
            ])
        self.sums = values if self.sums is None else self.sums + values
        if self.origins and out.chosen_rewards is not None:
            margins = (out.chosen_rewards - out.rejected_rewards).float()
            for origin, sums in self._by_origin.items():
                mask = torch.tensor([p.origin == origin for p in batch], device=margins.device)
                sums[0] = sums[0] + margins[mask].sum()
                sums[1] = sums[1] + (margins[mask] > 0).float().sum()
                sums[2] += int(mask.sum())
        self.count += len(batch)
        self.tokens += sum(len(p.chosen_ids) + len(p.rejected_ids) for p in batch)

    def means(self) -> dict[str, float]:
        if self._means is None:
            self._means = dict(zip(self.keys, (self.sums / self.count).tolist()))
            for origin, (margin, accuracy, pairs) in self._by_origin.items():
                self._means[f"rewards/margins/{origin}"] = float(margin / pairs) if pairs else math.nan
                self._means[f"rewards/accuracies/{origin}"] = float(accuracy / pairs) if pairs else math.nan
        return self._means


class TrainProgress:
    """A live progress bar with loss, reward margin and step time on a terminal; when the output
    goes to a file (nohup, a job log) the bar cannot redraw, so a plain line every `log_every_s`."""

    def __init__(self, console: Console, total_steps: int, start_step: int = 0, log_every_s: float = 30.0) -> None:
        self._console = console
        self._total = total_steps
        self._log_every_s = log_every_s
        self._last_line = time.monotonic()
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, record: dict[str, Any]) -> None:
        stats = f"loss {record['loss']:.4f}  "
        if "rewards/margins" in record:  # absent for losses without rejected responses (SFT)
            stats += f"margin {record['rewards/margins']:+.3f}  acc {record['rewards/accuracies']:.2f}  "
        stats += f"{record['step_s']:.2f}s/step"
        if "val/nll" in record:  # a validation step
            shown = "constraints" if "val/constraints" in record else "nll"
            stats += f"  val {shown} {record['val/' + shown]:.3f} (best: step {record['val/best_step']})"
        self._progress.update(self._task, completed=record["step"], stats=stats)
        now = time.monotonic()
        if not self._console.is_terminal and (now - self._last_line >= self._log_every_s
                                              or record["step"] in (1, self._total)):
            self._console.print(f"step {record['step']}/{self._total}  {stats}", highlight=False)
            self._last_line = now


class Reporter:
    """Where metrics go besides metrics.jsonl: nowhere, TensorBoard or Weights & Biases."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_samples(self, step: int, samples: list[tuple[str, str, str]]) -> None:
        """(prompt, chosen, rejected) texts: what the model is being taught to prefer and to avoid."""

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(RunDir(run_dir).tensorboard))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def log_samples(self, step: int, samples: list[tuple[str, str, str]]) -> None:
        rows = ["| prompt | chosen | rejected |", "|---|---|---|"]
        rows += ["| " + " | ".join(_cell(text) for text in sample) + " |" for sample in samples]
        self.writer.add_text("samples", "\n".join(rows), step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="sapo-lite", name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_samples(self, step: int, samples: list[tuple[str, str, str]]) -> None:
        table = self.wandb.Table(columns=["prompt", "chosen", "rejected"], data=[list(s) for s in samples])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_reporter(kind: str, run_dir: Path, config: dict[str, Any]) -> Reporter:
    """The reporter for `train.report_to`; its package is imported only when chosen."""
    from ..errors import ConfigError

    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    if kind == "none":
        return Reporter()
    try:
        return TensorBoardReporter(run_dir) if kind == "tensorboard" else WandbReporter(run_dir, config)
    except ImportError as exc:
        raise ConfigError(
            f"train.report_to={kind} needs the `{packages[kind]}` package, which is not installed",
            f'pip install "sapo-lite[{kind}]", or set train.report_to=none',
        ) from exc


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:500]
