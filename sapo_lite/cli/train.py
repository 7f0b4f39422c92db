"""`sapo-lite train`, `presets` and `estimate`: everything before and during a run."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..config.schema import RESUMABLE_KEYS, SPLIT_KEYS, Config, to_yaml
from ..config.sources import describe_sources, load_config, parse_override, preset_names, read_preset
from ..errors import ConfigError, RunDirError, SapoError, storage_error
from ..run.folders import check_writable_dir, make_dir, remove_unstarted_run
from ..run.layout import RunDir
from ..run.lock import RunLock, clear_run, is_sapo_run, never_started
from ..train.signals import TerminateAsInterrupt, console_survives_pipe
from .common import app, console, quiet_libraries, reports_errors


def prepare_run_dir(out: Path, overwrite: bool) -> tuple[RunLock, Path | None]:
    """Refuse to write into an existing non-empty folder unless --overwrite; hold the run's lock.

    Also returns the topmost folder this call created, so a run that never starts removes it again.
    """
    if out.exists() and not out.is_dir():
        raise RunDirError(f"`{out}` exists and is not a folder", "choose another --out")
    check_writable_dir(out, "--out")
    if not (out.is_dir() and any(out.iterdir())):
        created = make_dir(out, "--out")
        return RunLock(out).acquire(), created
    if not is_sapo_run(out):  # --overwrite deletes sapo-lite runs, never other folders
        if overwrite:
            raise RunDirError(f"`{out}` is not empty and is not a sapo-lite run: refusing to delete it",
                              "choose another --out")
        raise RunDirError(f"`{out}` already exists and is not a sapo-lite run", "choose another --out")
    lock = RunLock(out).acquire()  # before deleting anything: another process may be training it
    if not overwrite:
        lock.release()
        if never_started(out):
            raise RunDirError(f"run directory `{out}` was stopped before training started",
                              "pass --overwrite to start it again")
        raise RunDirError(
            f"run directory `{out}` already exists",
            f"continue it with `sapo-lite train --resume {out}`, choose another --out, "
            "or pass --overwrite to delete it and start again",
        )
    try:
        clear_run(out)
    except BaseException:
        lock.release()
        raise
    return lock, None


def lock_existing_run(run_dir: Path) -> RunLock:
    """The lock of a run to resume, taken before its checkpoints are read."""
    if run_dir.is_dir() and never_started(run_dir):
        raise RunDirError(f"`{run_dir}` was stopped before training started: there is nothing to resume",
                          f"start it again with `sapo-lite train --out {run_dir} --overwrite` (and your options)")
    RunDir(run_dir).require_run()
    return RunLock(run_dir).acquire()


def describe_plan(cfg: Config, out: Path) -> str:
    t, s = cfg.train, cfg.sapo
    if cfg.loss.name == "sft":  # no rewrites, no pairs, no buffer: the chosen responses alone
        return (
            f"would train `{cfg.lora.target_modules}` LoRA r={cfg.lora.r} adapter (policy) on {cfg.model.name} "
            f"({cfg.model.quant}) with SFT for {t.max_steps} steps: {s.gen_per_step} new examples/step from "
            f"{cfg.data.path}, {t.micro_batch * t.grad_accum} trained a step on their responses (nothing generated); "
            f"run directory {out}"
        )
    pairs_per_step = t.micro_batch * t.grad_accum
    new_pairs = f"{s.gen_per_step} new pairs/step" if s.generate_every == 1 else (
        f"{s.gen_per_step} new pairs every {s.generate_every} steps")
    return (
        f"would train `{cfg.lora.target_modules}` LoRA r={cfg.lora.r} adapters (policy + ema) on "
        f"{cfg.model.name} ({cfg.model.quant}) with {cfg.loss.name.upper()} for {t.max_steps} steps: "
        f"{new_pairs} from {cfg.data.path}, {pairs_per_step} pairs/step drawn from a "
        f"{s.buffer_size}-pair buffer; run directory {out}"
    )


@app.command()
@reports_errors
def train(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Config overrides as KEY=VALUE, e.g. loss.name=orpo train.max_steps=50")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Preset name (see `sapo-lite presets`); default tiny")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file applied over the preset, or over the built-in defaults "
                                  "when --preset is not given")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/PRESET)")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue this run from its newest complete checkpoint, with its own config. "
                     f"Overrides allowed then: {', '.join(sorted(RESUMABLE_KEYS))}"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and plan only")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run directory first")] = False,
) -> None:
    """Train a LoRA policy with SAPO: the EMA adapter writes the rejected responses.

    Settings: the preset (tiny when neither --preset nor --config is given), then --config, then
    KEY=VALUE. --config without --preset applies the file over the built-in defaults, no preset.
    """
    with console_survives_pipe():  # `train ... | tee log` and Ctrl-C: tee dies first, the run still checkpoints
        _train(overrides, preset, config, out, resume, dry_run, overwrite)


def _train(overrides: list[str] | None, preset: str | None, config: Path | None, out: Path | None,
           resume: Path | None, dry_run: bool, overwrite: bool) -> None:
    if resume is not None and overwrite:
        raise ConfigError("--resume continues a run and --overwrite would delete it: pick one",
                          f"drop --overwrite to continue `{resume}`, or drop --resume to start it again")
    from ..train.distributed import start_processes

    processes = start_processes()  # one process, or this rank under `accelerate launch` / `torchrun`
    console.quiet = not processes.is_main  # rank 0 speaks for all
    lock = created = None
    if resume is not None:
        lock = None if dry_run or not processes.is_main else lock_existing_run(resume)
        try:
            cfg, out = resume_config(resume, preset, config, out, overrides or [])
        except BaseException:
            if lock is not None:
                lock.release()  # the process may go on (tests, notebooks): never keep a run locked
            raise
    else:
        preset = preset or ("tiny" if config is None else None)
        cfg = load_config(preset, config, overrides or [])
        out = out or Path("runs") / (preset or (config.stem if config else "run"))
        from ..train.preflight import check_before_loading
        from ..train.resolve_files import resolve_with_files, user_set_keys

        resolve_with_files(cfg, user_set_keys(config, overrides or []))  # stage two's data, a preset's val_size
        check_before_loading(cfg)  # what the files can tell, before the model loads
    console.print(f"config: {describe_sources(preset, config, overrides or [], resume)}", highlight=False)
    for key, note in cfg.notes.items():  # what resolving the config changed, and why
        section, name = key.split(".")
        console.print(f"config: {key}={getattr(getattr(cfg, section), name)} ({note})", highlight=False, markup=False)
    if dry_run:
        console.print(to_yaml(cfg), highlight=False, markup=False)
        console.print(describe_plan(cfg, out), highlight=False)
        return
    if resume is None:
        with processes.main_first():
            if processes.is_main:  # rank 0 alone holds the run's lock and writes its folder
                lock, created = prepare_run_dir(out, overwrite)
    try:
        with lock or contextlib.nullcontext(), TerminateAsInterrupt():
            quiet_libraries()
            from ..train.loop import train as run_training

            result = run_training(cfg, out, console, resume=resume is not None)
    except BaseException as exc:
        metrics = RunDir(out).metrics
        started = resume is not None or (metrics.is_file() and metrics.stat().st_size > 0)
        if not started and processes.is_main:
            remove_unstarted_run(out, created)  # it never trained: leave nothing to trip over next time
        if not isinstance(exc, (SapoError, KeyboardInterrupt, OSError, sqlite3.Error, RuntimeError)):
            raise
        if isinstance(exc, KeyboardInterrupt) and started:
            raise SapoError("interrupted before the run finished",
                            f"resume from the last checkpoint: sapo-lite train --resume {out}") from None
        if not isinstance(exc, (SapoError, KeyboardInterrupt)):  # a file-system failure becomes one line
            error = storage_error(exc, getattr(exc, "filename", None) or out, out if started else None)
            if error is not None:
                raise error from exc
        raise
    if result.stopped_early:
        return
    console.print(f"done in {result.wall_s:.0f}s: adapters in {out / 'adapters'}/policy and /ema")
    if result.eval_before is not None and result.eval_after is not None:
        console.print(
            f"[bold]held-out {result.eval_metric}: base {result.eval_before:.1%} -> policy {result.eval_after:.1%}[/]"
        )
    summary = _summary(out)
    if summary.get("eval_nll_base") is not None and summary.get("eval_nll_policy") is not None:
        console.print(f"[bold]held-out NLL of the reference responses: base {summary['eval_nll_base']:.3f} -> policy "
                      f"{summary['eval_nll_policy']:.3f}[/] (per token, lower is better)", highlight=False)
    if summary.get("adapter") == "best":
        console.print(f"use the best adapter: {out / 'adapters' / 'best'}, the policy of step {summary['best_step']}, "
                      f"the best by {summary['best_metric']} on the validation split (`--adapter best` in eval, "
                      "generate and merge)", highlight=False)


def _summary(run_dir: Path) -> dict:
    import json

    try:
        summary = json.loads(RunDir(run_dir).summary.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def resume_config(
    run_dir: Path, preset: str | None, config: Path | None, out: Path | None, overrides: list[str]
) -> tuple[Config, Path]:
    """The run's own config plus the few overrides that are safe mid-run."""
    if preset or config or (out and out != run_dir):
        raise ConfigError("--resume continues a run with its own config", "drop --preset, --config and --out")
    from ..train.checkpoint import latest_checkpoint
    from ..train.data_split import check_split_keys
    from ..train.finish import run_is_finished

    checkpoint = latest_checkpoint(run_dir)  # fail before loading anything when there is nothing to resume
    from ..train.distributed import start_processes

    start_processes().check_resumable(checkpoint.processes, run_dir)
    for text in overrides:
        key, _ = parse_override(text)
        if key not in RESUMABLE_KEYS and key not in SPLIT_KEYS:  # a split key may repeat its value, not change it
            raise ConfigError(
                f"`{key}` cannot change when resuming (it would change what the checkpoint means)",
                f"keys that can: {', '.join(sorted(RESUMABLE_KEYS))}; or start a new run with --out",
            )
    cfg = load_config(None, RunDir(run_dir).config, overrides)
    check_split_keys(run_dir, cfg)  # the data split is decided once, when the run starts
    if checkpoint.step >= cfg.train.max_steps and run_is_finished(run_dir, checkpoint.step):
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
    preset: Annotated[str | None, typer.Option(help="Preset name (default llama3-8b-qlora, unless --config)")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file over the preset, or over the defaults without one")
    ] = None,
    gpu_gb: Annotated[float, typer.Option("--gpu-gb", help="Memory of your GPU in GB")] = 24.0,
) -> None:
    """Estimate the memory a run needs on each GPU, term by term, and whether it fits your card."""
    from ..models.memory_estimate import architecture, fit_advice
    from ..models.memory_estimate import estimate as estimate_memory

    if gpu_gb <= 0:
        raise ConfigError(f"--gpu-gb {gpu_gb:g} is not a GPU size", "give your GPU's memory in GB, e.g. --gpu-gb 24")
    preset = preset or (None if config else "llama3-8b-qlora")
    cfg = load_config(preset, config, overrides or [])
    arch = architecture(cfg.model.name)
    result = estimate_memory(cfg, arch)
    table = Table("term", "GB", title=f"{cfg.model.name} ({cfg.model.quant}), {cfg.loss.name}, "
                  f"max_len {cfg.data.max_len}, micro_batch {cfg.train.micro_batch}")
    for name, value in result.rows():
        table.add_row(name, f"{value:.2f}")
    table.add_row("[bold]estimated peak per GPU[/]", f"[bold]{result.total:.2f}[/]")
    console.print(table)
    if cfg.model.gradient_checkpointing:
        console.print(f"activations without gradient checkpointing would be "
                      f"{result.activations_without_checkpointing:.1f} GB", highlight=False)
    console.print("generation (KV cache), the reference forward and backward never overlap, "
                  "so the peak counts the largest")
    console.print("the estimate is per GPU: with N processes (accelerate launch) each GPU holds its own base, "
                  "adapters and batch, so each needs this much; N cards do not make a model fit that one cannot",
                  highlight=False)
    if result.total <= gpu_gb:
        console.print(f"[bold]fits[/] a {gpu_gb:g} GB GPU ({gpu_gb - result.total:.1f} GB to spare)", highlight=False)
    else:
        console.print(f"[bold]does not fit[/] a {gpu_gb:g} GB GPU (needs {result.total - gpu_gb:.1f} GB more)",
                      highlight=False)
        console.print(fit_advice(cfg, arch, gpu_gb), highlight=False)
