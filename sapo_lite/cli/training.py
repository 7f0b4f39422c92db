"""`sapo-lite train`, `presets` and `estimate`: everything before and during a run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..checkpoint import latest_checkpoint
from ..config import RESUMABLE_KEYS, Config, to_yaml
from ..config_sources import load_config, parse_override, preset_names, read_preset
from ..errors import ConfigError, RunDirError, SapoError
from .common import app, console, quiet_libraries, reports_errors


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into an existing non-empty folder unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"`{out}` exists and is not a folder", "choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"run directory `{out}` already exists",
                f"continue it with `sapo-lite train --resume {out}`, choose another --out, "
                "or pass --overwrite to delete it and start again",
            )
        if not (out / "config.yaml").is_file():  # --overwrite deletes sapo-lite runs, never other folders
            raise RunDirError(f"`{out}` is not empty and is not a sapo-lite run: refusing to delete it",
                              "choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def describe_plan(cfg: Config, out: Path) -> str:
    t, s = cfg.train, cfg.sapo
    pairs_per_step = t.micro_batch * t.grad_accum
    return (
        f"would train `{cfg.lora.target_modules}` LoRA r={cfg.lora.r} adapters (policy + ema) on "
        f"{cfg.model.name} ({cfg.model.quant}) with {cfg.loss.name.upper()} for {t.max_steps} steps: "
        f"{s.gen_per_step} new pairs/step from {cfg.data.path}, {pairs_per_step} pairs/step drawn from a "
        f"{s.buffer_size}-pair buffer; run directory {out}"
    )


@app.command()
@reports_errors
def train(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Config overrides as KEY=VALUE, e.g. loss.name=orpo train.max_steps=50")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Preset name (see `sapo-lite presets`); default tiny")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file applied over the preset")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/PRESET)")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue this run from its newest complete checkpoint, with its own config. "
                     f"Overrides allowed then: {', '.join(sorted(RESUMABLE_KEYS))}"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and plan only")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run directory first")] = False,
) -> None:
    """Train a LoRA policy with SAPO: the EMA adapter writes the rejected responses."""
    if resume is not None:
        cfg, out = resume_config(resume, preset, config, out, overrides or [])
    else:
        preset = preset or ("tiny" if config is None else None)
        cfg = load_config(preset, config, overrides or [])
        out = out or Path("runs") / (preset or (config.stem if config else "run"))
    if dry_run:
        console.print(to_yaml(cfg), highlight=False, markup=False)
        console.print(describe_plan(cfg, out), highlight=False)
        return
    if resume is None:
        prepare_run_dir(out, overwrite)
    quiet_libraries()
    from ..trainer import train as run_training

    try:
        result = run_training(cfg, out, console, resume=resume is not None)
    except (SapoError, KeyboardInterrupt) as exc:
        started = (out / "metrics.jsonl").exists()
        if resume is None and not started:
            shutil.rmtree(out, ignore_errors=True)  # it never started: leave nothing to trip over next time
        if isinstance(exc, KeyboardInterrupt) and started:
            raise SapoError(
                "interrupted mid-step", f"resume from the last checkpoint: sapo-lite train --resume {out}"
            ) from None
        raise
    if result.stopped_early:
        return
    console.print(f"done in {result.wall_s:.0f}s: adapters in {out / 'adapters'}/policy and /ema")
    if result.eval_before is not None and result.eval_after is not None:
        console.print(
            f"[bold]held-out {result.eval_metric}: base {result.eval_before:.1%} -> policy {result.eval_after:.1%}[/]"
        )


def resume_config(
    run_dir: Path, preset: str | None, config: Path | None, out: Path | None, overrides: list[str]
) -> tuple[Config, Path]:
    """The run's own config plus the few overrides that are safe mid-run."""
    if preset or config or (out and out != run_dir):
        raise ConfigError("--resume continues a run with its own config", "drop --preset, --config and --out")
    checkpoint = latest_checkpoint(run_dir)  # fail before loading anything when there is nothing to resume
    for text in overrides:
        key, _ = parse_override(text)
        if key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"`{key}` cannot change when resuming (it would change what the checkpoint means)",
                f"keys that can: {', '.join(sorted(RESUMABLE_KEYS))}; or start a new run with --out",
            )
    cfg = load_config(None, run_dir / "config.yaml", overrides)
    if checkpoint.step >= cfg.train.max_steps:
        raise ConfigError(
            f"`{run_dir}` already finished its {checkpoint.step} steps",
            f"raise train.max_steps to continue, e.g. `sapo-lite train --resume {run_dir} "
            f"train.max_steps={2 * checkpoint.step}`",
        )
    return cfg, run_dir


@app.command()
@reports_errors
def presets(name: Annotated[str | None, typer.Argument(help="Show this preset in full")] = None) -> None:
    """List the presets, or show one."""
    if name:
        _, description = read_preset(name)
        console.print(f"# {name}: {description}", highlight=False, markup=False)
        console.print(to_yaml(load_config(name)), highlight=False, markup=False)
        return
    width = max(len(n) for n in preset_names())
    for preset_name in preset_names():
        _, description = read_preset(preset_name)
        console.print(f"[bold]{preset_name:<{width}}[/]  {description}", highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def estimate(
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides as KEY=VALUE")] = None,
    preset: Annotated[str, typer.Option(help="Preset name")] = "llama3-8b-qlora",
    config: Annotated[Path | None, typer.Option("--config", help="YAML file applied over the preset")] = None,
    gpu_gb: Annotated[float, typer.Option("--gpu-gb", help="Memory of your GPU in GB")] = 24.0,
) -> None:
    """Estimate the GPU memory a run needs, term by term, and whether it fits your card."""
    from ..memory import architecture, best_saving
    from ..memory import estimate as estimate_memory

    cfg = load_config(preset, config, overrides or [])
    arch = architecture(cfg.model.name)
    result = estimate_memory(cfg, arch)
    table = Table("term", "GB", title=f"{cfg.model.name} ({cfg.model.quant}), {cfg.loss.name}, "
                  f"max_len {cfg.data.max_len}, micro_batch {cfg.train.micro_batch}")
    for name, value in result.rows():
        table.add_row(name, f"{value:.2f}")
    table.add_row("[bold]estimated peak[/]", f"[bold]{result.total:.2f}[/]")
    console.print(table)
    console.print(
        f"activations without gradient checkpointing would be {result.activations_without_checkpointing:.1f} GB; "
        "generation (KV cache) and backward never overlap, so the peak counts the larger phase",
        highlight=False,
    )
    fits = result.total <= gpu_gb
    verdict = "fits" if fits else "does not fit"
    console.print(f"[bold]{verdict}[/] a {gpu_gb:g} GB GPU ({gpu_gb - result.total:+.1f} GB to spare)", highlight=False)
    if not fits:
        saving = best_saving(cfg, arch, gpu_gb)
        if saving:
            console.print(f"the change that helps most: {saving[0]} (saves {saving[1]:.1f} GB)", highlight=False)
