"""`sapo-lite merge` and `generate`: from a trained run to a model people can use and look at
(a Hugging Face folder, or one GGUF file for llama.cpp and Ollama)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import ConfigError, RunDirError
from .common import ADAPTERS, app, console, parse_roles, quiet_libraries, reports_errors, roles_for, run_and_adapter

FORMATS = ("hf", "gguf")


@app.command()
@reports_errors
def merge(
    run: Annotated[Path, typer.Argument(help="Run directory (the --out of `sapo-lite train`), or one of its adapters "
                                        "(RUN/adapters/best)")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged model, or FILE.gguf for one GGUF file")],
    output_format: Annotated[
        str | None, typer.Option("--format", help="hf (a model folder) or gguf (llama.cpp, Ollama); a --out "
                                 "ending in .gguf means gguf")
    ] = None,
    quant: Annotated[
        str | None, typer.Option(help="GGUF weights: f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 or f32 (default: "
                                 "the one the file name says, e.g. model.q4_0.gguf, else q8_0)")
    ] = None,
    adapter: Annotated[
        str | None, typer.Option(help="Adapter to merge: policy (default), ema, or best (the best validation step's); "
                                 "RUN/adapters/NAME as the run names it too")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Folder weights: bf16, fp16 or fp32 (default: the precision the base's weights "
                                 "are stored in, e.g. bf16 for Llama-3-8B, fp32 for a GGUF or tiny base)")
    ] = None,
    nf4_roundtrip: Annotated[
        bool, typer.Option("--nf4-roundtrip", help="Merge into dequantize(quantize_nf4(W)), the weights training saw")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out")] = False,
) -> None:
    """Fold an adapter into a copy of the base, never its 4-bit form: a Hugging Face model folder, or one GGUF file.

    The folder keeps the precision the base is stored in unless --dtype says otherwise.

    The folder is written shard by shard: peak RAM about twice the largest base shard plus the
    adapter (about 10 GB for Llama-3-8B's 5 GB shards); disk about the model's size at --dtype. The
    GGUF file (with --out FILE.gguf) is streamed a block of rows at a time, with the chat template
    and stop tokens training used and an Ollama Modelfile beside it (FILE.Modelfile).
    """
    chosen = output_format or ("gguf" if out.suffix.lower() == ".gguf" else "hf")
    if chosen not in FORMATS:
        raise ConfigError(f"--format {output_format} is not a format merge writes", "use --format hf or --format gguf")
    run, named = run_and_adapter(run)
    if named is not None and adapter not in (None, named):
        raise ConfigError(f"`{run}/adapters/{named}` is the {named} adapter, but --adapter says {adapter}",
                          f"drop --adapter, or pass the run `{run}` with --adapter {adapter}")
    adapter = adapter or named or "policy"
    if adapter not in ADAPTERS:
        raise ConfigError(f"--adapter {adapter} is not an adapter of a run",
                          f"use --adapter {', '.join(ADAPTERS[:-1])} or {ADAPTERS[-1]}")
    if chosen == "gguf":
        _export_gguf(run, out, quant, adapter, dtype, nf4_roundtrip, overwrite)
        return
    if out.suffix.lower() == ".gguf":
        raise ConfigError(f"--out `{out}` names a GGUF file, but --format hf writes a folder",
                          "leave out --format hf to write GGUF, or give --out a folder name such as merged/")
    if quant is not None:
        raise ConfigError("--quant is for GGUF files (--format gguf)", "a model folder takes --dtype bf16|fp16|fp32")
    _merge_folder(run, out, adapter, dtype, nf4_roundtrip, overwrite)


def _merge_folder(run: Path, out: Path, adapter: str, dtype: str | None, nf4_roundtrip: bool,
                  overwrite: bool) -> None:
    from ..data.examples import install_chat_template, stop_token_ids
    from ..models.roles import DTYPES, load_tokenizer
    from ..run.folders import check_merge_out, write_merge_marker
    from ..run.layout import RunDir
    from ..tools.merge import base_precision, merge_adapter, resolve_base_dir

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not supported", f"use one of {', '.join(DTYPES)}")
    cfg = RunDir(run).read_config()
    adapter_dir = RunDir(run).adapter_to_load(adapter)
    check_merge_out(run, out, overwrite)
    quiet_libraries()  # bitsandbytes announces its optional CPU kernels when --nf4-roundtrip imports it
    base_dir = resolve_base_dir(RunDir(run).base_model_name(cfg))
    precision = f"{dtype} (--dtype)" if dtype else None
    if dtype is None:
        dtype = base_precision(base_dir)
        precision = f"{dtype}, the precision the base is stored in"
    tokenizer = load_tokenizer(str(base_dir), cfg.model.trust_remote_code)
    install_chat_template(tokenizer, cfg.data.chat_template)  # the template training rendered with
    report = merge_adapter(
        base_dir, adapter_dir, out, dtype=dtype, roundtrip=nf4_roundtrip, double_quant=cfg.model.double_quant,
        on_shard=lambda shard: console.print(f"merged {shard}", highlight=False),
        chat_template=tokenizer.chat_template, stop_ids=stop_token_ids(tokenizer),
    )
    write_merge_marker(out, run, adapter, dtype)
    console.print(
        f"wrote {out}: {adapter} adapter ({adapter_dir}) folded into {report.merged_weights} weights of "
        f"{base_dir} in {precision}{' after an NF4 round trip' if nf4_roundtrip else ''}, {report.shards} shard(s)",
        highlight=False,
    )
    if report.untied_head:
        console.print("  the tied output head has a LoRA: written as its own lm_head (tie_word_embeddings false), "
                      "the input embedding left as the adapter leaves it", highlight=False)


def _export_gguf(run: Path, out: Path, quant: str | None, adapter: str, dtype: str | None, nf4_roundtrip: bool,
                 overwrite: bool) -> None:
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"--format gguf writes one file, and --out `{out}` does not end in .gguf",
                          f"name the file, e.g. --out {out.with_suffix('') if out.suffix else out}.gguf")
    if dtype is not None:
        raise ConfigError("--dtype is for model folders (--format hf)", "a GGUF file takes --quant, e.g. --quant f16")
    if nf4_roundtrip:
        raise ConfigError("--nf4-roundtrip is not available for GGUF files",
                          "merge to a folder with --nf4-roundtrip, or export the original weights (no flag)")
    quiet_libraries()
    from ..tools.gguf_export import export_run  # a missing `gguf` package is one line from here
    from ..tools.gguf_export.quants import quant_for

    with console.status("writing GGUF tensors") as status:
        result = export_run(run, out, quant_for(quant, out), adapter, overwrite=overwrite,
                            on_tensor=lambda name: status.update(f"wrote {name}"))
    report = result.report
    types = ", ".join(f"{count} {name}" for name, count in sorted(report.tensor_types.items()))
    lines = [
        f"wrote {out}: {report.file_size / 2**20:.1f} MB, {report.quant}, {report.tensors} tensors ({types}), "
        f"in {report.seconds:.1f}s",
        f"  {adapter} adapter ({result.adapter_dir}) folded into {report.lora_weights} weights of {result.base_dir}",
        f"  tokenizer: {_tokenizer_words(report.tokenizer_source)}; chat template: the run's "
        f"({result.template_family or 'no fixed shape'}); stop tokens: {' '.join(result.stop_tokens)}",
    ]
    if result.modelfile is not None:
        lines.append(f"wrote {result.modelfile}: the template for Ollama and one stop line per stop token")
    else:
        lines.append(f"no Modelfile: {result.no_modelfile_because}; llama.cpp uses the template inside the file")
    lines.append("try it:")
    lines.append(f"  llama-cli -m {out} -cnv")
    if result.modelfile is not None:
        from ..tools.gguf_export.ollama import ollama_model_name

        name = ollama_model_name(out, report.quant)
        lines.append(f"  ollama create {name} -f {result.modelfile} && ollama run {name}")
    for line in lines:
        console.print(line, highlight=False)


def _tokenizer_words(source: str) -> str:
    if source.startswith("gguf:"):
        return f"copied from {source.removeprefix('gguf:')}"
    return "built from tokenizer.json"


@app.command()
@reports_errors
def generate(
    run: Annotated[Path, typer.Argument(help="Run directory (the --out of `sapo-lite train`), one of its adapters "
                                        "(RUN/adapters/best), or a model folder such as a `merge` output")],
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt; repeat for several")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="A file with one prompt a line")] = None,
    adapter: Annotated[
        str | None, typer.Option(help="A run's roles side by side, from base, policy, ema, best "
                                 "(default base,policy,ema, and best where the run kept one; for RUN/adapters/NAME "
                                 "base,NAME)")
    ] = None,
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

    run, named = run_and_adapter(run)
    plain = is_model_folder(run)
    if not plain and not RunDir(run).is_run():
        raise RunDirError(f"`{run}` is neither a sapo-lite run (no config.yaml) nor a model folder (no config.json)",
                          "pass the --out folder of `sapo-lite train`, or a model folder such as `sapo-lite merge`'s")
    if plain and adapter is not None:
        raise ConfigError(f"`{run}` is a model folder, not a run: it has no adapters to pick with --adapter",
                          "drop --adapter: the folder answers as one model")
    roles = ["answer"] if plain else parse_roles(roles_for(run, named, adapter))
    quiet_libraries()
    from ..models.generation import generate_answers
    from ..models.roles import acting_as
    from ..tools.open_run import open_model_folder, open_run

    loaded = open_model_folder(run) if plain else open_run(run, roles)
    prompt_ids = [loaded.prompt_ids(text) for text in prompts]
    answers = {}
    for role in roles:
        with contextlib.nullcontext() if plain else acting_as(loaded.model, role), loaded.generating():
            answers[role] = generate_answers(
                loaded.model, loaded.tokenizer, prompt_ids, max_new_tokens, loaded.stop_ids, temperature
            )
    table = Table("prompt", *roles, show_lines=True)
    for row, text in enumerate(prompts):
        table.add_row(text, *(answers[role][row] for role in roles))
    console.print(table)
