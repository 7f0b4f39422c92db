"""Two processes on CPU (gloo), launched as users launch them: data-parallel SAPO end to end."""

import hashlib
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port, start_paused

pytestmark = pytest.mark.slow  # subprocess runs killed and resumed: minutes in all

TINY = ["--preset", "tiny", "loss.name=dpo", "loss.beta=0.1", "train.warmup_steps=2", "train.num_threads=1",
        "sapo.gen_per_step=8", "sapo.gen_batch_size=8", "train.micro_batch=8", "data.eval_size=8",
        "train.max_steps=8", "train.save_every=4"]
# One thread a process; no GPU even where there is one (two ranks cannot share a card under NCCL).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "SAPO_DEBUG_ADAPTER_SUMS": "1"}


def accelerate_launch(*args: str) -> list[str]:
    """The README's command (`accelerate launch --num_processes 2 -m sapo_lite train ...`), made explicit:
    without a GPU, accelerate needs --multi_gpu to start several processes (they then use gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "sapo_lite", "train", *args]


def run(command, cwd, expect=0):
    proc = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rank_debug(run_dir: Path, rank: int) -> dict[int, dict]:
    """Per step: this rank's own loss and the SHA-256 of its policy and EMA adapters (SAPO_DEBUG_ADAPTER_SUMS)."""
    lines = (run_dir / "debug" / f"adapter-sums-rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}  # a resumed step replaces the killed one


def adapter_sums(run_dir: Path, rank: int) -> dict[int, tuple[str, str]]:
    return {step: (r["policy"], r["ema"]) for step, r in rank_debug(run_dir, rank).items()}


def alive(pid: str) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except (FileNotFoundError, ProcessLookupError):
        return False


def buffer_rows(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return db.execute("SELECT t.chosen_ids, t.rejected_ids, p.step_added FROM pairs p "
                          "JOIN pair_tokens t ON t.id = p.id").fetchall()
    finally:
        db.close()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-process run of 8 steps, checkpoints at 4 and 8."""
    cwd = tmp_path_factory.mktemp("two")
    proc = run(accelerate_launch(*TINY, "--out", "run"), cwd)
    return cwd / "run", proc


def test_two_processes_train_to_the_end_with_identical_adapters_and_a_buffer_each(straight):
    run_dir, proc = straight
    assert "2 processes: 16 new pairs/step (8 each), effective batch 16 pairs/step" in proc.stdout
    assert proc.stdout.count("held-out exact match, base") == 1  # rank 0 speaks for both
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))
    for name in ("summary.json", "config.yaml", "adapters/policy/adapter_model.safetensors",
                 "adapters/ema/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name

    # Policy and EMA identical on both ranks after every step, and both move.
    sums = [adapter_sums(run_dir, rank) for rank in (0, 1)]
    assert sums[0] == sums[1]
    assert sorted(sums[0]) == list(range(1, 9))
    assert len({policy for policy, _ in sums[0].values()}) == 8
    assert sums[0][8][1] != sums[0][1][1]  # the EMA moved

    # metrics.jsonl logs the mean of the two ranks' losses, not rank 0's alone.
    own = [rank_debug(run_dir, rank) for rank in (0, 1)]
    # (Both start at log 2: DPO with policy = reference; they part once the policy moves.)
    assert any(own[0][step]["loss"] != own[1][step]["loss"] for step in range(1, 9))
    assert [r["loss"] for r in metrics(run_dir)] == [(own[0][s]["loss"] + own[1][s]["loss"]) / 2 for s in range(1, 9)]

    # One buffer per rank, each sound and holding its own 8 new pairs per step.
    assert not (run_dir / "buffer.sqlite").exists()
    rows = [buffer_rows(run_dir / f"buffer-rank{rank}.sqlite") for rank in (0, 1)]
    for rank_rows in rows:
        assert sorted(r[2] for r in rank_rows) == sorted(list(range(1, 9)) * 8)
    chosen = [{r[0] for r in rank_rows} for rank_rows in rows]
    assert not chosen[0] & chosen[1]  # different examples on each rank

    step_4 = run_dir / "checkpoints" / "step-4"
    assert json.loads((step_4 / "checkpoint.json").read_text())["processes"] == 2
    for name in ("buffer-rank0.sqlite", "buffer-rank1.sqlite", "rng-rank0.pt", "rng-rank1.pt"):
        assert (step_4 / name).is_file(), name
    rng = [torch.load(step_4 / f"rng-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert rng[0]["data_rng"] != rng[1]["data_rng"]  # each rank draws its own truncation points


def test_the_buffer_command_reads_each_ranks_buffer(straight):
    from typer.testing import CliRunner

    from sapo_lite.cli import app

    run_dir, _ = straight
    runner = CliRunner()
    for rank in ("0", "1"):
        shown = runner.invoke(app, ["buffer", str(run_dir), "--rank", rank])
        assert shown.exit_code == 0, shown.output
        assert f"rank {rank} of 2 processes" in shown.output
        assert "pairs: 64 of 2000" in shown.output
    missing = runner.invoke(app, ["buffer", str(run_dir), "--rank", "2"])
    assert missing.exit_code == 1
    assert "no buffer for rank 2" in missing.output


def test_estimate_says_its_figure_is_per_gpu():
    from typer.testing import CliRunner

    from sapo_lite.cli import app

    shown = CliRunner().invoke(app, ["estimate", "--preset", "llama3-8b-qlora"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "estimated peak per GPU" in shown.output and "the estimate is per GPU" in shown.output


def test_sigkill_then_resume_with_two_processes_repeats_the_uninterrupted_run(straight, tmp_path):
    """The launcher is killed while rank 0 writes the step-8 checkpoint (rank 1 waits at the barrier): the
    half-written `.tmp-step-8` is cleared by rank 0 alone on resume (two ranks deleting it raced), and the
    run resumes from step 4."""
    reference, _ = straight
    killed = tmp_path / "run"
    proc, _ = start_paused(tmp_path, "checkpoint-write:2", command=accelerate_launch(*TINY, "--out", "run"), env=ENV)
    assert (killed / "checkpoints" / ".tmp-step-8").is_dir()
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)  # the launcher only: its workers must not train on without it
    proc.wait()
    deadline = time.monotonic() + 30
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers))
    assert (killed / "checkpoints" / "step-4").is_dir()
    assert not (killed / "adapters").exists()

    # One process cannot continue a two-process run: one line, and the run is left as it was.
    def contents() -> dict:
        # The lock file is left out: the refused process held the run's lock while it checked, and
        # that file records the pid of whoever holds it.
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in killed.rglob("*")
                if p.is_file() and p.name != ".sapo-lite-run"}

    before = contents()
    refused = run([sys.executable, "-m", "sapo_lite", "train", "--resume", "run"], tmp_path, expect=1)
    assert refused.stderr.startswith("error: `run` was trained with 2 process(es); this resume runs 1\n")
    assert "accelerate launch --num_processes 2 -m sapo_lite train --resume run" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert contents() == before

    resumed = run(accelerate_launch("--resume", "run"), tmp_path)
    assert "resuming from step-4" in resumed.stdout
    after, straight_metrics = metrics(killed), metrics(reference)
    assert [r["step"] for r in after] == list(range(1, 9))
    assert [r["loss"] for r in after] == [r["loss"] for r in straight_metrics]
    assert [r["grad_norm"] for r in after] == [r["grad_norm"] for r in straight_metrics]
    for rank in (0, 1):  # adapters after every resumed step equal the uninterrupted run's, on both ranks
        assert adapter_sums(killed, rank) == adapter_sums(reference, rank)


def test_a_two_process_step_equals_a_one_process_step_on_twice_the_pairs(tiny_base_dir, tmp_path):
    script = str(Path(__file__).with_name("ddp_step.py"))
    spec = importlib.util.spec_from_file_location("ddp_step", script)
    ddp_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp_step)
    threads = torch.get_num_threads()
    try:  # the one-process step runs here, without a launcher
        ddp_step.main(str(tiny_base_dir), tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         script, str(tiny_base_dir), str(tmp_path / "two")], tmp_path)
    one = torch.load(tmp_path / "one" / "rank-0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "two" / f"rank-{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert one["grads"].keys() == ranks[0]["grads"].keys()
    assert sum(g.abs().sum() for g in one["grads"].values()) > 0
    for name, grad in one["grads"].items():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ranks[0]["after"][name], one["after"][name], rtol=1e-5, atol=1e-7)


def test_two_processes_validate_once_and_stop_early_after_the_same_step(tmp_path):
    """Rank 0 alone scores and sends its figures: both ranks keep its best step and stop after step 3, where
    patience 2 runs out for rank 0's figures (rank 1's own would have stopped it alone after step 2)."""
    script = str(Path(__file__).with_name("ddp_validation.py"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), script, str(tmp_path / "out")]
    try:  # a rank that stopped alone leaves the other waiting in a collective: give up well before CI would
        proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks did not finish together: one waits in a collective the other never joins")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["scored_by"] == [0, 0, 0, 0] and ranks[1]["scored_by"] == []  # one pass, on rank 0
    for rank in ranks:
        assert rank["nll"] == [3.0, 2.0, 2.5, 2.6] and rank["best_step"] == 1 and rank["stopped_after"] == 3
    assert ranks[0]["saved"] == [0, 1] and ranks[1]["saved"] == []  # rank 0 writes adapters/best
