"""The SQLite replay buffer at scale: add and sample latency, and process memory, at 1k/10k/100k pairs.

    python bench/buffer.py [--sizes 1000 10000 100000] [--tokens 1000]

Each size fills a fresh buffer (capacity = size) with pairs of 1,000-token chosen and rejected
sequences, then times what a training step does at steady state: add one step's 8 new pairs
(evicting the 8 oldest) and sample a micro-batch of 8, median of 50 times. RSS is the process's
resident memory after each size; the buffer must keep it flat, since pairs live on disk.
The last column compares the buffer's time per step with one sapo-lite DPO step of the model
in bench/train_step.py, measured here too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sapo_lite.sapo.augment import Pair
from sapo_lite.sapo.buffer import ReplayBuffer


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1e3


def make_pairs(count: int, tokens: int, rng: np.random.Generator) -> list[Pair]:
    return [Pair(rng.integers(0, 128256, tokens, dtype=np.int32), rng.integers(0, 128256, tokens, dtype=np.int32),
                 300, 100, 256) for _ in range(count)]


def measure(size: int, tokens: int, folder: Path) -> dict[str, float]:
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(folder / f"buffer-{size}.sqlite", capacity=size)
    for start in range(0, size, 1000):
        buffer.add(make_pairs(min(1000, size - start), tokens, rng), step=0,
                   ref_logps=[(-1.0, -2.0)] * min(1000, size - start))
    adds, samples = [], []
    fresh = make_pairs(8, tokens, rng)
    for step in range(50):
        start = time.perf_counter()
        buffer.add(fresh, step=step + 1, ref_logps=[(-1.0, -2.0)] * 8)
        adds.append(time.perf_counter() - start)
        start = time.perf_counter()
        batch = buffer.sample(8, rng)
        samples.append(time.perf_counter() - start)
    assert len(buffer) == size and len(batch) == 8
    db_mb = (folder / f"buffer-{size}.sqlite").stat().st_size / 1e6
    buffer.close()
    return {"add_ms": statistics.median(adds) * 1e3, "sample_ms": statistics.median(samples) * 1e3,
            "rss_mb": rss_mb(), "db_mb": db_mb}


def training_step_s() -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import SapoLiteStep, make_rows

    from sapo_lite.models.tiny import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        step = SapoLiteStep(make_rows(4, 256, np.random.default_rng(0)), build_tokenizer(), 2, Path(tmp))
        step.step()
        start = time.perf_counter()
        step.step()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--tokens", type=int, default=1000)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        start_rss = rss_mb()
        for size in args.sizes:
            results[size] = measure(size, args.tokens, Path(tmp))
    step_s = training_step_s()
    print(f"replay buffer, pairs of {args.tokens}+{args.tokens} tokens; step = 8 pairs added + 8 sampled; "
          f"process RSS at start {start_rss:.0f} MB; one CPU DPO step of the bench model: {step_s:.2f} s")
    print("| pairs | database (MB) | add 8 (ms) | sample 8 (ms) | process RSS (MB) | share of a step |")
    print("|---|---|---|---|---|---|")
    for size, r in results.items():
        share = (r["add_ms"] + r["sample_ms"]) / 1e3 / step_s
        print(f"| {size:,} | {r['db_mb']:.0f} | {r['add_ms']:.2f} | {r['sample_ms']:.2f} | {r['rss_mb']:.0f} | "
              f"{share:.2%} |")
    first, last = results[args.sizes[0]], results[args.sizes[-1]]
    print(f"rss_growth_mb: {last['rss_mb'] - first['rss_mb']:.0f}")


if __name__ == "__main__":
    main()
