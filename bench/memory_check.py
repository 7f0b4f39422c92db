"""The GPU memory estimate checked where a CPU can check it: Llama-3-8B geometry, 1 and 2 layers.

    python bench/memory_check.py [--seq-len 512] [--pairs 2] [--threads 2]

The llama3-8b-qlora preset's training forward (2 pairs a micro-batch, chosen and rejected as
separate sequences: the estimate's worst case, no shared prefix), LoRA r=16 all-linear with
dropout 0.05, gradient checkpointing, bf16 weights (NF4 changes the weights, not the
activations), CPU sdpa. Built with 1 and then 2 decoder layers; the difference is the cost of
one more layer. Measured:

- reference forward (no grad) of the pairs, as for new pairs entering the buffer: peak RSS;
- training forward: the bytes autograd keeps for backward (checkpointed layer inputs, head
  inputs), counted exactly with saved-tensor hooks; the 2-layer minus 1-layer figure is the
  cost of one more layer;
- one recomputed layer: the same forward without checkpointing, its extra saved bytes;
- backward (the head's chunks, then the layer recompute and its backward): peak RSS.

Each figure is printed next to the `sapo_lite/models/memory_estimate.py` term it checks, for the same tokens.
The preset has 2 x 2048-token sequences a pair; the default here is 512 tokens a sequence so a
run fits ~8 GB of RAM and minutes of a shared CPU; every term is linear in tokens (checked by
`--seq-len 256` against 512), so the estimate is compared at the measured length.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sapo_lite.config.schema import LoraSettings  # noqa: E402
from sapo_lite.config.sources import load_config  # noqa: E402
from sapo_lite.models.memory_estimate import LLAMA3_8B, activation_terms, architecture_from_config  # noqa: E402
from sapo_lite.models.roles import attach_adapters, reference  # noqa: E402
from sapo_lite.sapo.augment import Pair  # noqa: E402
from sapo_lite.sapo.pair_logps import pair_logps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import fix_threads  # noqa: E402

MB = 1e6
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakSampler:
    """Peak RSS above a baseline, sampled in a thread, per named phase."""

    def __init__(self) -> None:
        self.phase, self.base, self.peaks = None, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.phase is not None:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss() - self.base)
            time.sleep(0.002)

    def start(self, phase: str, base: int | None = None) -> None:
        self.base = rss() if base is None else base
        self.peaks[phase] = 0
        self.phase = phase

    def stop(self) -> None:
        time.sleep(0.01)
        self.phase = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=LLAMA3_8B["vocab_size"], hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=8192, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never hold the fp32 copy of 1 GB embeddings
    try:
        base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    base.requires_grad_(False)
    return attach_adapters(base, LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear"), None,
                           gradient_checkpointing=True)


class SavedBytes:
    """Bytes autograd saves for backward while active (storage counted once), exact and allocator-independent."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.storages: dict[int, int] = {}
        # weights saved for the input gradient are not activations: they exist anyway
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __enter__(self):
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.weights:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure(layers: int, pairs: list[Pair], sampler: PeakSampler) -> dict[str, float]:
    model = build(layers)
    device = torch.device("cpu")
    gc.collect()
    with reference(model):
        sampler.start("reference forward")
        pair_logps(model, pairs, 0, device, shared_prefix=False)
        sampler.stop()
    gc.collect()
    model.train()
    with SavedBytes(model) as kept:
        chosen, rejected, _, _ = pair_logps(model, pairs, 0, device, shared_prefix=False)
        loss = (chosen - rejected).sum()
    sampler.start("backward (head, then layer recompute + backward)")
    loss.backward()
    sampler.stop()
    peaks = {k: v / MB for k, v in sampler.peaks.items()}
    peaks["training forward (kept for backward)"] = kept.total / MB
    if layers == 1:  # one layer's saved tensors as recomputation makes them: the same forward without checkpointing
        model.get_base_model().gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        with SavedBytes(model) as full:
            chosen, rejected, _, _ = pair_logps(model, pairs, 0, device, shared_prefix=False)
        peaks["recomputed layer (saved tensors)"] = (full.total - kept.total) / MB
    del model, loss, chosen, rejected
    gc.collect()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads = fix_threads(args.threads)
    with open("/proc/meminfo") as handle:
        available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable"))
    need = 2.6e9 + 2 * args.pairs * args.seq_len * 0.6e6  # weights (1 layer) + ~0.6 MB a token
    if need > min(available, 8e9):
        sys.exit(f"needs ~{need / 1e9:.1f} GB, {available / 1e9:.1f} GB available (cap 8 GB): lower --seq-len")

    rng = np.random.default_rng(0)
    prompt = args.seq_len // 2
    pairs = []
    for _ in range(args.pairs):
        chosen = rng.integers(10, 128000, args.seq_len).astype(np.int32)
        rejected = rng.integers(10, 128000, args.seq_len).astype(np.int32)
        pairs.append(Pair(chosen, rejected, prompt, 0, args.seq_len - prompt))
    sampler = PeakSampler()
    results = {layers: measure(layers, pairs, sampler) for layers in (1, 2)}
    sampler.close()

    tokens = 2 * args.pairs * args.seq_len
    cfg = load_config("llama3-8b-qlora", overrides=[f"data.max_len={args.seq_len}",
                                                   f"data.max_prompt_len={prompt}",
                                                   f"train.micro_batch={args.pairs}",
                                                   f"sapo.gen_per_step={args.pairs}"])
    arch = architecture_from_config({**LLAMA3_8B, "num_hidden_layers": 1})
    terms = activation_terms(cfg, arch)
    print(f"memory check on CPU ({threads} threads, torch {torch.__version__}): Llama-3-8B geometry, bf16, LoRA r16 "
          f"all-linear dropout 0.05, checkpointing, {args.pairs} pairs x 2 x {args.seq_len} tokens = {tokens} tokens")
    print("| phase | 1 layer (MB) | 2 layers (MB) | per extra layer (MB) | memory.py term (MB) |")
    print("|---|---|---|---|---|")
    expected = {
        "reference forward": terms["reference_forward"],
        "training forward (kept for backward)": terms["kept_per_layer"],
        "recomputed layer (saved tensors)": terms["recomputed_layer"],
        "backward (head, then layer recompute + backward)": max(terms["logits"], terms["backward_transient"]),
    }
    for phase, term in expected.items():
        one, two = results[1].get(phase, float("nan")), results[2].get(phase, float("nan"))
        print(f"| {phase} | {one:.0f} | {two:.0f} | {two - one:.0f} | {term / MB:.0f} |")
    one = results[1]
    saved_kb = one["recomputed layer (saved tensors)"] * MB / tokens / 1e3
    term_kb = terms["recomputed_layer"] / tokens / 1e3
    print(f"per token, 1 layer: recomputed layer saves {saved_kb:.1f} KB (memory.py, CUDA: {term_kb:.1f} KB; "
          f"CPU adds fp32 dropout masks); reference forward peak {one['reference forward'] * MB / tokens / 1e3:.1f} KB")
    print("saved tensors are counted exactly (autograd hooks); the two peaks are resident memory sampled every 2 ms"
          " above the level before the phase, which the allocator's reuse of freed memory can lower")


if __name__ == "__main__":
    main()
