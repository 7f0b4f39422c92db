"""Open a model for inference: a finished (or checkpointed) run with its config, base, tokenizer and adapters, or
a plain model folder (a `merge` output, a downloaded model) with the tokenizer and chat template it carries."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ..config.schema import ModelConfig
from ..data.examples import install_chat_template, render_prompt_ids, stop_token_ids
from ..errors import ModelError
from ..models.roles import POLICY, load_base, load_tokenizer, pick_device
from ..models.threads import DecodeThreads, choose_threads
from ..run.layout import RunDir


@dataclass
class RunModel:
    model: Any
    tokenizer: Any
    stop_ids: list[int]
    decode_threads: DecodeThreads | None = None

    def generating(self) -> contextlib.AbstractContextManager:
        """Around answering: the idle cores' threads on the CPU when the count is automatic."""
        return self.decode_threads or contextlib.nullcontext()

    def prompt_ids(self, text: str) -> list[int]:
        return render_prompt_ids(self.tokenizer, [{"role": "user", "content": text}])


def open_run(run_dir: Path, adapters: list[str]) -> RunModel:
    """The run's base (quantised as in training) with the named adapters attached."""
    from peft import PeftModel

    cfg = RunDir(run_dir).read_config()
    names = [a for a in adapters if a != "base"] or [POLICY]  # peft needs one adapter to wrap the base
    # Checked before anything is printed or loaded, so a damaged adapter is the only line a user sees.
    adapter_dirs = {adapter: str(RunDir(run_dir).adapter_to_load(adapter)) for adapter in names}
    threads_line, decode_threads = choose_threads(cfg.train.num_threads, pick_device())
    if threads_line:
        Console(stderr=True).print(threads_line, highlight=False)  # stdout stays the answers
    name = RunDir(run_dir).base_model_name(cfg)
    tokenizer = load_tokenizer(name, cfg.model.trust_remote_code)
    install_chat_template(tokenizer, cfg.data.chat_template)
    base = load_base(cfg.model, name, pick_device())
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for adapter in names[1:]:
        model.load_adapter(adapter_dirs[adapter], adapter_name=adapter)
    model.eval()
    return RunModel(model, tokenizer, stop_token_ids(tokenizer), decode_threads)


def is_model_folder(folder: Path) -> bool:
    """A plain Hugging Face model folder (config.json), as `merge` writes one: not a sapo-lite run."""
    return (Path(folder) / "config.json").is_file() and not RunDir(folder).is_run()


def open_model_folder(folder: Path) -> RunModel:
    """A plain model folder, full precision, with the chat template its tokenizer carries (a merged folder: the
    base's). No adapters: it answers as one model."""
    tokenizer = load_tokenizer(str(folder))
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"the model folder `{folder}` carries no chat template, so prompts cannot be put in one",
                         "add its chat_template.jinja (or `chat_template` in tokenizer_config.json) to the folder")
    install_chat_template(tokenizer, None)  # its own template, checked for syntax
    threads_line, decode_threads = choose_threads(None, pick_device())  # after the checks: an error is the only line
    if threads_line:
        Console(stderr=True).print(threads_line, highlight=False)
    model = load_base(ModelConfig(name=str(folder), quant="none"), str(folder), pick_device())
    model.eval()
    return RunModel(model, tokenizer, stop_token_ids(tokenizer), decode_threads)
