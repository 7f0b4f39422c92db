"""A run as a GGUF file (`sapo-lite merge RUN --out FILE.gguf`): its adapter folded into its base, the
chat template and stop tokens it trained with, and an Ollama Modelfile beside the file.

The template is the run's `data.chat_template` installed on the base's tokenizer, exactly as training
installed it (`install_chat_template`), and the stop tokens are `stop_token_ids` of that tokenizer:
the same two calls training and `generate` make, so the file cannot disagree with what was trained.
The token the template writes after an assistant message goes into the GGUF as end-of-turn.

The Modelfile is `FILE.Modelfile` (`model.q8_0.gguf` -> `model.q8_0.Modelfile`), so exports of
several quant types can share a folder; `ollama create NAME -f FILE.Modelfile` reads it. A template
Ollama's Go templates cannot express exactly leaves the Modelfile out, says why, and still writes the
GGUF (llama.cpp runs the Jinja template stored in it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...data.examples import install_chat_template, stop_token_ids
from ...errors import ExportError, writing
from ...models.roles import load_tokenizer
from ...run.folders import check_gguf_out, make_dir
from ...run.layout import RunDir
from ..merge import resolve_base_dir
from .chat_template import TemplateShape, derive_shape, end_of_turn_token
from .export import ExportReport, prepare_export
from .families import convert_instead
from .ollama import modelfile_text
from .quants import resolve_quant


@dataclass
class RunExport:
    """What `export_run` wrote, and what a user needs to try it."""

    report: ExportReport
    adapter_dir: Path
    base_dir: Path
    stop_tokens: list[str]
    eot_token: str | None
    template_family: str | None  # chatml, zephyr, llama3, generic; None when the template has no fixed shape
    modelfile: Path | None
    no_modelfile_because: str | None = None


def modelfile_path(out_file: Path) -> Path:
    """`model.q8_0.gguf` -> `model.q8_0.Modelfile`, beside it."""
    return out_file.with_suffix(".Modelfile")


def export_run(run_dir: Path, out_file: Path, quant: str = "q8_0", adapter: str = "policy", *,
               overwrite: bool = False, on_tensor: Callable[[str], None] | None = None) -> RunExport:
    """Write the run's `adapter` folded into its base as `out_file` (GGUF) and its Modelfile.

    Every check (quant type, run, adapter, output, architecture, tokenizer, template) comes before the
    first byte is written; a failure while writing leaves neither file behind.
    """
    out_file = Path(out_file)
    quant = resolve_quant(quant, out_file, f"sapo-lite merge {run_dir} --quant f16 --out {{f16}}")
    run = RunDir(run_dir)
    cfg = run.read_config()
    adapter_dir = run.adapter_to_load(adapter)
    modelfile = modelfile_path(out_file)
    check_gguf_out(run_dir, out_file, modelfile, overwrite)
    base_dir = resolve_base_dir(run.base_model_name(cfg))
    tokenizer = load_tokenizer(str(base_dir), cfg.model.trust_remote_code)
    install_chat_template(tokenizer, cfg.data.chat_template)
    stop_tokens = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    run_arg = f"{run_dir} --adapter {adapter}" if adapter != "policy" else str(run_dir)
    with prepare_export(base_dir, quant, adapter_dir=adapter_dir, chat_template=tokenizer.chat_template,
                        out_file=out_file, instead=convert_instead(run_arg, str(out_file), quant)) as export:
        shape: TemplateShape | None = None
        text, no_modelfile_because = None, None
        try:
            shape = derive_shape(render, export.bos_token, export.add_bos)
            text = modelfile_text(out_file.name, shape, render, stop_tokens)
        except ExportError as exc:
            no_modelfile_because = exc.message
        eot_token = end_of_turn_token(shape, stop_tokens)
        created = make_dir(out_file.parent, "--out")
        written = False
        try:
            with writing(out_file):  # a full disk or a read-only folder: one line, and the temporary file is gone
                report = export.write(out_file, eot_token, on_tensor)
            written = True
            if text is not None:
                _write_text(modelfile, text)
            elif modelfile.is_file():  # --overwrite: a Modelfile of an earlier export would not match this file
                modelfile.unlink()
        except BaseException:  # the file and its Modelfile come as a pair, or not at all
            if written:
                out_file.unlink(missing_ok=True)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
    return RunExport(report, adapter_dir, base_dir, stop_tokens, eot_token, shape.family if shape else None,
                     modelfile if text is not None else None, no_modelfile_because)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
