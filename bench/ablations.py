"""SAPO on SmolLM2-135M-Instruct: the paper's ablations at this scale, and SAPO against plain SFT.

    python bench/ablations.py --out /tmp/ablations --jobs 2 --seeds 0 1    # main comparison, 2 seeds
    python bench/ablations.py --out /tmp/ablations --jobs 2 --ablations     # + the ablation rows, seed 0
    python bench/ablations.py --out /tmp/ablations --jobs 2 --seeds 0 1 --pair-rules  # + pair rules, every seed
    python bench/ablations.py --out /tmp/ablations --table                  # print the table of what is done

Every run is the `smollm2-135m` preset (same steps, same examples per step) with one change.
The held-out set (`bundled:instruct-eval`) is scored after training, greedy, for the base
(once), the policy and the EMA adapter: constraint satisfaction per prompt (all of its
constraints met, IFEval's prompt-level strict figure) and per constraint, per kind.
Runs already finished in --out are reused, so the script can be stopped and started again.
Each run uses one thread; `--jobs` runs that many at once.

Rows:
    sapo-orpo / sapo-dpo / sft      the preset with loss orpo (as shipped), dpo (beta 0.1), sft
    on-policy                        sapo.ema_decay=0: the policy itself generates (paper: 36.73 vs 50.39 IFEval)
    whole-response                   sapo.segment_len=64 >= every response: rewrite it all (paper: 52.00 vs 50.39)
    small-buffer                     sapo.buffer_size=4 (the last two steps' pairs) instead of 2000
    dpo-ref-refresh                  DPO with the reference refreshed from the EMA every 10 steps (official code)
    short-free                       sapo.short_rewrite=free: short responses rewritten with up to segment_len tokens
    identical-drop / -resample       sapo.identical=drop / resample: rewrites equal to the chosen response
    free-drop                        both: short_rewrite=free and identical=drop
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent

MAIN = {
    "sapo-orpo": [],
    "sapo-dpo": ["loss.name=dpo", "loss.beta=0.1"],
    "sft": ["loss.name=sft"],
}
ABLATIONS = {
    "on-policy": ["sapo.ema_decay=0"],
    "whole-response": ["sapo.segment_len=64"],
    "small-buffer": ["sapo.buffer_size=4"],
    "dpo-ref-refresh": ["loss.name=dpo", "loss.beta=0.1", "sapo.ref_refresh_steps=10"],
}
PAIR_RULES = {
    "short-free": ["sapo.short_rewrite=free"],
    "identical-drop": ["sapo.identical=drop"],
    "identical-resample": ["sapo.identical=resample"],
    "free-drop": ["sapo.short_rewrite=free", "sapo.identical=drop"],
}
EVAL_DATA = ROOT / "sapo_lite" / "assets" / "instruct-eval.jsonl"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sapo_lite.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- scoring


def score(run: Path, roles: list[str], eval_size: int, max_new_tokens: int) -> dict:
    """Held-out constraint satisfaction of each role of a finished run (in this process)."""
    import torch

    from sapo_lite.data.constraints import check
    from sapo_lite.models.generation import generate_answers
    from sapo_lite.models.roles import acting_as
    from sapo_lite.tools.open_run import open_run

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in EVAL_DATA.read_text().splitlines() if line.strip()][:eval_size]
    opened = open_run(run, roles)
    prompts = [opened.prompt_ids(r["prompt"]) for r in rows]
    results = {}
    for role in roles:
        started = time.perf_counter()
        with acting_as(opened.model, role):
            answers = generate_answers(opened.model, opened.tokenizer, prompts, max_new_tokens, opened.stop_ids)
        per_kind: dict[str, list[bool]] = defaultdict(list)
        prompt_ok = []
        for answer, row in zip(answers, rows):
            oks = [check(answer, c) for c in row["constraints"]]
            prompt_ok.append(all(oks))
            for c, ok in zip(row["constraints"], oks):
                per_kind[c["kind"]].append(ok)
        every = [ok for oks in per_kind.values() for ok in oks]
        results[role] = {
            "prompts": len(rows),
            "prompt_level": sum(prompt_ok) / len(rows),
            "constraint_level": sum(every) / len(every),
            "per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
            "per_kind_n": {k: len(v) for k, v in sorted(per_kind.items())},
            "eval_s": time.perf_counter() - started,
            "examples": answers[:3],
        }
    return results


# ---------------------------------------------------------------- running


def run_one(out: Path, name: str, seed: int, overrides: list[str], base_dir: Path, args) -> Path:
    run = out / f"{name}-s{seed}"
    if (run / "heldout.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)  # an unfinished run starts again
    log_path = out / f"{run.name}.log"
    log = log_path.open("w")
    # model.name: the dequantised GGUF folder, shared instead of converted again in every run
    command = cli("train", "--preset", "smollm2-135m", "--out", str(run), "data.eval_path=null",
                  f"model.name={base_dir}", f"train.seed={seed}", "train.save_every=0", *args.override, *overrides)
    started = time.perf_counter()
    subprocess.run(command, env=env(), stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    train_wall_s = time.perf_counter() - started
    roles = "policy,ema" if name in MAIN else "policy"  # the EMA of the ablation rows is left out, for time
    subprocess.run([sys.executable, __file__, "--score-run", str(run), "--roles", roles,
                    "--eval-size", str(args.eval_size), "--max-new-tokens", str(args.max_new_tokens)],
                   env=env(), stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    (run / "wall.json").write_text(json.dumps({"train_wall_s": train_wall_s}))
    return run


def base_folder(out: Path) -> Path:
    """SmolLM2's GGUF dequantised once into OUT/_base (a 1-step run builds it and scores the base)."""
    run = out / "_base"
    if not (run / "heldout.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        subprocess.run(cli("train", "--preset", "smollm2-135m", "--out", str(run), "data.eval_path=null",
                           "train.max_steps=1", "train.save_every=0"), env=env(), check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return run


# ---------------------------------------------------------------- table


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * (max(values) - min(values)) / 2:.1f}"


def pair_share(records: list[dict], key: str) -> float | None:
    """A per-step share averaged over the run; None where it was not logged."""
    shares = [r[key] for r in records if r.get(key) is not None]
    return sum(shares) / len(shares) if shares else None


def table(out: Path) -> None:
    base_file = out / "_base" / "heldout.json"
    base = json.loads(base_file.read_text())["base"] if base_file.is_file() else None
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in sorted(out.glob("*-s[0-9]*")):
        if (run / "heldout.json").is_file():
            name = run.name.rsplit("-s", 1)[0]
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            groups[name].append({
                "heldout": json.loads((run / "heldout.json").read_text()),
                "steps": len(records),
                "step_s": statistics.median(r["step_s"] for r in records),
                "gen_share": statistics.median(r["gen_share"] for r in records),
                "wall_s": json.loads((run / "wall.json").read_text())["train_wall_s"],
                # first rewrites identical, over the run's new pairs; cut off, of the buffer at the end of the
                # run (`pairs/cut_off` is a share of the buffer: its last value, as `buffer --stats` counts it)
                "identical": pair_share(records, "pairs/identical"),
                "cut_off": next((r["pairs/cut_off"] for r in reversed(records) if r.get("pairs/cut_off") is not None),
                                None),
            })
    n = base["prompts"] if base else "?"
    print(f"held-out: bundled:instruct-eval, {n} prompts, greedy; prompt = every constraint met, constraint = each"
          " one; mean ± half-range over seeds")
    print(f"{'run':<20}{'seeds':>6}{'steps':>6}  {'policy prompt':>15}{'policy constr.':>16}"
          f"{'EMA prompt':>15}{'EMA constr.':>15}{'step s':>8}{'gen':>6}{'ident.':>8}{'cut':>6}")
    if base:
        print(f"{'base (no adapter)':<20}{'':>6}{'':>6}  {mean_spread([base['prompt_level']]):>15}"
              f"{mean_spread([base['constraint_level']]):>16}")
    order = [*MAIN, *ABLATIONS, *PAIR_RULES]
    for name in sorted(groups, key=lambda g: order.index(g) if g in order else 99):
        runs = groups[name]
        cells = [mean_spread([r["heldout"][role][key] for r in runs if role in r["heldout"]])
                 for role in ("policy", "ema") for key in ("prompt_level", "constraint_level")]
        step_s = statistics.median(r["step_s"] for r in runs)
        gen_share = statistics.median(r["gen_share"] for r in runs)
        shares = [statistics.mean(r[key] for r in runs) if runs[0][key] is not None else None
                  for key in ("identical", "cut_off")]
        ident, cut = (f"{share:.0%}" if share is not None else "-" for share in shares)
        print(f"{name:<20}{len(runs):>6}{runs[0]['steps']:>6}  {cells[0]:>15}{cells[1]:>16}{cells[2]:>15}{cells[3]:>15}"
              f"{step_s:>8.1f}{gen_share:>6.0%}{ident:>8}{cut:>6}")
    kinds = sorted(base["per_kind"]) if base else []
    if kinds:
        print("\nper kind, policy (base first), % of constraints met (count):")
        width = max(18, *(len(name) + 2 for name in groups))
        print(f"{'kind':<18}{'base':>8}" + "".join(f"{name:>{width}}" for name in groups))
        for kind in kinds:
            cells = [mean_spread([r["heldout"]["policy"]["per_kind"][kind] for r in groups[name]]) for name in groups]
            print(f"{kind + ' (' + str(base['per_kind_n'][kind]) + ')':<18}{100 * base['per_kind'][kind]:>8.1f}"
                  + "".join(f"{c:>{width}}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/sapo-ablations"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--ablations", action="store_true", help="also the ablation rows (first seed only)")
    parser.add_argument("--pair-rules", action="store_true", help="also the pair-rule rows (every seed)")
    parser.add_argument("--only", nargs="+", help="run only these rows")
    parser.add_argument("--override", nargs="*", default=[], help="key=value applied to every run")
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--score-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--roles", default="policy,ema", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_run:
        results = score(args.score_run, args.roles.split(","), args.eval_size, args.max_new_tokens)
        (args.score_run / "heldout.json").write_text(json.dumps(results, indent=1))
        return
    if args.table:
        table(args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    base_run = base_folder(args.out)
    jobs = [(name, seed, overrides) for seed in args.seeds for name, overrides in MAIN.items()]
    if args.ablations:
        jobs += [(name, args.seeds[0], overrides) for name, overrides in ABLATIONS.items()]
    if args.pair_rules:
        jobs += [(name, seed, overrides) for seed in args.seeds for name, overrides in PAIR_RULES.items()]
    if args.only:
        jobs = [job for job in jobs if job[0] in args.only]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, args.out, n, s, o, base_run / "base_model", args) for n, s, o in jobs]
        if not (base_run / "heldout.json").is_file():
            subprocess.run([sys.executable, __file__, "--score-run", str(base_run), "--roles", "base",
                            "--eval-size", str(args.eval_size), "--max-new-tokens", str(args.max_new_tokens)],
                           env=env(), check=True, cwd=ROOT)
        for future in futures:
            future.result()
    table(args.out)


if __name__ == "__main__":
    main()
