"""Step time and generation share of SAPO on SmolLM2-135M-Instruct: full-precision base vs NF4.

    python bench/real_model_step.py --base RUN/base_model [--rounds 2] [--steps 5]

`--base` is a dequantised SmolLM2 folder (any run of the `smollm2-135m` preset has one in
RUN/base_model). Each round trains the preset for `--steps` steps with `model.quant=none` and
then `nf4` (order alternating by round), one thread, and reads RUN/metrics.jsonl; the first
step of each run (warm-up) is left out. Prints medians per quantisation and the nf4/none ratio
per round, so that a busy machine affects both sides alike, and the CPU seconds of each whole
run (one thread, so on a quiet core about its wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(base: Path, quant: str, steps: int, extra: list[str]) -> tuple[list[dict], float]:
    """Metrics of steps 2.. and the CPU seconds of the whole run (start-up and model load included)."""
    cpu_before = child_cpu_s()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run(
            [sys.executable, "-m", "sapo_lite.cli", "train", "--preset", "smollm2-135m", "--out", str(run),
             f"model.name={base}", f"model.quant={quant}", "data.eval_path=null", f"train.max_steps={steps}",
             "train.save_every=0", *extra],
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    return records, child_cpu_s() - cpu_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--override", nargs="*", default=[])
    args = parser.parse_args()
    records: dict[str, list[dict]] = {"none": [], "nf4": []}
    cpu: dict[str, list[float]] = {"none": [], "nf4": []}
    ratios = []
    for round_index in range(args.rounds):
        order = ("none", "nf4") if round_index % 2 == 0 else ("nf4", "none")
        medians = {}
        for quant in order:
            steps, cpu_s = one_run(args.base, quant, args.steps, args.override)
            records[quant] += steps
            cpu[quant].append(cpu_s)
            medians[quant] = statistics.median(r["step_s"] for r in steps)
        ratios.append(medians["nf4"] / medians["none"])
        none_s, nf4_s = medians["none"], medians["nf4"]
        print(f"round {round_index + 1}: none {none_s:.1f} s/step, nf4 {nf4_s:.1f} s/step", flush=True)
    header = f"{'quant':<6}{'steps':>6}{'step s':>9}{'gen s':>8}{'ref s':>8}{'train s':>9}{'gen share':>11}"
    print(f"\n{header}{'peak GB':>9}{'run CPU s':>11}")
    for quant, rows in records.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("step_s", "gen_s", "ref_s", "train_s", "gen_share")}
        print(f"{quant:<6}{len(rows):>6}{med['step_s']:>9.1f}{med['gen_s']:>8.1f}{med['ref_s']:>8.2f}"
              f"{med['train_s']:>9.1f}{med['gen_share']:>11.0%}{max(r['peak_mem_gb'] for r in rows):>9.2f}"
              f"{statistics.median(cpu[quant]):>11.0f}")
    print(f"nf4 / none step time per round: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
