"""The `sapo-lite` command. Thin: parse, call the library, turn SapoError into one line + exit 1."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .checkpoint import latest_checkpoint
from .config import RESUMABLE_KEYS, Config, load_config, parse_override, preset_names, read_preset, to_yaml
from .errors import ConfigError, RunDirError, SapoError

app = typer.Typer(
    help="Self-Augmented Preference Optimization (SAPO) with LoRA on a 4-bit base.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)  # a line is never broken by the terminal width: logs stay greppable
err_console = Console(stderr=True, soft_wrap=True)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a SapoError as `error: ...` (+ `hint: ...`) and exit 1; SAPO_DEBUG=1 keeps the traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SapoError as exc:
            if os.environ.get("SAPO_DEBUG") == "1":
                raise
            err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
            if exc.hint:
                err_console.print(f"[bold]hint:[/] {exc.hint}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def quiet_libraries() -> None:
    """Keep the terminal for sapo-lite's own output: no library progress bars or deprecation chatter."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    # bitsandbytes' CPU 4-bit matmul backprops through an op without a registered autograd
    # kernel; the gradients are right (tests/test_nf4.py compares them with the dense model).
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels package notice
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


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
    from .trainer import train as run_training

    try:
        result = run_training(cfg, out, console, resume=resume is not None)
    except SapoError:
        if resume is None and not (out / "metrics.jsonl").exists():
            shutil.rmtree(out, ignore_errors=True)  # it never started: leave nothing to trip over next time
        raise
    if result.stopped_early:
        return
    console.print(f"done in {result.wall_s:.0f}s: adapters in {out / 'adapters'}/policy and /ema")
    if result.eval_before is not None and result.eval_after is not None:
        console.print(
            f"[bold]held-out exact match: base {result.eval_before:.1%} -> policy {result.eval_after:.1%}[/]"
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
    from .memory import architecture, best_saving
    from .memory import estimate as estimate_memory

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


@app.command()
@reports_errors
def merge(
    run: Annotated[Path, typer.Argument(help="Run directory (the --out of `sapo-lite train`)")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged model")],
    adapter: Annotated[str, typer.Option(help="Adapter to merge: policy or ema")] = "policy",
    dtype: Annotated[str, typer.Option(help="Weights dtype: bf16, fp16 or fp32")] = "bf16",
    nf4_roundtrip: Annotated[
        bool, typer.Option("--nf4-roundtrip", help="Merge into dequantize(quantize_nf4(W)), the weights training saw")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder")] = False,
) -> None:
    """Fold an adapter into a full-precision copy of the base: a plain Hugging Face model folder.

    Works shard by shard: peak RAM about twice the largest base shard plus the adapter (about
    10 GB for Llama-3-8B's 5 GB shards, so 32 GB of RAM is plenty); disk about the model's size
    at --dtype (16 GB for an 8B model in bf16).
    """
    from .export import DTYPES, merge_adapter, resolve_base_dir, run_adapter_dir
    from .runs import base_model_name, run_config

    if adapter not in ("policy", "ema"):
        raise ConfigError(f"--adapter {adapter} is not an adapter of a run", "use --adapter policy or --adapter ema")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not supported", f"use one of {', '.join(DTYPES)}")
    cfg = run_config(run)
    adapter_dir = run_adapter_dir(run, adapter)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"`{out}` already exists", "choose another --out, or pass --overwrite to replace it")
    base_dir = resolve_base_dir(base_model_name(cfg, run))
    report = merge_adapter(
        base_dir, adapter_dir, out, dtype=dtype, roundtrip=nf4_roundtrip, double_quant=cfg.model.double_quant,
        on_shard=lambda shard: console.print(f"merged {shard}", highlight=False),
    )
    console.print(
        f"wrote {out}: {adapter} adapter ({adapter_dir}) folded into {report.merged_weights} weights of "
        f"{base_dir} in {dtype}{' after an NF4 round trip' if nf4_roundtrip else ''}, {report.shards} shard(s)",
        highlight=False,
    )


@app.command()
@reports_errors
def generate(
    run: Annotated[Path, typer.Argument(help="Run directory (the --out of `sapo-lite train`)")],
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt; repeat for several")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="A file with one prompt a line")] = None,
    adapter: Annotated[str, typer.Option(help="Roles side by side, from base, policy, ema")] = "base,policy,ema",
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding, else sampling temperature")] = 0.0,
) -> None:
    """Answer prompts with the base and the run's adapters, side by side."""
    prompts = list(prompt or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise ConfigError(f"prompts file `{prompts_file}` does not exist")
        prompts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt given", "pass --prompt TEXT or --prompts-file FILE")
    roles = [r.strip() for r in adapter.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ("base", "policy", "ema")]
    if unknown or not roles:
        raise ConfigError(f"unknown role `{', '.join(unknown) or adapter}`", "--adapter takes base, policy and ema")
    if max_new_tokens < 1 or temperature < 0:
        raise ConfigError("--max-new-tokens must be >= 1 and --temperature >= 0")
    quiet_libraries()
    from .evaluate import generate_answers, using_role
    from .runs import open_run

    loaded = open_run(run, roles)
    prompt_ids = [loaded.prompt_ids(text) for text in prompts]
    answers = {}
    for role in roles:
        with using_role(loaded.model, role):
            answers[role] = generate_answers(
                loaded.model, loaded.tokenizer, prompt_ids, max_new_tokens, loaded.stop_ids, temperature
            )
    table = Table("prompt", *roles, show_lines=True)
    for row, text in enumerate(prompts):
        table.add_row(text, *(answers[role][row] for role in roles))
    console.print(table)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
