"""Where one decode step goes: transformers' `generate` on the PeftModel vs the lean loop.

Both are timed by wrapping what they call, nothing instrumented in the package: `generate` through
forward hooks on the PeftModel's modules and wrappers around the cache update, the logits
processors, softmax and multinomial (as TRL's `_generate` calls it: left-padded, sampling); the
lean loop by wrapping the module-level functions of sapo_lite/models/decoding.py and the sampler.
A step's time not in any category is the per-token work of the loop itself (`generate`'s
bookkeeping, or the lean loop's norms, activation, residuals and embedding lookups). Hooks and
wrappers cost time of their own, so shares are of an instrumented step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from sapo_lite.models import decoding
from sapo_lite.sapo import augment

CATEGORIES = ("base matmuls (incl. output head)", "LoRA matmuls + peft dispatch", "attention (rope, scores, mix)",
              "KV cache update", "sampling", "rest: generate's per-token work / lean loop's norms, act, residual")


class Clock:
    """Seconds per category, split into prefill and decode at the first sampled token."""

    def __init__(self) -> None:
        self.seconds = {"prefill": defaultdict(float), "decode": defaultdict(float)}
        self.phase = "prefill"
        self.stamps: list[float] = []  # when each token's logits were ready

    def add(self, category: str, seconds: float) -> None:
        self.seconds[self.phase][category] += seconds

    def timed(self, category: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(category, time.perf_counter() - start)
        return wrapper

    def logits_ready(self) -> None:
        self.stamps.append(time.perf_counter())
        self.phase = "decode"

    def split(self) -> tuple[dict[str, float], float]:
        """(ms a decode step per category, ms a decode step in all)."""
        steps = len(self.stamps) - 1
        wall = self.stamps[-1] - self.stamps[0]
        per_step = {c: self.seconds["decode"].get(c, 0.0) / steps * 1e3 for c in CATEGORIES[:-1]}
        per_step[CATEGORIES[-1]] = wall / steps * 1e3 - sum(per_step.values())
        return per_step, wall / steps * 1e3


@contextmanager
def patched(owner: object, name: str, replacement: object):
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


class Tick(LogitsProcessor):
    """A logits processor that only notes when each token's logits are ready."""

    def __init__(self, on_logits: Callable[[], None]) -> None:
        self.on_logits = on_logits

    def __call__(self, input_ids, scores):
        self.on_logits()
        return scores


def with_processor(generate: Callable, processors: LogitsProcessorList) -> Callable:
    """`generate` with extra logits processors, for patching over a model's own."""
    def call(*args, **kwargs):
        return generate(*args, **kwargs, logits_processor=processors)
    return call


def profile_hf(model, contexts, new_tokens: int, stop_id: int, sampling: dict) -> tuple[dict[str, float], float]:
    """The split of `generate` on the PeftModel (hooks on every module, see the module docstring)."""
    import transformers.cache_utils as cache_utils

    clock = Clock()
    lm = model.get_base_model()
    spans: dict[str, float] = defaultdict(float)
    handles = []

    def hook(module, key):
        starts = []
        handles.append(module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))

        def post(*_):
            spans[(clock.phase, key)] += time.perf_counter() - starts.pop()
        handles.append(module.register_forward_hook(post))

    hook(lm.model, "model")
    hook(lm.lm_head, "head")
    for layer in lm.model.layers:
        hook(layer.self_attn, "attention")
        for module in layer.self_attn.children():
            if hasattr(module, "base_layer"):
                hook(module, "peft_attention")
                hook(module.get_base_layer(), "base")
        for module in layer.mlp.children():
            if hasattr(module, "base_layer"):
                hook(module, "peft_mlp")
                hook(module.get_base_layer(), "base")
    tick = LogitsProcessorList([Tick(clock.logits_ready)])
    with ExitStack() as stack:
        stack.enter_context(patched(cache_utils.Cache, "update", clock.timed("cache", cache_utils.Cache.update)))
        stack.enter_context(patched(LogitsProcessorList, "__call__",
                                    clock.timed("sampling", LogitsProcessorList.__call__)))
        stack.enter_context(patched(torch, "multinomial", clock.timed("sampling", torch.multinomial)))
        # generate's softmax over the processed scores (the model itself attends through sdpa, no softmax call)
        stack.enter_context(patched(torch.nn.functional, "softmax",
                                    clock.timed("sampling", torch.nn.functional.softmax)))
        stack.enter_context(patched(model, "generate", with_processor(model.generate, tick)))
        try:
            augment.generate_segments(model, contexts, new_tokens, 0, [stop_id], **sampling, decoder="hf")
        finally:
            for handle in handles:
                handle.remove()
    decode = {key: s for (phase, key), s in spans.items() if phase == "decode"}
    seconds = clock.seconds["decode"]
    peft = decode.get("peft_attention", 0.0) + decode.get("peft_mlp", 0.0)
    seconds[CATEGORIES[0]] = decode.get("base", 0.0) + decode.get("head", 0.0)
    seconds[CATEGORIES[1]] = peft - decode.get("base", 0.0)
    seconds[CATEGORIES[2]] = decode.get("attention", 0.0) - decode.get("peft_attention", 0.0) - seconds["cache"]
    seconds[CATEGORIES[3]] = seconds["cache"]
    seconds[CATEGORIES[4]] = seconds["sampling"]
    return clock.split()


def profile_lean(model, contexts, new_tokens: int, stop_id: int, sampling: dict,
                 phase=None) -> tuple[dict[str, float], float]:
    """The split of the lean loop (inside `phase`, e.g. the merged EMA, when given)."""
    clock = Clock()

    def sample(*args, **kwargs):
        clock.logits_ready()
        return clock.timed(CATEGORIES[4], real_sample)(*args, **kwargs)

    real_sample = augment.sample_next
    attend_decode = decoding.attend_decode
    with ExitStack() as stack:
        for name, category in (("project_base", 0), ("project_lora", 1), ("store_kv", 3)):
            stack.enter_context(patched(decoding, name, clock.timed(CATEGORIES[category], getattr(decoding, name))))
        # attention without its cache write, which store_kv's wrapper counts inside it
        def attention(*args):
            before = clock.seconds[clock.phase][CATEGORIES[3]]
            start = time.perf_counter()
            out = attend_decode(*args)
            cache = clock.seconds[clock.phase][CATEGORIES[3]] - before
            clock.add(CATEGORIES[2], time.perf_counter() - start - cache)
            return out
        stack.enter_context(patched(decoding, "attend_decode", attention))
        stack.enter_context(patched(augment, "sample_next", sample))
        if phase is not None:
            stack.enter_context(phase)
        augment.generate_segments(model, contexts, new_tokens, 0, [stop_id], **sampling, decoder="lean")
    return clock.split()
