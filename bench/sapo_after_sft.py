"""SAPO after SFT, the paper's protocol at 135M: from one SFT adapter, continue with SFT, SAPO-DPO or SAPO-ORPO.

    sapo-lite train --preset smollm2-135m-sft --out runs/smollm2-135m-sft        # stage 1 (its adapters/best)
    python bench/sapo_after_sft.py --sft runs/smollm2-135m-sft --out /tmp/after-sft --jobs 2
    python bench/sapo_after_sft.py --sft runs/smollm2-135m-sft --out /tmp/after-sft --table   # what is done

Every continuation is the `smollm2-135m` preset started from the SFT stage's best adapter
(`model.init_adapter`, which is also the DPO reference, as the paper uses its SFT model), with a
constant learning rate after 3 warm-up steps, 4 new examples a step (the same examples, in the
same order, for every method of a seed) and one change: the method.

    sft          continued SFT on the chosen responses (no generation)
    sapo-dpo     SAPO with DPO, beta 0.1 (the paper's)
    sapo-orpo    SAPO with ORPO, lambda 0.05 (the paper's scripts)
    sapo-orpo-l0.5   SAPO with ORPO, lambda 0.5 (at 0.05 ORPO is mostly its NLL term)

Protocol, in this order; the held-out set is read only by the last step:
1. grid: each method at each learning rate of LRS (the same grid for every method), seed 0, to
   GRID_STEPS steps, validation (100 examples carved from the training data) every 50 steps;
2. choice: each method's learning rate is the one with the best val/constraints at GRID_STEPS
   (ties: lower val/nll); no held-out figure is looked at;
3. final: continued SFT, SAPO-DPO (the paper's loss) and the ORPO variant with the better
   val/constraints, each at its chosen rate with seeds 1 and 2 beside the grid's seed 0 (a budget
   in BUDGETS beyond GRID_STEPS resumes seed 0: a constant rate makes that exactly a longer run);
4. held-out: the policy of every final run at each budget (its checkpoint at that step), the SFT
   starting adapter, and the base: bundled:instruct-eval, 200 prompts, greedy, 64 new tokens.

Runs already done in --out are reused, so the script can be stopped and started again. Each run
uses one thread; `--jobs` runs that many at once.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent

METHODS = {
    "sft": ["loss.name=sft"],
    "sapo-dpo": ["loss.name=dpo", "loss.beta=0.1"],
    "sapo-orpo": ["loss.name=orpo", "loss.beta=0.05"],
    "sapo-orpo-l0.5": ["loss.name=orpo", "loss.beta=0.5"],
}
LRS = ("1e-4", "4e-4")
GRID_STEPS, BUDGETS, SEEDS = 100, (100, 200), (0, 1, 2)
COMMON = ["data.eval_path=null", "train.lr_scheduler=constant", "train.warmup_steps=3", "data.val_size=100",
          "train.eval_every=50", "train.best_metric=val/constraints", "train.save_every=50",
          "train.keep_checkpoints=10", "train.num_threads=1"]
EVAL_DATA = "bundled:instruct-eval"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sapo_lite.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def records(run: Path) -> dict[int, dict]:
    from sapo_lite.run.records import read_metrics

    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}


def finished_steps(run: Path) -> int:
    summary = run / "summary.json"
    return json.loads(summary.read_text())["steps"] if summary.is_file() else 0


# ---------------------------------------------------------------- training


def train(sft: Path, run: Path, method: str, lr: str, seed: int, steps: int) -> Path:
    """Train (or resume) a continuation to `steps` steps; a no-op when it is already there."""
    done = finished_steps(run)
    if done >= steps:
        return run
    log = (run.parent / f"{run.name}.log").open("a")
    if done:  # a finished shorter run: the constant rate makes resuming exactly a longer run
        command = cli("train", "--resume", str(run), f"train.max_steps={steps}")
    elif (run / "checkpoints").is_dir():  # stopped part way
        command = cli("train", "--resume", str(run))
    else:
        command = cli("train", "--preset", "smollm2-135m", "--out", str(run), "--overwrite",
                      f"model.name={sft / 'base_model'}", f"model.init_adapter={sft / 'adapters' / 'best'}",
                      f"train.lr={lr}", f"train.seed={seed}", f"train.max_steps={steps}", *COMMON, *METHODS[method])
    started = time.perf_counter()
    subprocess.run(command, env=env(), stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    walls = json.loads((run / "wall.json").read_text()) if (run / "wall.json").is_file() else {}
    walls[str(steps)] = time.perf_counter() - started
    (run / "wall.json").write_text(json.dumps(walls))
    return run


def finalists(choice: dict[str, dict]) -> list[str]:
    """SFT, SAPO-DPO, and of the ORPO variants the one with the best val/constraints (ties: lower val/nll)."""
    def seen(method: str) -> dict:
        return choice[method]["grid"][choice[method]["lr"]]

    orpo = max((m for m in choice if "orpo" in m), key=lambda m: (seen(m)["val/constraints"], -seen(m)["val/nll"]))
    return [m for m in choice if m in ("sft", "sapo-dpo", orpo)]


def choose_lr(out: Path, method: str) -> tuple[str, dict[str, dict]]:
    """The grid's learning rate with the best val/constraints at GRID_STEPS (ties: lower val/nll)."""
    seen = {lr: records(out / f"{method}-lr{lr}-s0")[GRID_STEPS] for lr in LRS}
    best = max(LRS, key=lambda lr: (seen[lr]["val/constraints"], -seen[lr]["val/nll"]))
    return best, {lr: {k: v for k, v in r.items() if k.startswith("val/")} for lr, r in seen.items()}


# ---------------------------------------------------------------- held-out scoring


def score_adapter(base_dir: Path, adapter_dir: Path | None) -> dict:
    """Held-out figures of one adapter (None: the base), in this process: what `sapo-lite eval` reports."""
    import torch

    from sapo_lite.config.sources import load_config
    from sapo_lite.data.examples import install_chat_template, load_examples, stop_token_ids
    from sapo_lite.models.generation import evaluate_role
    from sapo_lite.models.roles import load_base, load_tokenizer

    torch.set_num_threads(1)
    cfg = load_config("smollm2-135m")
    tokenizer = load_tokenizer(str(base_dir))
    install_chat_template(tokenizer, cfg.data.chat_template)
    examples = load_examples(EVAL_DATA, None, tokenizer, cfg.data, key="eval").examples[: cfg.data.eval_size]
    from peft import PeftModel

    # evaluate_role switches adapters, so the base is scored as a PeftModel with its adapter off
    model = load_base(cfg.model, str(base_dir), torch.device("cpu"))
    model = PeftModel.from_pretrained(model, str(adapter_dir or base_dir.parent / "adapters" / "best"),
                                      adapter_name="policy")
    role = "policy" if adapter_dir is not None else "base"
    started = time.perf_counter()
    score = evaluate_role(model, tokenizer, examples, role, cfg.data.eval_max_new_tokens, stop_token_ids(tokenizer))
    return {**score.to_dict(), "eval_s": time.perf_counter() - started}


def held_out(target: Path, base_dir: Path, adapter_dir: Path | None) -> None:
    if target.is_file():
        return
    command = [sys.executable, __file__, "--score", str(base_dir), str(adapter_dir or "-"), str(target)]
    subprocess.run(command, env=env(), check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


# ---------------------------------------------------------------- table


def rate(figures: dict, key: str) -> float:
    return figures[key]["rate"]


def mean_spread(values: list[float], scale: float = 100) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{scale * values[0]:.1f}"
    return f"{scale * statistics.mean(values):.1f} ± {scale * (max(values) - min(values)) / 2:.1f}"


def table(out: Path) -> str:
    lines = [f"held-out: {EVAL_DATA}, 200 prompts, greedy, 64 new tokens; constraint = each constraint met, prompt ="
             " every constraint of a prompt met; mean ± half-range over seeds", ""]
    choice = json.loads((out / "choice.json").read_text()) if (out / "choice.json").is_file() else {}
    header = ["run", "lr (val-chosen)", "seeds"]
    for budget in BUDGETS:
        header += [f"constraint @{budget}", f"prompt @{budget}"]
    header += ["val constr. 0/50/100/150/200", "step s", "gen share"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, label in (("base", "base (adapters off)"), ("sft-stage", "SFT stage (start of every row)")):
        path = out / "heldout" / f"{name}.json"
        if path.is_file():
            figures = json.loads(path.read_text())
            cells = [mean_spread([rate(figures, "constraints")]), mean_spread([rate(figures, "prompts_all_satisfied")])]
            lines.append("| " + " | ".join([label, "", "", *cells * len(BUDGETS), "", "", ""]) + " |")
    for method in finalists(choice) if choice else []:
        lr = choice[method]["lr"]
        runs = [out / f"{method}-lr{lr}-s{seed}" for seed in SEEDS]
        cells = []
        for budget in BUDGETS:
            scores = [json.loads(p.read_text()) for p in (out / "heldout" / f"{r.name}@{budget}.json" for r in runs)
                      if p.is_file()]
            cells += [mean_spread([rate(s, "constraints") for s in scores]),
                      mean_spread([rate(s, "prompts_all_satisfied") for s in scores])]
        logs = [records(r) for r in runs if (r / "metrics.jsonl").is_file()]
        curve = "/".join(f"{100 * statistics.mean(log[s]['val/constraints'] for log in logs if s in log):.1f}"
                         for s in range(0, BUDGETS[-1] + 1, 50) if any(s in log for log in logs))
        trained = [r for log in logs for s, r in log.items() if s > 0 and "step_s" in r]
        step_s = statistics.median(r["step_s"] for r in trained) if trained else float("nan")
        gen = statistics.median(r["gen_share"] for r in trained) if trained else float("nan")
        lines.append("| " + " | ".join([method, lr, str(len(logs)), *cells, curve, f"{step_s:.2f}", f"{gen:.0%}"])
                     + " |")
    if choice:
        lines += ["", "learning-rate grid (seed 0, validation split at step 100; the held-out set never read here):"]
        for method, chosen in choice.items():
            seen = ", ".join(f"lr {lr}: constraints {100 * f['val/constraints']:.1f}, nll {f['val/nll']:.3f}, "
                             f"accuracy {100 * f['val/accuracy']:.0f}%" for lr, f in chosen["grid"].items())
            lines.append(f"- {method}: {seen} -> {chosen['lr']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", type=Path, default=ROOT / "runs" / "smollm2-135m-sft")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sapo-after-sft"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only print the table of what is done")
    parser.add_argument("--score", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        base, adapter, target = args.score
        figures = score_adapter(Path(base), None if adapter == "-" else Path(adapter))
        Path(target).write_text(json.dumps(figures, indent=1))
        return
    if not args.table:
        run_all(args)
    text = table(args.out)
    print(text)
    (args.out / "table.md").write_text(text + "\n")


def run_all(args: argparse.Namespace) -> None:
    sft, out = args.sft.resolve(), args.out
    if not (sft / "adapters" / "best" / "adapter_model.safetensors").is_file():
        sys.exit(f"{sft} has no adapters/best: train stage 1 first (sapo-lite train --preset smollm2-135m-sft)")
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        grid = [pool.submit(train, sft, out / f"{m}-lr{lr}-s0", m, lr, 0, GRID_STEPS) for m in METHODS for lr in LRS]
        for future in grid:
            future.result()
        choice = {}
        for method in METHODS:
            lr, seen = choose_lr(out, method)
            choice[method] = {"lr": lr, "grid": seen}
        (out / "choice.json").write_text(json.dumps(choice, indent=1))
        chosen = finalists(choice)
        # the longest runs first, so the two workers finish together
        final = [pool.submit(train, sft, out / f"{m}-lr{choice[m]['lr']}-s{seed}", m, choice[m]["lr"], seed,
                             BUDGETS[-1]) for m in sorted(chosen, key=lambda m: m != "sapo-dpo") for seed in SEEDS]
        base_dir = sft / "base_model"
        scoring = [pool.submit(held_out, out / "heldout" / "base.json", base_dir, None),
                   pool.submit(held_out, out / "heldout" / "sft-stage.json", base_dir, sft / "adapters" / "best")]
        for future in final:
            future.result()
        for method in chosen:
            c = choice[method]
            for seed in SEEDS:
                run = out / f"{method}-lr{c['lr']}-s{seed}"
                for budget in BUDGETS:
                    adapter = run / "checkpoints" / f"step-{budget}" / "adapters" / "policy"
                    scoring.append(pool.submit(held_out, out / "heldout" / f"{run.name}@{budget}.json", base_dir,
                                               adapter))
        for future in scoring:
            future.result()
    (out / "wall.json").write_text(json.dumps({"wall_s": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
