"""The tiny preset with one and with two CPU processes (one thread each): wall time and pairs per second.

    PYTHONPATH=. python bench/processes.py [--steps 20] [--rounds 2]

Each round runs `sapo-lite train --preset tiny` for `--steps` steps in one process, and the same
under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU), in alternating order.
Two processes generate and train twice the pairs a step (gen_per_step and micro_batch are per
process), so the figure that says whether the second process paid off is pairs per second:

- wall_s: the whole command, start-up, model build and final save included;
- new pairs/s and trained pairs/s: pairs generated / drawn per second of step time (the sum of
  `step_s` in metrics.jsonl, averaged over ranks), steady state without start-up.

The last table gives two-process / one-process ratios, median [range] over rounds. On 2 cores
perfect scaling is 2.0; other work on the machine and the gradient all-reduce take it lower.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["--preset", "tiny", "data.eval_path=null", "train.num_threads=1", "train.save_every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(processes: int, out: Path, steps: int) -> list[str]:
    args = ["train", *COMMON, f"train.max_steps={steps}", "--out", str(out)]
    if processes == 1:
        return [sys.executable, "-m", "sapo_lite", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "sapo_lite", *args]


def measure(processes: int, steps: int, folder: Path) -> dict[str, float]:
    out = folder / f"p{processes}-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(command(processes, out, steps), env=env, check=True, capture_output=True)
    wall_s = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = (out / "config.yaml").read_text()
    gen_per_step = int(config.split("gen_per_step:")[1].split()[0])
    micro_batch = int(config.split("micro_batch:")[1].split()[0])
    step_s = sum(r["step_s"] for r in records)
    return {
        "wall_s": wall_s,
        "new_pairs_per_s": gen_per_step * processes * len(records) / step_s,
        "trained_pairs_per_s": micro_batch * processes * len(records) / step_s,
        "step_s": step_s / len(records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for processes in ((1, 2) if round_index % 2 == 0 else (2, 1)):
                results[processes].append(measure(processes, args.steps, Path(tmp)))
                print(f"round {round_index + 1}, {processes} process(es): {results[processes][-1]}", flush=True)
    keys = ("wall_s", "step_s", "new_pairs_per_s", "trained_pairs_per_s")
    print(f"\ntiny preset, {args.steps} steps, one thread a process, median of {args.rounds} rounds")
    print(f"| processes | {' | '.join(keys)} |\n|---|" + "---|" * len(keys))
    for processes, rows in results.items():
        print(f"| {processes} | " + " | ".join(f"{statistics.median(r[k] for r in rows):.2f}" for k in keys) + " |")
    print("\n| two / one | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    ratios = [[two[k] / one[k] for one, two in zip(results[1], results[2])] for k in keys]
    print("| ratio | " + " | ".join(f"{statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]" for r in ratios) + " |")


if __name__ == "__main__":
    main()
