"""Everything the training loop needs, built in named steps: model, data, optimizer, RNGs."""

from __future__ import annotations

import contextlib
import random
import resource
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from ..config.schema import HOLDOUT, Config, to_yaml
from ..data.examples import Example, install_chat_template, load_examples, stop_token_ids
from ..data.streams import random_stream
from ..errors import ModelError
from ..models.decode_plan import why_not_lean
from ..models.gguf_base import gguf_base, is_gguf_base
from ..models.memory_estimate import architecture_from_config, estimate
from ..models.merged_phase import MergedAdapter
from ..models.roles import (
    EMA,
    acting_as,
    attach_adapters,
    flash_attention_usable,
    load_base,
    load_tokenizer,
    policy_parameters,
    training_mode,
)
from ..models.threads import DecodeThreads, choose_threads
from ..models.tiny import TINY_NAME, build_tiny_base
from ..run.folders import normal_permissions
from ..run.layout import RunDir
from ..run.testhook import pause_point
from ..sapo.buffer import StoredPair
from ..sapo.logps import response_token_logps
from ..sapo.losses import LOSSES, PairLogps
from ..sapo.pair_logps import pair_logps, why_not_packable
from ..sapo.sources import reads_rejected
from .data_split import keep_split, split_data
from .distributed import SINGLE, Processes, share_stream, start_processes
from .held_out import write_held_out_rows
from .metrics import Reporter, make_reporter
from .preflight import check_init_adapter, check_lora_targets, data_warnings, model_warnings, optimizer_choice
from .validation import schedule_warning


class DataStream:
    """Examples in a fresh seeded order each epoch; its position is what a checkpoint stores."""

    def __init__(self, examples: Sequence[Example], seed: int) -> None:
        self.examples = examples
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> np.ndarray:
        return random_stream(self.seed, "data_order", epoch).permutation(len(self.examples))

    def take(self, n: int) -> list[Example]:
        taken = []
        for _ in range(n):
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            taken.append(self.examples[self._order[self.index]])
            self.index += 1
        return taken

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict[str, int]) -> None:
        self.epoch, self.index = position["epoch"], position["index"]
        self._order = self._shuffled(self.epoch)


@dataclass
class TrainSession:
    cfg: Config
    model: Any
    tokenizer: Any
    device: torch.device
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: DataStream
    eval_examples: list[Example]
    val_examples: list[Example]
    pad_id: int
    stop_ids: list[int]
    data_rng: np.random.Generator
    sample_rng: np.random.Generator
    reporter: Reporter
    run_dir: Path
    eval_source: str = ""
    processes: Processes = SINGLE
    score: Callable[..., Any] = response_token_logps  # the training forward (through DDP with several processes)
    merged_ema: MergedAdapter | None = None  # the EMA merged for generation (`ema_generation`), else unmerged
    decode_threads: DecodeThreads | None = None  # CPU threads raised for generating, when chosen automatically
    split_origins: tuple[str, ...] = ()  # origins whose drawn pairs the metrics report apart (`sapo.pairs=mix`)

    def generating(self) -> contextlib.AbstractContextManager:
        """Around every generation (rewrites, greedy answers): the idle cores' threads on the CPU."""
        return self.decode_threads or contextlib.nullcontext()

    def decode_pairs(self, pairs: Sequence[Any], count: int = 3) -> list[tuple[str, str, str]]:
        """(prompt, chosen response, rejected response) texts of the first `count` pairs."""
        decode = self.tokenizer.decode
        return [
            (decode(p.chosen_ids[: p.prompt_len]), decode(p.chosen_ids[p.prompt_len :]),
             decode(p.rejected_ids[p.prompt_len :]))
            for p in pairs[:count]
        ]

    def to_pair_logps(self, batch: Sequence[StoredPair], with_reference: bool) -> PairLogps:
        chosen, rejected, n_chosen, n_rejected = pair_logps(
            self.model, batch, self.pad_id, self.device, self.cfg.train.logps_chunk_tokens, self.score
        )
        logps = PairLogps(chosen, rejected, n_chosen, n_rejected)
        if with_reference:
            logps.ref_chosen = torch.tensor([p.ref_logp_chosen for p in batch], device=self.device)
            logps.ref_rejected = torch.tensor([p.ref_logp_rejected for p in batch], device=self.device)
        return logps


def setup_session(cfg: Config, run_dir: Path, console: Console, resume: bool = False) -> TrainSession:
    """Load model, data and optimizer; write RUN/config.yaml. Raises SapoError on bad input, and on a resume
    whose data would split differently from the run's (before the model loads)."""
    seed_everything(cfg.train.seed)
    processes = start_processes()
    device = processes.device
    threads_line, decode_threads = choose_threads(cfg.train.num_threads, device)
    if threads_line:
        console.print(threads_line)
    with processes.main_first():  # the tiny base is built once, into the run directory
        model_name = resolve_model_name(cfg, run_dir)
    pause_point("startup")
    tokenizer = load_tokenizer(model_name, cfg.model.trust_remote_code)
    install_chat_template(tokenizer, cfg.data.chat_template)
    data = load_examples(cfg.data.path, cfg.data.split, tokenizer, cfg.data, with_rejected=reads_rejected(cfg))
    split = split_data(cfg, data, tokenizer)
    keep_split(run_dir, cfg, split, resume, processes.is_main)  # the split a resume must not change
    scaled = f" ({cfg.notes['data.val_size']})" if "data.val_size" in cfg.notes else ""
    validation = f"; {len(split.validation)} set aside for validation{scaled}" if split.validation else ""
    console.print(data.describe(cfg.data) + validation, highlight=False, markup=False)
    for line in ([split.eval_note] if split.eval_note else []) + data_warnings(data.unknown_share, tokenizer):
        console.print(line, highlight=False, markup=False)
    if (warning := schedule_warning(cfg)) is not None:
        console.print(warning, highlight=False, markup=False)

    if processes.is_main:
        RunDir(run_dir).config.write_text(to_yaml(cfg))
        if cfg.data.eval_path == HOLDOUT and split.held_out:
            write_held_out_rows(run_dir, data, split.held_out)
    report_to = cfg.train.report_to if processes.is_main else "none"
    reporter = make_reporter(report_to, run_dir, cfg.to_dict())  # fails fast, before the model loads
    console.print(f"model: {model_name} ({cfg.model.quant}) on {device.type}")
    if cfg.model.attn_implementation == "flash_attention_2" and not flash_attention_usable(device):
        console.print("warning: flash-attn is not usable here (needs CUDA and `pip install flash-attn`); using sdpa")
    base = load_base(cfg.model, model_name, device)
    check_lora_targets(cfg, base)
    if cfg.model.init_adapter:
        check_init_adapter(cfg, base, model_name)
    for line in model_warnings(cfg, base.config):
        console.print(line, highlight=False, markup=False)
    try:
        peak_gb = estimate(cfg, architecture_from_config(base.config.to_dict())).total
        console.print(_estimate_line(peak_gb, device), highlight=False)
    except ModelError:
        pass  # an architecture the estimate does not model: nothing to show, nothing wrong

    model = attach_adapters(base, cfg.lora, cfg.model.init_adapter, cfg.model.gradient_checkpointing)
    training_mode(model)  # the inner model comes out of from_pretrained in eval mode
    if (why := why_not_packable(model)) is not None:
        console.print(f"pairs run as separate sequences: {why}", highlight=False)
    elif processes.count > 1:
        console.print("pairs run as separate sequences: DDP averages gradients through its own forward only")
    merged_ema, decoder_note = ema_generation(cfg, model, device)
    if decoder_note:
        console.print(decoder_note, highlight=False, markup=False)
    trainable = policy_parameters(model)
    processes.reseed_rank(cfg.train.seed)
    if processes.count > 1:
        console.print(processes.describe(cfg.train.micro_batch, cfg.train.grad_accum, cfg.sapo.gen_per_step))
    optimizer = build_optimizer(cfg, trainable, device)
    if (note := optimizer_choice(cfg.train.optimizer, device.type)[1]) is not None:
        console.print(note, highlight=False)
    scheduler = build_scheduler(cfg, optimizer)
    return TrainSession(
        cfg=cfg,
        model=model,
        tokenizer=tokenizer,
        device=device,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=share_stream(DataStream(split.training, cfg.train.seed), processes),
        eval_examples=split.held_out,
        val_examples=split.validation,
        pad_id=tokenizer.pad_token_id,
        stop_ids=stop_token_ids(tokenizer),
        data_rng=random_stream(cfg.train.seed, "truncation", processes.rank),
        sample_rng=random_stream(cfg.train.seed, "buffer_draws", processes.rank),
        reporter=reporter,
        run_dir=run_dir,
        eval_source=split.eval_source,
        processes=processes,
        score=processes.data_parallel(model, cfg.train.grad_accum),
        merged_ema=merged_ema,
        decode_threads=decode_threads,
    )


def ema_generation(cfg: Config, model: Any, device: torch.device) -> tuple[MergedAdapter | None, str | None]:
    """How the EMA will generate: its merged phase where that applies, and a line to print when the lean
    decoder was asked for but cannot run this model (generation then uses transformers' `generate`).

    Merged only with the lean decoder, a full-precision base (merging into NF4 would re-round it) and on
    the CPU: on CUDA the scratch copies would double the adapted weights in GPU memory, what a 24 GB card
    runs out of first, and the gain there is unmeasured."""
    if cfg.sapo.decoder != "lean" or not LOSSES[cfg.loss.name].needs_rejected or cfg.sapo.pairs in ("data", "spin"):
        return None, None  # the EMA never generates (SFT, the data's pairs) or SPIN's iterate does
    with acting_as(model, EMA):  # the plan is of the EMA as it generates (eval mode, EMA active)
        why = why_not_lean(model)
    if why is not None:
        return None, f"generation: transformers' generate, not the lean decoder: {why}"
    merge = cfg.model.quant == "none" and device.type == "cpu"
    return (MergedAdapter(model, EMA) if merge else None), None


def _estimate_line(peak_gb: float, device: torch.device) -> str:
    if device.type == "cuda":
        return f"estimated peak memory per GPU: {peak_gb:.1f} GB (term by term: sapo-lite estimate)"
    # The estimate models CUDA memory; on the CPU it still tells a user what card the same config needs.
    return (f"estimated peak memory per GPU, were this config run on one: {peak_gb:.1f} GB "
            "(this run uses the CPU and its RAM; term by term: sapo-lite estimate)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_name(cfg: Config, run_dir: Path) -> str:
    """`tiny` and GGUF bases are built into RUN/base_model so the run's adapters load with plain peft,
    with the user's usual file permissions (transformers saves safetensors owner-only)."""
    if cfg.model.name == TINY_NAME:
        folder = build_tiny_base(RunDir(run_dir).base_model)
    elif is_gguf_base(cfg.model.name):
        folder = gguf_base(cfg.model.name, RunDir(run_dir).base_model)
    else:
        return cfg.model.name
    normal_permissions(folder)
    return str(folder)


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """8-bit paged AdamW from bitsandbytes on CUDA (a quarter of AdamW's state), torch AdamW elsewhere."""
    name, _ = optimizer_choice(cfg.train.optimizer, device.type)
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> Any:
    from transformers import get_scheduler

    # transformers' "constant" ignores warm-up steps; here every schedule warms up for train.warmup_steps.
    name = "constant_with_warmup" if cfg.train.lr_scheduler == "constant" else cfg.train.lr_scheduler
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak / 1e6  # bytes on macOS, KiB on Linux
