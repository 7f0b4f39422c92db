"""Config and command-line mistakes as users make them: one line each, nothing written; and a `--help`
that answers without loading torch, in the order commands are needed, with types in words."""

import json
import subprocess
import sys

import pytest
from helpers import fails
from typer.testing import CliRunner

from sapo_lite.cli import app

runner = CliRunner()




@pytest.fixture
def out(tmp_path):
    return tmp_path / "run"


# ---------------------------------------------------------------- config files


def test_yaml_numbers_read_as_text_are_numbers(tmp_path, out):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-4\n  weight_decay: 1e-2\n")
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "lr: 0.0001" in result.output and "weight_decay: 0.01" in result.output


def test_config_without_preset_says_it_uses_the_defaults(tmp_path, out):
    (tmp_path / "c.yaml").write_text("train:\n  max_steps: 7\n")
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"config: built-in defaults (no preset) + {tmp_path / 'c.yaml'}" in result.output
    assert "max_steps: 7" in result.output and "name: tiny" in result.output
    with_preset = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(out), "--dry-run", "train.lr=0.1"])
    assert "config: preset tiny + train.lr=0.1" in with_preset.output
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "over the built-in defaults when --preset is not given" in " ".join(help_text.split())


@pytest.mark.parametrize("text,expected", [
    ("train:\n  lr: 0.1\n   max_steps: 3\n", "is not valid YAML at line 3, column 13"),
    ("train:\n  lr: [1, 2\n", "is not valid YAML at line 3, column 1"),
])
def test_invalid_yaml_names_line_and_column(tmp_path, out, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    fails(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(out)], expected)
    assert not out.exists()


@pytest.mark.parametrize("args,expected", [
    (["--config", "{tmp}"], "is a folder, not a YAML file"),
    (["data.chat_template={tmp}"], "data.chat_template `{tmp}` is a folder"),
])
def test_a_folder_where_a_file_is_needed(tmp_path, out, args, expected):
    args = [a.format(tmp=tmp_path) for a in args]
    fails(["train", "--out", str(out), "data.eval_path=null", *args], expected.format(tmp=tmp_path))
    assert not out.exists()


@pytest.mark.parametrize("overrides,expected", [
    (["sapo.gen_per_step=64", "sapo.buffer_size=32", "train.micro_batch=8"],
     "sapo.gen_per_step=64 is larger than sapo.buffer_size=32: each step would evict some of its new pairs"),
    (["sapo.buffer_size=16", "sapo.gen_per_step=8"],
     "train.micro_batch=32 is larger than sapo.buffer_size=16: every micro-batch would repeat pairs"),
])
def test_batches_larger_than_the_buffer(out, overrides, expected):
    fails(["train", "--out", str(out), *overrides], expected)


# ---------------------------------------------------------------- settings checked against the model


def test_lora_targets_that_name_no_module_list_the_linear_ones(out):
    fails(["train", "--out", str(out), "data.eval_path=null", "lora.target_modules=qproj,v_proj"],
          "lora.target_modules names `qproj`, which is no module of tiny; its linear modules: "
          "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    assert not out.exists()


def test_an_init_adapter_that_differs_from_the_config_names_both_values(tmp_path, out):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    fails(["train", "--out", str(out), "data.eval_path=null", f"model.init_adapter={adapter}"],
          "rank 8 but lora.r=16", "alpha 16 but lora.alpha=32", "target modules q_proj,v_proj but lora.target_modules=",
          "lora.r=8 lora.alpha=16 lora.target_modules=q_proj,v_proj")
    assert not out.exists()


def test_an_init_adapter_for_another_base_names_both(tmp_path, out, tiny_base_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    linear = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": linear,
         "base_model_name_or_path": "someone/other-model"}))
    fails(["train", "--out", str(out), "data.eval_path=null", f"model.name={tiny_base_dir}",
           f"model.init_adapter={adapter}"],
          f"does not match the config: base someone/other-model but model.name={tiny_base_dir}",
          "model.name=someone/other-model")
    assert not out.exists()


def test_a_jinja_template_with_a_syntax_error_names_the_line(tmp_path, out):
    template = tmp_path / "t.jinja"
    template.write_text("{% for message in messages %}\n{{ message['content'] }\n{% endfor %}\n")
    fails(["train", "--out", str(out), "data.eval_path=null", f"data.chat_template={template}"],
          f"chat template `{template}` has a Jinja syntax error at line 2")
    assert not out.exists()


# ---------------------------------------------------------------- command-line misuse


@pytest.mark.parametrize("args,expected", [
    (["train", "--resume", "{tmp}", "--overwrite"], "--resume continues a run and --overwrite would delete it"),
    (["estimate", "--gpu-gb", "-3"], "--gpu-gb -3 is not a GPU size"),
    (["generate", "{tmp}", "--prompt", ""], "--prompt is empty"),
    (["generate", "{tmp}", "--prompts-file", "{tmp}"], "is a folder"),
    (["plot", "{tmp}", "--out", "x.txt"], "--out `x.txt` is not an image file name"),
    (["plot", "{tmp}", "--out", "{tmp}"], "is a folder"),
])
def test_command_line_misuse(tmp_path, args, expected):
    (tmp_path / "keep.txt").write_text("mine")
    fails([a.format(tmp=tmp_path) for a in args], expected)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["train"], ["estimate"], ["merge"], ["generate"], ["plot"], ["env"]])
def test_help_loads_no_torch_and_shows_types_in_words(command):
    code = ("import sys\nfrom sapo_lite.cli import app\n"
            f"try:\n    app([*{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("NO TORCH")
    assert "<" not in result.stdout and "list[" not in result.stdout  # no `<path>`, `<list[str]>`


def test_commands_are_listed_in_the_order_a_user_needs_them():
    output = runner.invoke(app, ["--help"]).output
    panel = output.split("Commands")[1].splitlines()[1:]
    listed = [line.split()[1] for line in panel if line.startswith("│ ") and line[2] != " "]
    assert listed == ["train", "estimate", "presets", "eval", "generate", "merge", "plot", "buffer", "ui", "env"]


# ---------------------------------------------------------------- estimate


@pytest.mark.parametrize("args,expected,absent", [
    (["--gpu-gb", "2"], "a 2 GB GPU cannot hold even the NF4 base weights", "change that makes it fit"),
    (["--gpu-gb", "12", "train.micro_batch=4"],
     "the change that makes it fit: train.micro_batch=1 train.grad_accum=16", "cannot hold"),
    (["--gpu-gb", "24", "model.gradient_checkpointing=false"],
     "the change that makes it fit: model.gradient_checkpointing=true", "activations without gradient checkpointing"),
    (["--gpu-gb", "8", "train.micro_batch=4"],
     "no single change makes it fit; the one that helps most: data.max_len=256", "change that makes it fit"),
])
def test_estimate_advice_makes_it_fit_or_says_nothing_does(args, expected, absent):
    result = runner.invoke(app, ["estimate", *args], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert expected in result.output and absent not in result.output
