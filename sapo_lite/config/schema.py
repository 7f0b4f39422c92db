"""Typed configuration: one dataclass a section, a docstring a field, and `validate`.

Where values come from (presets, a YAML file, `key=value` overrides) is `config_sources.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..errors import ConfigError

SECTION_NAMES = ("model", "lora", "data", "sapo", "loss", "train")
BUNDLED_PREFIX = "bundled:"  # `data.path=bundled:NAME`: data shipped with sapo-lite (data/files.py reads it)
HOLDOUT = "holdout"  # `data.eval_path=holdout`: the held-out set comes out of the training data
# Keys a resumed run may change: none of them changes what a checkpoint's tensors mean.
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.lr", "train.save_every", "train.keep_checkpoints", "train.max_bad_steps",
    "train.num_threads", "train.report_to", "train.sample_every", "data.eval_max_new_tokens", "sapo.decoder",
})
# Keys that decide which rows train, validate and are held out. A run records their values when it starts
# (RUN/split.json); a resume that would change one is refused, naming the old and the new value.
SPLIT_KEYS = ("data.path", "data.split", "data.column", "data.max_prompt_len", "data.max_examples",
              "data.eval_path", "data.eval_size", "data.val_size", "train.seed")


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Hub id or local folder of the base model; `tiny` builds a small Llama locally (no download)."""
    quant: Literal["nf4", "none"] = "nf4"
    """`nf4` loads the base in 4-bit NF4 with bitsandbytes (QLoRA); `none` keeps it in `dtype`."""
    double_quant: bool = True
    """Quantise the NF4 quantisation constants too (saves about 0.4 bits a parameter)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype; `auto` is bf16 on CUDA and fp32 on CPU."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """Attention kernel; `flash_attention_2` falls back to `sdpa` with a warning when unavailable."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward: far less memory for about a third more compute."""
    init_adapter: str | None = None
    """A PEFT adapter folder to start from; it also becomes the frozen DPO reference."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless you trust that repo."""


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input. Off, as in the official SAPO code: the policy trains in train mode while
    the reference and the EMA run in eval mode, so dropout makes the policy's log-probs noisy against theirs
    (once the adapter has moved; from step 0 with `model.init_adapter`), and DPO's implicit reward with them."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or `all-linear` for every linear layer except the output head."""


@dataclass
class DataConfig:
    path: str = "bundled:tiny-reverse"
    """Hub dataset name, local json/jsonl/parquet file, or `bundled:NAME` for data shipped with sapo-lite."""
    split: str = "train"
    """Dataset split to train on."""
    column: str | None = None
    """Column holding the examples; auto-detected (`chosen`, `messages`, or `prompt`/`response`) when unset."""
    chat_template: str | None = None
    """`chatml`, `zephyr`, a Jinja file, or unset to use the tokenizer's own template."""
    max_len: int = 2048
    """Longest prompt + response in tokens; responses are cut to fit."""
    max_prompt_len: int = 1792
    """Examples whose prompt is longer than this are dropped (and counted in the log)."""
    max_examples: int | None = None
    """Use only the first N usable examples of the dataset (in file order)."""
    eval_path: str | None = None
    """Held-out data for the before/after figure; `holdout` sets `eval_size` examples (at most a tenth) of the
    training data aside, written to RUN/held_out.jsonl; unset skips it. A bundled eval set is only used with its
    own bundled data: with other data the resolved config says `holdout` instead, and why."""
    eval_size: int = 100
    """How many held-out prompts to score."""
    eval_max_new_tokens: int = 64
    """Greedy generation length when scoring held-out prompts."""
    val_size: int = 0
    """Examples carved out of the training data (never the held-out set) as a validation split, scored every
    `train.eval_every` steps; 0: no validation split."""
    max_bad_share: float = 0.05
    """Rows that cannot be used (null, empty or non-text content, wrong shape; in preference data also a rejected
    answer missing, empty, identical to the chosen one, or after another prompt) are skipped and counted; above
    this share of the rows the data is refused."""


@dataclass
class SapoConfig:
    ema_decay: float = 0.5
    """a in ema <- a*ema + (1-a)*policy (the paper's 0.5)."""
    ema_every: int = 1
    """Update the EMA adapter every this many optimizer steps."""
    generate_every: int = 1
    """Make new pairs every this many optimizer steps (the official `sample_every_n_steps`) and train from
    the buffer alone in between; the examples wait for the next generation, none is skipped."""
    segment_len: int = 256
    """Tokens of the chosen response the EMA rewrites."""
    short_rewrite: Literal["official", "free"] = "official"
    """A response too short to keep a tail after the segment is rewritten from its start: `official` lets
    the EMA write at most as many tokens as the response has (and cuts it there), `free` up to segment_len,
    so it can end its answer with its own stop token."""
    identical: Literal["keep", "drop", "resample"] = "keep"
    """A rewrite identical to the chosen response (no preference signal): `keep` it (official), `drop` it
    before the buffer, or `resample` it once from a new cut point."""
    buffer_size: int = 2000
    """Capacity of the FIFO replay buffer in pairs (the paper's 2000)."""
    gen_per_step: int = 8
    """New examples turned into pairs (and pushed into the buffer) each optimizer step."""
    gen_batch_size: int = 8
    """Examples generated together in one batched `generate` call."""
    temperature: float = 0.7
    """Sampling temperature of the EMA generator."""
    top_k: int = 50
    """Top-k sampling of the EMA generator."""
    top_p: float = 0.95
    """Nucleus sampling of the EMA generator."""
    ref_refresh_steps: int = 0
    """Copy the EMA into the DPO reference every N steps (the official code's behaviour); 0 keeps the
    frozen base as the reference. Cached reference log-probs are recomputed when next drawn."""
    decoder: Literal["lean", "hf"] = "lean"
    """How the EMA decodes its rewrites. `lean`: sapo-lite's own decode loop for the model families of
    docs/model-families.md (Llama 3, Qwen2.5, Qwen3, Gemma 3, Phi-3/4, Mistral; one packed
    prefill, a preallocated KV cache, one forward a token without peft's dispatch, sampling on the top-k
    candidates, with transformers' sampling distribution; on a CPU with a full-precision base the EMA is merged
    into scratch copies of the weights while it generates); other models fall back to `hf`, and `train` says
    so. `hf`: transformers' `generate` on the PeftModel, as before and as TRL does."""
    pairs: Literal["self", "data", "mix", "spin"] = "self"
    """Where the rejected responses come from. `self`: the EMA rewrites a segment of each chosen response (SAPO).
    `data`: the data's own rejected answers (offline DPO/ORPO; needs `chosen` + `rejected` columns; nothing is
    generated). `mix`: each step's new pairs part the data's, part the EMA's (`mix_share`). `spin`: SPIN, a whole
    answer written from the prompt by the previous iterate, which is also the reference (`spin_iteration_steps`).
    See docs/preference-data.md."""
    mix_share: float = 0.5
    """With `pairs=mix`: the share of each step's new pairs that take the data's rejected answer (the rest are
    the EMA's rewrites); rounded at random per step, so the share holds on average."""
    spin_iteration_steps: int = 50
    """With `pairs=spin`: optimizer steps per SPIN iteration; at its first step the policy becomes the
    generator and the DPO reference for the whole iteration."""
    spin_max_new_tokens: int = 256
    """With `pairs=spin`: the longest answer the previous iterate writes (SPIN's official `max_tokens`), also
    bounded by the room `data.max_len` leaves after the prompt."""
    static_cache: bool = False
    """With `decoder=hf`: a preallocated KV cache; on CUDA transformers then compiles decoding with torch.compile.
    The lean decoder always preallocates its cache, so `static_cache=true` needs `decoder=hf`."""


@dataclass
class LossConfig:
    name: Literal["dpo", "orpo", "sft"] = "dpo"
    """`dpo` (sigmoid, against the frozen reference), `orpo` (reference-free), or `sft` (NLL of the
    chosen responses only: no generation; the baseline SAPO should beat, or a warm start)."""
    beta: float = 0.1
    """DPO beta (0.1 in the paper); for ORPO the weight lambda of the odds-ratio term (0.05); unused by SFT."""


@dataclass
class TrainConfig:
    lr: float = 5e-5
    """Peak learning rate."""
    max_steps: int = 1000
    """Optimizer steps to run."""
    micro_batch: int = 2
    """Pairs in one forward/backward."""
    grad_accum: int = 4
    """Micro-batches accumulated into one optimizer step."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up; `constant` has none, so the first N steps of a longer run are exactly an N-step run."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA tensors."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    logps_chunk_tokens: int = 256
    """Response positions sent through the output head at once (bounds the vocab-sized logits)."""
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit"] = "auto"
    """`auto` is bitsandbytes' 8-bit paged AdamW on CUDA and torch AdamW on CPU."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log every step to TensorBoard (RUN/tensorboard) or Weights & Biases."""
    sample_every: int = 50
    """With report_to, log a few decoded (prompt, chosen, rejected) pairs every this many steps."""
    save_every: int = 500
    """Write a checkpoint every this many optimizer steps (0: only at the end)."""
    max_bad_steps: int = 3
    """Stop after this many steps in a row with a non-finite loss or gradient (each is skipped)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    eval_every: int = 0
    """Score the validation split (`data.val_size`) before the first step and every this many steps: chosen-response
    NLL, preference accuracy and margin on pairs made from it, and the constraint rate when its rows carry constraints;
    the best step's policy adapter is kept in RUN/adapters/best. 0: never."""
    best_metric: Literal["auto", "val/constraints", "val/nll", "val/accuracy", "val/margin"] = "auto"
    """The validation figure that picks the best step (`auto`: val/constraints when the data carries constraints,
    else val/nll); val/nll is better lower, the others higher."""
    patience: int = 0
    """Stop training after this many validation passes without a new best (early stopping); 0: off."""
    seed: int = 42
    """Seed for data order, generation sampling and buffer sampling."""
    num_threads: int | None = None
    """CPU threads for torch; unset: 1 on machines with <= 2 cores, else the idle physical cores (printed)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    sapo: SapoConfig = field(default_factory=SapoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    notes: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    """Why resolving the config changed a key (`data.eval_path` -> why): printed by `train` and written beside the
    key in RUN/config.yaml as a comment. Not a setting."""

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTION_NAMES}


def validate(cfg: Config) -> None:
    """Collect every out-of-range value and raise once, naming each key."""
    m, lo, d, s, ls, t = cfg.model, cfg.lora, cfg.data, cfg.sapo, cfg.loss, cfg.train
    checks = [
        (lo.r >= 1, "lora.r must be >= 1"),
        (lo.alpha > 0, "lora.alpha must be > 0"),
        (0 <= lo.dropout < 1, "lora.dropout must be in [0, 1)"),
        (d.max_len >= 8, "data.max_len must be >= 8"),
        (0 < d.max_prompt_len < d.max_len, "data.max_prompt_len must be > 0 and < data.max_len"),
        (d.max_examples is None or d.max_examples >= 1, "data.max_examples must be >= 1"),
        (d.eval_size >= 1, "data.eval_size must be >= 1"),
        (0 <= d.max_bad_share < 1, f"data.max_bad_share must be in [0, 1), got {d.max_bad_share}"),
        (0 <= s.ema_decay <= 1, f"sapo.ema_decay must be in [0, 1], got {s.ema_decay}"),
        (s.ema_every >= 1, "sapo.ema_every must be >= 1"),
        (s.generate_every >= 1, "sapo.generate_every must be >= 1"),
        (s.segment_len >= 1, f"sapo.segment_len must be >= 1, got {s.segment_len}"),
        (s.buffer_size >= 1, f"sapo.buffer_size must be >= 1, got {s.buffer_size}"),
        (s.gen_per_step >= 1, "sapo.gen_per_step must be >= 1"),
        (s.gen_batch_size >= 1, "sapo.gen_batch_size must be >= 1"),
        (s.gen_per_step <= s.buffer_size, f"sapo.gen_per_step={s.gen_per_step} is larger than sapo.buffer_size="
         f"{s.buffer_size}: each step would evict some of its new pairs before they are ever drawn"),
        (t.micro_batch <= s.buffer_size, f"train.micro_batch={t.micro_batch} is larger than sapo.buffer_size="
         f"{s.buffer_size}: every micro-batch would repeat pairs"),
        (s.ref_refresh_steps >= 0, "sapo.ref_refresh_steps must be >= 0"),
        (not (s.static_cache and s.decoder == "lean"), "sapo.static_cache=true applies to transformers' generate: "
         "set sapo.decoder=hf with it (the lean decoder always preallocates its cache)"),
        (0 <= s.mix_share <= 1, f"sapo.mix_share must be in [0, 1], got {s.mix_share}"),
        (s.spin_iteration_steps >= 1, "sapo.spin_iteration_steps must be >= 1"),
        (s.spin_max_new_tokens >= 1, "sapo.spin_max_new_tokens must be >= 1"),
        (not (s.pairs == "spin" and ls.name != "dpo"), f"sapo.pairs=spin trains against the previous iterate as "
         f"the reference, which loss.name={ls.name} has none of: set loss.name=dpo"),
        (not (s.pairs == "spin" and s.ref_refresh_steps), "sapo.pairs=spin sets the reference itself (the previous "
         "iterate): set sapo.ref_refresh_steps=0"),
        (not (s.pairs != "self" and ls.name == "sft"), f"loss.name=sft trains on the chosen responses alone: "
         f"sapo.pairs={s.pairs} would make rejected ones it never reads; set sapo.pairs=self"),
        (s.temperature > 0, "sapo.temperature must be > 0"),
        (s.top_k >= 0, "sapo.top_k must be >= 0"),
        (0 < s.top_p <= 1, "sapo.top_p must be in (0, 1]"),
        (ls.beta > 0, f"loss.beta must be > 0, got {ls.beta}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.max_steps >= 1, "train.max_steps must be >= 1"),
        (t.micro_batch >= 1, "train.micro_batch must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.logps_chunk_tokens >= 1, "train.logps_chunk_tokens must be >= 1"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0"),
        (t.save_every >= 0, "train.save_every must be >= 0"),
        (t.sample_every >= 1, "train.sample_every must be >= 1"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (t.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (t.num_threads is None or t.num_threads >= 1, "train.num_threads must be >= 1"),
        (d.val_size >= 0, "data.val_size must be >= 0"),
        (t.eval_every >= 0, "train.eval_every must be >= 0"),
        (t.patience >= 0, "train.patience must be >= 0"),
        (not (d.val_size and not t.eval_every), f"data.val_size={d.val_size} sets examples aside that nothing scores: "
         "set train.eval_every too (e.g. train.eval_every=10), or data.val_size=0"),
        (not (t.eval_every and not d.val_size), f"train.eval_every={t.eval_every} needs a validation split: "
         "set data.val_size (e.g. data.val_size=100)"),
        (not (t.patience and not t.eval_every), f"train.patience={t.patience} counts validation passes: "
         "set train.eval_every and data.val_size too"),
        (m.name.strip() != "", "model.name must not be empty"),
    ]
    problems = [msg for ok, msg in checks if not ok]
    if problems:
        raise ConfigError("; ".join(problems), "fix the value in the preset, --config file or override")


def to_yaml(cfg: Config) -> str:
    """Every key, one section after another; a key that resolving changed carries its note as a comment."""
    lines = []
    for name in SECTION_NAMES:
        section = yaml.safe_dump({name: dataclasses.asdict(getattr(cfg, name))}, sort_keys=False).splitlines()
        for line in section:
            key = line.strip().split(":")[0]
            note = cfg.notes.get(f"{name}.{key}") if line.startswith("  ") and not line.startswith("   ") else None
            lines.append(f"{line}  # {note}" if note else line)
    return "\n".join(lines) + "\n"
