"""How long `sapo-lite --help` and `sapo-lite train --help` take, this tree against a git ref.

    python bench/cli_help.py [--ref main] [--rounds 7]

The ref is exported with `git archive` into a temporary folder; the two trees run in interleaved
rounds (order alternating). Prints median [min-max] CPU seconds (user + system) of each command,
which a busy machine inflates far less than wall time, and the ratio of medians.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (["--help"], ["train", "--help"], ["merge", "--help"])


def seconds(tree: Path, args: list[str]) -> float:
    """CPU seconds (user + system) of one run: on a shared machine wall time mostly measures the neighbours."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # cwd=tree: `python -m` puts the working directory ahead of PYTHONPATH
    subprocess.run([sys.executable, "-m", "sapo_lite.cli", *args], env=env, cwd=tree, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref", default="main")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        trees = {args.ref: Path(tmp), "this tree": ROOT}
        times = {(name, " ".join(cmd)): [] for name in trees for cmd in COMMANDS}
        for round_ in range(args.rounds):
            order = list(trees.items()) if round_ % 2 == 0 else list(trees.items())[::-1]
            for cmd in COMMANDS:
                for name, tree in order:
                    times[(name, " ".join(cmd))].append(seconds(tree, cmd))
    print(f"| command (CPU s) | {args.ref} | this tree | ratio |")
    print("|---|---|---|---|")
    for cmd in COMMANDS:
        label = " ".join(cmd)
        before, after = times[(args.ref, label)], times[("this tree", label)]
        print(f"| sapo-lite {label} | {statistics.median(before):.2f} [{min(before):.2f}-{max(before):.2f}] | "
              f"{statistics.median(after):.2f} [{min(after):.2f}-{max(after):.2f}] | "
              f"{statistics.median(before) / statistics.median(after):.1f}x |")


if __name__ == "__main__":
    main()
