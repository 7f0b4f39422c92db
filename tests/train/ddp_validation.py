"""Validation passes and early stopping under two processes, run by tests/train/test_distributed.py:

    torchrun --nproc_per_node 2 tests/train/ddp_validation.py OUT

The real ValidationWatch and process group (gloo); the scorer is scripted so that each rank, were it to
score, would see its own figures (as GPUs summing in different orders do), and rank 1's would stop the run
a pass earlier than rank 0's. The steps call the loop's per-step collective (the agreed stop), so a rank that
stopped alone would leave the other waiting in it. Writes OUT/rank-K.json: which ranks scored, the passes'
figures, the best step and the step the rank stopped after.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from sapo_lite.config.sources import load_config
from sapo_lite.train import validation
from sapo_lite.train.distributed import start_processes

# val/nll of the passes at steps 0, 1, 2, ...: rank 0 has its best at step 1 and, with patience 2, stops
# after step 3; rank 1's figures would have it stop after step 2.
SCRIPTS = {0: [3.0, 2.0, 2.5, 2.6, 1.0, 1.0], 1: [3.0, 3.1, 3.2, 3.3, 1.0, 1.0]}


def main(out: Path) -> None:
    processes = start_processes()
    scored, saved = [], []

    class ScriptedValidation:
        def __init__(self, session, examples, console=None):
            self.script = iter(SCRIPTS[processes.rank])

        def score(self):
            scored.append(processes.rank)
            return {"val/nll": next(self.script), "val/accuracy": 0.5, "val/margin": 0.0, "val_s": 0.0}

    validation.Validation = ScriptedValidation
    validation.save_best_adapter = lambda model, run_dir, best: saved.append(best.step)
    cfg = load_config("tiny", overrides=["data.val_size=4", "train.eval_every=1", "train.patience=2",
                                         "train.max_steps=6", "train.best_metric=val/nll"])
    rows = [SimpleNamespace(constraints=None)] * 4
    session = SimpleNamespace(cfg=cfg, processes=processes, val_examples=rows, run_dir=out, model=None)
    watch = validation.ValidationWatch(session, {})
    passes = [watch.before_training()]
    stopped_after = None
    for step in range(1, cfg.train.max_steps + 1):
        record = {"step": step}
        watch.after_step(step, record)
        passes.append(record)
        if processes.any(False) or watch.should_stop:  # the loop's agreed stop: a collective every step
            stopped_after = step
            break
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{processes.rank}.json").write_text(json.dumps({
        "scored_by": scored, "nll": [p.get("val/nll") for p in passes], "best_step": watch.best.step,
        "stopped_after": stopped_after, "saved": saved,
    }))
    processes.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
