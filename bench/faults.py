"""Fault campaign: SIGKILL `sapo-lite train` at random points across a run's whole life, resume, compare.

    PYTHONPATH=$PWD python bench/faults.py [--kills 30] [--seed 0] [--steps 30] [--save-every 5]

One uninterrupted run of the tiny preset is the reference. Then chains of 1-4 kills: a fresh
`train` is paused at a random phase (startup, generation, reference, buffer-write, training,
checkpoint-write, checkpoint-rotate, final-save, final-eval, summary; the n-th time it is
reached, n random) through the SAPO_TEST_PAUSE_AT hook, let go, and SIGKILLed 0-50 ms later,
so the kill lands at a random moment inside that phase or just after it. Each kill after the
first hits a `train --resume` (or, after a kill at startup, the `--overwrite` restart).
Then the run is taken to its end by doing what the errors say:
`--resume`, or `--overwrite` when the hint names it (a run killed before its first checkpoint).

Printed: kills delivered (and by phase), runs finished, runs whose metrics.jsonl has the
reference's exact losses for every step, runs whose final policy adapter is byte-identical,
pairs lost (reference pairs missing from the final buffer) and pairs duplicated, leftovers
(`.tmp-*`, `.del-*`, `*.restore`, `*.tmp` files and incomplete checkpoints after the end), and
tracebacks seen on stderr (every failure must be a one-line error).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

STEP_PHASES = ("generation", "reference", "buffer-write", "training")
ONCE_PHASES = ("final-save", "final-eval", "summary")


def base_args(steps: int, save_every: int) -> list[str]:
    return ["--preset", "tiny", "loss.name=dpo", "train.warmup_steps=2", "train.num_threads=1",
            "data.eval_size=4", f"train.max_steps={steps}", f"train.save_every={save_every}"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sapo_lite.cli", "train", *args]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "300", **(extra or {})}


def latest_step(run: Path) -> int:
    from sapo_lite.run.layout import RunDir

    done = RunDir(run).completed_checkpoints()
    return int(done[-1].name.split("-")[1]) if done else 0


def pick_phase(rng: random.Random, first: bool, done_step: int, steps: int, save_every: int) -> str:
    """A phase this process will reach, and which time: `name:n`."""
    left = steps - done_step
    saves_left = len([s for s in range(done_step + 1, steps + 1) if s % save_every == 0 or s == steps])
    choices = [*STEP_PHASES, "checkpoint-write", "checkpoint-rotate", *ONCE_PHASES]
    if first:
        choices.append("startup")
    phase = rng.choice(choices)
    if phase in STEP_PHASES:
        return f"{phase}:{rng.randint(1, max(left, 1))}"
    if phase in ("checkpoint-write", "checkpoint-rotate"):
        return f"{phase}:{rng.randint(1, max(saves_left, 1))}"
    return phase


def kill_at(args: list[str], cwd: Path, phase: str, rng: random.Random, log: list[str]) -> bool:
    """Run until `phase`, let it go, SIGKILL 0-50 ms later; False when the process ended first."""
    marker = cwd / "paused"
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(cli(*args), cwd=cwd, env=env({"SAPO_TEST_PAUSE_AT": phase,
                                                          "SAPO_TEST_PAUSE_FILE": str(marker)}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.005)
    if proc.poll() is not None:
        log.append(proc.stderr.read())
        return False
    marker.unlink()
    time.sleep(rng.uniform(0.0, 0.05))
    delivered = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    log.append(stderr)
    return delivered


def finish(run: Path, cwd: Path, args: list[str], log: list[str]) -> None:
    """Take a killed run to its end the way a user would: resume, or follow the hint to --overwrite."""
    for _ in range(3):
        proc = subprocess.run(cli("--resume", run.name), cwd=cwd, env=env(), capture_output=True, text=True)
        log.append(proc.stderr)
        if proc.returncode == 0:
            return
        if "--overwrite" in proc.stderr:
            proc = subprocess.run(cli(*args, "--out", run.name, "--overwrite"), cwd=cwd, env=env(),
                                  capture_output=True, text=True)
            log.append(proc.stderr)
            return
        if "already finished" in proc.stderr:
            return


def pairs(run: Path) -> Counter:
    db = sqlite3.connect(f"file:{run / 'buffer.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT p.step_added, t.chosen_ids, t.rejected_ids FROM pairs p JOIN pair_tokens t"
                      " ON p.id = t.id").fetchall()
    db.close()
    return Counter(rows)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def leftovers(run: Path) -> list[str]:
    from sapo_lite.run.layout import RunDir

    odd = [p for p in run.rglob("*") if p.name.startswith((".tmp", ".del")) or p.suffix in (".restore", ".tmp")]
    odd += RunDir(run).incomplete_checkpoints()
    return [str(p.relative_to(run)) for p in odd]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=5)
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    args = base_args(opts.steps, opts.save_every)
    work = Path(tempfile.mkdtemp(prefix="sapo-faults-"))
    started = time.perf_counter()
    subprocess.run(cli(*args, "--out", "reference"), cwd=work, env=env(), check=True, capture_output=True)
    reference = work / "reference"
    ref_losses, ref_pairs = losses(reference), pairs(reference)
    ref_adapter = (reference / "adapters" / "policy" / "adapter_model.safetensors").read_bytes()

    kills, by_phase, chains = 0, Counter(), []
    while kills < opts.kills:
        run_cwd = work / f"chain-{len(chains)}"
        run_cwd.mkdir()
        run, log, chain_kills = run_cwd / "run", [], []
        for attempt in range(rng.randint(1, 4)):
            first = attempt == 0 or not (run / "config.yaml").exists()
            phase = pick_phase(rng, first, 0 if first else latest_step(run), opts.steps, opts.save_every)
            what = [*args, "--out", "run", *(["--overwrite"] if run.exists() else [])] if first \
                else ["--resume", "run"]
            if kill_at(what, run_cwd, phase, rng, log):
                kills += 1
                chain_kills.append(("resume " if not first else "") + phase.split(":")[0])
            if (run / "summary.json").exists() and not first and latest_step(run) == opts.steps:
                break
        for name in chain_kills:
            by_phase[name] += 1
        finish(run, run_cwd, args, log)
        finished = (run / "summary.json").is_file() and json.loads((run / "summary.json").read_text())["steps"] \
            == opts.steps
        trial = pairs(run) if (run / "buffer.sqlite").exists() else Counter()
        adapter = run / "adapters" / "policy" / "adapter_model.safetensors"
        chains.append({
            "kills": chain_kills,
            "finished": finished,
            "same_losses": finished and losses(run) == ref_losses,
            "same_adapter": adapter.is_file() and adapter.read_bytes() == ref_adapter,
            "pairs_lost": sum((ref_pairs - trial).values()),
            "pairs_duplicated": sum((trial - ref_pairs).values()),
            "leftovers": leftovers(run),
            "tracebacks": sum("Traceback" in text for text in log),
        })
        c = chains[-1]
        print(f"chain {len(chains):2d}: kills at {', '.join(c['kills']) or '(none landed)'}: "
              f"finished={c['finished']} same_losses={c['same_losses']} pairs_lost={c['pairs_lost']} "
              f"leftovers={c['leftovers']}", flush=True)
        shutil.rmtree(run_cwd)

    rows = [
        ("kills (SIGKILL delivered)", kills),
        ("runs (kill chains)", len(chains)),
        ("runs finished", sum(c["finished"] for c in chains)),
        ("runs with losses equal to an uninterrupted run", sum(c["same_losses"] for c in chains)),
        ("runs with a byte-identical final policy adapter", sum(c["same_adapter"] for c in chains)),
        ("pairs lost", sum(c["pairs_lost"] for c in chains)),
        ("pairs duplicated", sum(c["pairs_duplicated"] for c in chains)),
        ("leftovers", sum(len(c["leftovers"]) for c in chains)),
        ("tracebacks on stderr", sum(c["tracebacks"] for c in chains)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n{opts.steps} steps, save_every {opts.save_every}, seed {opts.seed}, "
          f"{time.perf_counter() - started:.0f}s")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("\nkills by phase: " + ", ".join(f"{name} {n}" for name, n in sorted(by_phase.items())))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
