"""`sapo-lite merge` and `generate`: from a trained run to a model people can use and look at."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import ConfigError, RunDirError
from .common import app, console, parse_roles, quiet_libraries, reports_errors


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
    from ..models.roles import DTYPES
    from ..run.folders import check_merge_out, write_merge_marker
    from ..run.layout import RunDir
    from ..tools.merge import merge_adapter, resolve_base_dir

    if adapter not in ("policy", "ema"):
        raise ConfigError(f"--adapter {adapter} is not an adapter of a run", "use --adapter policy or --adapter ema")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not supported", f"use one of {', '.join(DTYPES)}")
    cfg = RunDir(run).read_config()
    adapter_dir = RunDir(run).adapter_to_load(adapter)
    check_merge_out(run, out, overwrite)
    quiet_libraries()  # bitsandbytes announces its optional CPU kernels when --nf4-roundtrip imports it
    base_dir = resolve_base_dir(RunDir(run).base_model_name(cfg))
    report = merge_adapter(
        base_dir, adapter_dir, out, dtype=dtype, roundtrip=nf4_roundtrip, double_quant=cfg.model.double_quant,
        on_shard=lambda shard: console.print(f"merged {shard}", highlight=False),
    )
    write_merge_marker(out, run, adapter, dtype)
    console.print(
        f"wrote {out}: {adapter} adapter ({adapter_dir}) folded into {report.merged_weights} weights of "
        f"{base_dir} in {dtype}{' after an NF4 round trip' if nf4_roundtrip else ''}, {report.shards} shard(s)",
        highlight=False,
    )


@app.command()
@reports_errors
def generate(
    run: Annotated[Path, typer.Argument(help="Run directory (the --out of `sapo-lite train`), or a model folder "
                                        "such as a `merge` output")],
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt; repeat for several")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="A file with one prompt a line")] = None,
    adapter: Annotated[str | None, typer.Option(help="A run's roles side by side, from base, policy, ema "
                                                     "(default all three)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding, else sampling temperature")] = 0.0,
) -> None:
    """Answer prompts with the base and the run's adapters, side by side.

    Given a plain model folder instead (a merged model, any folder with config.json), it answers with that
    model alone, in the chat template the folder carries.
    """
    prompts = list(prompt or [])
    if any(not text.strip() for text in prompts):
        raise ConfigError("--prompt is empty", "give the text to answer, e.g. --prompt \"What is 2 + 2?\"")
    if prompts_file is not None:
        if prompts_file.is_dir():
            raise ConfigError(f"--prompts-file `{prompts_file}` is a folder", "pass a text file with one prompt a line")
        if not prompts_file.is_file():
            raise ConfigError(f"prompts file `{prompts_file}` does not exist")
        prompts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt given", "pass --prompt TEXT or --prompts-file FILE")
    if max_new_tokens < 1 or temperature < 0:
        raise ConfigError("--max-new-tokens must be >= 1 and --temperature >= 0")
    from ..run.layout import RunDir
    from ..tools.open_run import is_model_folder

    plain = is_model_folder(run)
    if not plain and not RunDir(run).is_run():
        raise RunDirError(f"`{run}` is neither a sapo-lite run (no config.yaml) nor a model folder (no config.json)",
                          "pass the --out folder of `sapo-lite train`, or a model folder such as `sapo-lite merge`'s")
    if plain and adapter is not None:
        raise ConfigError(f"`{run}` is a model folder, not a run: it has no adapters to pick with --adapter",
                          "drop --adapter: the folder answers as one model")
    roles = ["answer"] if plain else parse_roles(adapter or "base,policy,ema")
    quiet_libraries()
    from ..models.generation import generate_answers
    from ..models.roles import acting_as
    from ..tools.open_run import open_model_folder, open_run

    loaded = open_model_folder(run) if plain else open_run(run, roles)
    prompt_ids = [loaded.prompt_ids(text) for text in prompts]
    answers = {}
    for role in roles:
        with contextlib.nullcontext() if plain else acting_as(loaded.model, role):
            answers[role] = generate_answers(
                loaded.model, loaded.tokenizer, prompt_ids, max_new_tokens, loaded.stop_ids, temperature
            )
    table = Table("prompt", *roles, show_lines=True)
    for row, text in enumerate(prompts):
        table.add_row(text, *(answers[role][row] for role in roles))
    console.print(table)
