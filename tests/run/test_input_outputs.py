"""Where sapo-lite writes: run folders that cannot be made, runs that never start, merges that must not
land inside a run or over a folder sapo-lite did not write; and the warnings a run prints once."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fails, snapshot
from typer.testing import CliRunner

from sapo_lite.cli import app

runner = CliRunner()






@pytest.fixture
def run(finished_tiny_run):
    return finished_tiny_run


# ---------------------------------------------------------------- run folders


def test_out_under_a_file_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    fails(["train", "--out", str(tmp_path / "notes.txt" / "run")], "`" + str(tmp_path / "notes.txt") + "` is a file")
    assert snapshot(tmp_path) == {tmp_path.joinpath("notes.txt").relative_to(tmp_path): b"mine"}


def test_out_that_is_not_writable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("sapo_lite.run.folders.os.access", lambda path, mode: False)  # root may write anywhere
    fails(["train", "--out", str(tmp_path / "a" / "run")], "no permission to write in", "choose another --out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True], ids=["created", "empty-folder-given"])
def test_any_failure_before_the_first_step_removes_what_it_created(tmp_path, monkeypatch, existing):
    out = tmp_path / "new" / "run"
    if existing:
        out.mkdir(parents=True)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")  # not a SapoError: a bug or the machine, still no debris

    monkeypatch.setattr("sapo_lite.train.session.load_base", broken)
    result = runner.invoke(app, ["train", "--out", str(out), "data.eval_path=null"])
    assert isinstance(result.exception, RuntimeError)
    if existing:
        assert out.is_dir() and list(out.iterdir()) == []
    else:
        assert list(tmp_path.iterdir()) == []


def test_resume_with_overwrite_leaves_the_run_alone(run):
    before = snapshot(run)
    fails(["train", "--resume", str(run), "--overwrite"], "--resume continues a run and --overwrite would delete it")
    assert snapshot(run) == before


def test_an_init_adapter_of_another_rank(run, tmp_path):
    fails(["train", "--out", str(tmp_path / "r2"), "data.eval_path=null", "lora.r=8",
           f"model.init_adapter={run / 'adapters' / 'policy'}"], "rank 16 but lora.r=8", "lora.r=16")
    assert not (tmp_path / "r2").exists()


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("where", ["base_model", ".", "adapters/policy/merged"])
def test_merge_never_writes_inside_the_run(run, where):
    before = snapshot(run)
    fails(["merge", str(run), "--out", str(run / where), "--overwrite"], "inside the run")
    assert snapshot(run) == before


def test_merge_overwrite_replaces_only_its_own_output(run, tmp_path):
    model_folder = tmp_path / "downloaded-model"
    shutil.copytree(run / "base_model", model_folder)
    before = snapshot(model_folder)
    fails(["merge", str(run), "--out", str(model_folder), "--overwrite"], "was not written by `sapo-lite merge`")
    assert snapshot(model_folder) == before
    for _ in range(2):  # the second time replaces the first merge
        result = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged"), "--overwrite"])
        assert result.exit_code == 0, result.output


def test_merged_files_have_the_users_normal_permissions(run, tmp_path):
    umask = os.umask(0o022)
    try:
        result = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged")])
    finally:
        os.umask(umask)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_every_file_a_run_writes_has_the_users_normal_permissions(tmp_path):
    """Under umask 022 a user's files are 0644 and folders 0755: the base model, adapters and checkpoints
    too, which safetensors would write owner-only (0600)."""
    umask = os.umask(0o022)
    try:
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "data.eval_path=null",
                                     "train.max_steps=3", "train.save_every=2"])
    finally:
        os.umask(umask)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    files = {p.relative_to(run): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    folders = {p.relative_to(run): stat.S_IMODE(p.stat().st_mode) for p in [run, *run.rglob("*")] if p.is_dir()}
    for written in ("base_model/model.safetensors", "adapters/policy/adapter_model.safetensors",
                    "adapters/ema/adapter_model.safetensors",
                    "checkpoints/step-2/adapters/ema/adapter_model.safetensors",
                    "checkpoints/step-3/trainer_state.pt", "config.yaml", "metrics.jsonl", "buffer.sqlite"):
        assert files.get(Path(written)) == 0o644, (written, oct(files.get(Path(written), 0)))
    assert {path: oct(mode) for path, mode in files.items() if mode != 0o644} == {}
    assert {path: oct(mode) for path, mode in folders.items() if mode != 0o755} == {}


@pytest.mark.slow
def test_nf4_roundtrip_merge_prints_no_library_notice(run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "sapo_lite.cli", "merge", str(run), "--out", str(tmp_path / "m"),
                             "--nf4-roundtrip"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "kernels" not in result.stdout, result.stderr


# ---------------------------------------------------------------- warnings a run prints once


def test_a_run_warns_about_unknown_tokens_positions_and_the_cpu_optimizer(tmp_path):
    data = tmp_path / "french.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Bonjour, comment ça va ?", "response": "Très bien, merci beaucoup"})
                            + "\n" for _ in range(8)))
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), f"data.path={data}", "train.max_steps=1",
                                 "train.optimizer=paged_adamw_8bit", "data.max_len=300", "data.max_prompt_len=100",
                                 "sapo.gen_per_step=4", "train.micro_batch=4"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("of the data's response tokens are unknown to the tokenizer (<unk>)") == 1, out
    assert out.count("data.max_len=300 is longer than the model's max_position_embeddings=256") == 1, out
    assert out.count("optimizer: paged_adamw_8bit needs CUDA; using torch AdamW on cpu") == 1, out
    assert "config: data.eval_path=holdout (bundled:tiny-reverse-eval belongs to bundled:tiny-reverse: held " in out
    assert "eval: none: 8 examples are too few to hold 10% out" in out
    assert "Paged optimizers are not supported" not in out
