"""The CLI end to end: the tiny demo, dry runs, preset listing, and one-line errors."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.config.sources import preset_names

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One short tiny run through the CLI, shared by the checks below."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = runner.invoke(app, [
        "train", "--preset", "tiny", "--out", str(out),
        "train.max_steps=150", "train.save_every=50", "data.eval_size=50",
    ])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_tiny_demo_learns_the_held_out_task(tiny_run):
    out, output = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_exact_match_base"] == 0.0
    assert summary["eval_exact_match_policy"] >= 0.3  # greedy answers to unseen prompts now right
    assert "held-out exact match: base 0.0% -> policy" in output
    assert "held-out exact match, base (adapters off): 0.0% of 50 (bundled:tiny-reverse-eval)" in output
    assert "data: 4000 examples from bundled:tiny-reverse, column prompt/response (prompt and response text); " \
           "0 rows skipped" in output


def test_run_directory_follows_the_contract(tiny_run):
    out, _ = tiny_run
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 150 and config["model"]["name"] == "tiny"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 151))
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "lr",
                "grad_norm", "gen_s", "train_s", "tokens_per_s", "buffer_size", "peak_mem_gb"):
        assert key in records[-1], key
    assert records[-1]["loss"] < records[0]["loss"]
    db = sqlite3.connect(out / "buffer.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == records[-1]["buffer_size"] == 2000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-100", "step-150"]
    assert (out / "checkpoints" / "step-150" / "trainer_state.pt").is_file()


def test_adapters_load_with_plain_peft_and_changed_the_model(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = tiny_run
    ids = torch.tensor([[3, 5, 8, 9, 10, 11, 4, 3, 6]])
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    for name in ("policy", "ema"):
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file()
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"),
                                          out / "adapters" / name)
        with torch.no_grad():
            assert not torch.allclose(model(input_ids=ids).logits, base_logits, atol=1e-3), name


def test_dry_run_prints_the_resolved_config_and_loads_nothing(tmp_path):
    out = tmp_path / "never"
    result = runner.invoke(app, ["train", "--preset", "llama3-8b-qlora", "--out", str(out), "--dry-run",
                                 "loss.name=orpo", "train.max_steps=50"])
    assert result.exit_code == 0, result.output
    assert "max_steps: 50" in result.output and "name: orpo" in result.output
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in result.output
    assert not out.exists()


def test_presets_lists_one_line_each_and_shows_one():
    listing = runner.invoke(app, ["presets"])
    assert listing.exit_code == 0
    lines = [line for line in listing.output.splitlines() if line.strip()]
    assert len(lines) == len(preset_names()) == 16 and lines[-1].startswith("tiny")
    shown = runner.invoke(app, ["presets", "mistral-7b-qlora-orpo"])
    assert shown.exit_code == 0 and "mistralai/Mistral-7B-v0.1" in shown.output


def test_existing_run_directory_is_refused_and_left_alone(tiny_run):
    out, _ = tiny_run
    before = (out / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(out), "train.max_steps=1"])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--overwrite" in result.output
    assert (out / "metrics.jsonl").read_text() == before


def test_console_script_errors_are_one_line_without_traceback(tmp_path):
    env = {**os.environ, "SAPO_DEBUG": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "sapo_lite.cli", "train", "--preset", "tiny", "train.lr=abc"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == "error: train.lr='abc' has the wrong type: expected a number"
    assert not (tmp_path / "runs").exists()


def test_flash_attention_falls_back_to_sdpa_with_a_warning(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "data.eval_path=null", "train.max_steps=1",
                                 "model.attn_implementation=flash_attention_2"])
    assert result.exit_code == 0, result.output
    assert "warning: flash-attn is not usable here" in result.output and "using sdpa" in result.output
    # On the CPU the GPU estimate is printed for what it is: the card this config would need.
    assert "estimated peak memory per GPU, were this config run on one: " in result.output
    assert "(this run uses the CPU and its RAM; term by term: sapo-lite estimate)" in result.output


@pytest.mark.parametrize("command", ["train", "estimate", "eval", "generate", "merge", "buffer"])
def test_help_breaks_no_sentence_where_the_source_breaks_its_lines(command):
    """Each paragraph of a command's docstring is one line of --help on a wide terminal."""
    import inspect

    from sapo_lite.cli.common import paragraphs_as_lines

    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    callbacks = {info.name or info.callback.__name__: info.callback for info in app.registered_commands}
    paragraphs = paragraphs_as_lines(inspect.getdoc(callbacks[command])).split("\n\n")
    for paragraph in paragraphs:
        assert paragraph in lines, (paragraph, result.output)


def test_a_jinja_chat_template_file(tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <|im_end|> {% endfor %}"
                        "{% if add_generation_prompt %}assistant :{% endif %}")
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "data.eval_path=null", "train.max_steps=2",
                                 f"data.chat_template={template}"])
    assert result.exit_code == 0, result.output
    buffer = sqlite3.connect(tmp_path / "run" / "buffer.sqlite")
    assert buffer.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 64
