"""Every bad input ends in a one-line error naming the culprit and the fix, exit 1, no traceback."""

import json
import shutil
import sys

import pytest
from helpers import fails, snapshot, write_jsonl
from typer.testing import CliRunner

from sapo_lite.cli import app

runner = CliRunner()






@pytest.fixture
def train_args(tmp_path):
    return ["train", "--out", str(tmp_path / "run"), "data.eval_path=null", "train.max_steps=2"]




# ---------------------------------------------------------------- config


@pytest.mark.parametrize("args,expected", [
    (["--preset", "llama3"], ["unknown preset `llama3`", "llama3-8b-qlora"]),
    (["--preset", "presets/my-run.yaml"], ["`presets/my-run.yaml` is a file", "--config presets/my-run.yaml"]),
    (["sapo.ema_decy=0.3"], ["unknown config key `sapo.ema_decy`", "sapo.ema_decay"]),
    (["train.lr=abc"], ["train.lr='abc'", "a number"]),
    (["train.lr=-1"], ["train.lr must be > 0"]),
    (["sapo.ema_decay=1.5"], ["sapo.ema_decay must be in [0, 1]"]),
    (["sapo.segment_len=0"], ["sapo.segment_len must be >= 1"]),
    (["sapo.buffer_size=0"], ["sapo.buffer_size must be >= 1"]),
    (["loss.beta=0"], ["loss.beta must be > 0"]),
    (["loss.name=ipo"], ["loss.name='ipo'", "dpo, orpo"]),
    (["--config", "missing.yaml"], ["config file `missing.yaml` does not exist"]),
])
def test_bad_config(tmp_path, args, expected):
    fails(["train", "--out", str(tmp_path / "run"), *args], *expected)
    assert not (tmp_path / "run").exists()


def test_a_config_file_passed_as_a_preset_points_to_config(tmp_path):
    """Any existing file given to --preset, whatever its name, is answered with --config; so is `estimate`'s."""
    settings = tmp_path / "settings.conf"
    settings.write_text("train:\n  lr: 1.0e-4\n")
    fails(["train", "--out", str(tmp_path / "run"), "--preset", str(settings)], "is a file", f"--config {settings}")
    fails(["estimate", "--preset", "mine.yml"], "`mine.yml` is a file", "--config mine.yml")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- data


def test_data_file_that_does_not_exist(train_args, tmp_path):
    fails([*train_args, f"data.path={tmp_path}/nope.jsonl"], "nope.jsonl` does not exist", "data.path")


def test_empty_data_file(train_args, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    fails([*train_args, f"data.path={tmp_path}/empty.jsonl"], "is empty")


def test_malformed_jsonl_line(train_args, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "reverse : 1 2", "response": "2 1"}\n\n{"prompt": \n')
    fails([*train_args, f"data.path={tmp_path}/bad.jsonl"], "line 3 is not valid JSON")


def test_data_without_a_usable_column(train_args, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}])
    fails([*train_args, f"data.path={path}"], "found: instruction, output", "`prompt` and `response`")


def test_every_prompt_over_the_length_limit(train_args, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "reverse : " + "1 " * 60, "response": "1"}])
    fails([*train_args, f"data.path={path}"], "longer than data.max_prompt_len=48", "data.max_prompt_len")
    assert not (tmp_path / "run").exists()  # a run that never started leaves no folder behind


def test_hub_dataset_offline(train_args):
    fails([*train_args, "data.path=someone/some-dataset"], "cannot load dataset `someone/some-dataset`", "local")


# ---------------------------------------------------------------- model


def test_tokenizer_without_chat_template(train_args, tmp_path, tiny_base_dir):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_base_dir, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    fails([*train_args, f"model.name={folder}"], "no chat template", "data.chat_template")


@pytest.mark.parametrize("name", ["someone/not-a-model"])
def test_model_that_cannot_be_found(train_args, name):
    fails([*train_args, f"model.name={name}"], f"cannot load model `{name}`", "model.name", "offline")


def test_nf4_without_bitsandbytes(train_args, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    fails([*train_args, "model.quant=nf4"], "model.quant=nf4 needs bitsandbytes", "model.quant=none")


# ---------------------------------------------------------------- run directories


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    fails(["train", "--resume", str(tmp_path)], "is not a sapo-lite run")
    assert snapshot(tmp_path) == {tmp_path.joinpath("notes.txt").relative_to(tmp_path): b"mine"}


def test_resume_when_every_checkpoint_is_incomplete(finished_tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_tiny_run, run)
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "trainer_state.pt").unlink()  # as if killed mid-write
    before = snapshot(run)
    fails(["train", "--resume", str(run), "train.max_steps=4"], "no complete checkpoint")
    assert snapshot(run) == before


def test_resume_with_an_unsafe_override(finished_tiny_run):
    before = snapshot(finished_tiny_run)
    fails(["train", "--resume", str(finished_tiny_run), "lora.r=64"], "`lora.r` cannot change when resuming")
    assert snapshot(finished_tiny_run) == before


def test_resume_of_a_finished_run(finished_tiny_run):
    fails(["train", "--resume", str(finished_tiny_run)], "already finished its 2 steps", "train.max_steps=4")


def test_corrupted_buffer_snapshot(finished_tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_tiny_run, run)
    (run / "checkpoints" / "step-2" / "buffer.sqlite").write_bytes(b"garbage" * 1000)
    fails(["train", "--resume", str(run), "train.max_steps=4"], "no complete checkpoint",
          "step-2: buffer.sqlite has 7000 bytes")


def test_corrupted_run_buffer_is_repaired_from_the_checkpoint(finished_tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_tiny_run, run)
    (run / "buffer.sqlite").write_bytes(b"garbage" * 1000)
    result = runner.invoke(app, ["train", "--resume", str(run), "train.max_steps=3"])
    assert result.exit_code == 0, result.output


def test_non_finite_losses_skip_the_update_and_stop_after_three(tmp_path, monkeypatch):
    import torch

    from sapo_lite.sapo import losses

    real = losses.LOSSES["dpo"]

    def poisoned(logps, beta):  # finite for 2 steps, then NaN: e.g. an fp16 overflow
        out = real.fn(logps, beta)
        poisoned.calls += 1
        out.loss = out.loss * (torch.nan if poisoned.calls > 2 else 1.0)
        return out

    poisoned.calls = 0
    monkeypatch.setitem(losses.LOSSES, "dpo", losses.LossSpec(poisoned, True, "dpo that breaks"))
    run = tmp_path / "run"
    out = fails(["train", "--out", str(run), "data.eval_path=null", "train.max_steps=20", "train.save_every=2",
                 "loss.name=dpo"], "not finite for 3 steps in a row (last at step 5)", "train.lr")
    assert f"sapo-lite train --resume {run}" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 3]
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-2", "step-4"]


def test_a_diverged_ema_is_a_clear_error_not_a_crash(tmp_path):
    fails(["train", "--out", str(tmp_path / "run"), "data.eval_path=null", "train.max_steps=20",
           "train.lr=1e30", "train.warmup_steps=0", "loss.name=dpo"], "training has diverged", "train.lr")


def test_model_folder_that_does_not_exist(train_args):
    fails([*train_args, "model.name=/nowhere/model"], "model folder `/nowhere/model` does not exist", "model.name")


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "precious.txt").write_text("mine")
    fails(["train", "--out", str(tmp_path), "--overwrite", "train.max_steps=1"], "refusing to delete it")
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_merge_overwrite_never_replaces_a_folder_that_is_not_a_model(finished_tiny_run, tmp_path):
    (tmp_path / "precious.txt").write_text("mine")
    fails(["merge", str(finished_tiny_run), "--out", str(tmp_path), "--overwrite"], "refusing to replace it")
    assert (tmp_path / "precious.txt").read_text() == "mine"
