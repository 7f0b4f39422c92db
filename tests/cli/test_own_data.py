"""The two-stage recipe on a user's own `messages` file: the best adapter wherever policy and ema go, a second
stage that keeps the first's data, and every mistake the files can show refused before a model loads."""

import json

import pytest
from helpers import fails, write_jsonl
from safetensors import safe_open
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.config.sources import load_config, preset_names
from sapo_lite.run.folders import MERGE_MARKER

runner = CliRunner()


def own_rows(count: int) -> list[dict]:
    """Chat rows in the `messages` shape, on a task the tiny model's tokenizer can read."""
    rows = []
    for i in range(count):
        digits = [str((i * 7 + k * 3) % 10) for k in range(4 + i % 3)]
        rows.append({"messages": [{"role": "user", "content": "reverse : " + " ".join(digits)},
                                  {"role": "assistant", "content": " ".join(reversed(digits))}]})
    return rows


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """Stage 1 on one's own 60 rows: SFT, a validation split scored every step, so RUN/adapters/best exists."""
    folder = tmp_path_factory.mktemp("own")
    data = write_jsonl(folder / "chats.jsonl", own_rows(60))
    out = folder / "sft"
    result = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(out), f"data.path={data}",
                                 "data.eval_path=holdout", "data.eval_size=6", "loss.name=sft", "data.val_size=6",
                                 "train.eval_every=1", "train.max_steps=2", "train.num_threads=1",
                                 "data.eval_max_new_tokens=4", "data.chat_template=chatml"])
    assert result.exit_code == 0, result.output
    return out, data, result.output


def test_the_summary_names_the_best_adapter_and_the_free_form_figure(stage_one):
    out, _, output = stage_one
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"] == "best" and f"step {summary['best_step']}" in summary["adapter_note"]
    assert "--adapter best" in output
    # free-form rows (no constraints, no answers): the reference responses' NLL, base against policy
    assert summary["eval_nll_base"] > summary["eval_nll_policy"] > 0
    assert "held-out NLL of the reference responses: base" in output


def test_merge_takes_the_best_adapter_by_name_and_by_path_in_the_bases_precision(stage_one, tmp_path):
    out, _, _ = stage_one
    result = runner.invoke(app, ["merge", str(out / "adapters" / "best"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "best adapter" in result.output and "fp32, the precision the base is stored in" in result.output
    assert json.loads((tmp_path / "merged" / MERGE_MARKER).read_text())["adapter"] == "best"
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}  # noqa: SIM118 (not iterable)
    result = runner.invoke(app, ["merge", str(out), "--adapter", "best", "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    fails(["merge", out / "adapters" / "best", "--adapter", "ema", "--out", tmp_path / "x"], "is the best adapter")


def test_eval_and_generate_answer_as_the_best_adapter(stage_one):
    out, _, _ = stage_one
    result = runner.invoke(app, ["eval", str(out / "adapters" / "best"), "--max-new-tokens", "3", "--json",
                                 str(out.parent / "eval.json")])
    assert result.exit_code == 0, result.output
    assert "│ base" in result.output.replace("┃", "│") and "best" in result.output
    roles = json.loads((out.parent / "eval.json").read_text())["roles"]
    assert list(roles) == ["base", "best"] and "reference NLL" in result.output
    # the held-out rows are free-form: their reference NLL, the same figure the run reported for its base
    assert roles["base"]["reference_nll"] == json.loads((out / "held-out.json").read_text())["base"]["reference_nll"]
    # a run that kept a best adapter answers with it by default, beside base, policy and ema
    result = runner.invoke(app, ["generate", str(out), "--prompt", "reverse : 1 2 3", "--max-new-tokens", "3"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "prompt" in line)
    assert [word for word in header.replace("┃", " ").split()] == ["prompt", "base", "policy", "ema", "best"]


def test_plot_draws_the_validation_passes_and_counts_steps_not_records(stage_one, tmp_path):
    pytest.importorskip("matplotlib")
    out, _, _ = stage_one
    best = json.loads((out / "summary.json").read_text())["best_step"]
    result = runner.invoke(app, ["plot", str(out), "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert f"2 steps, 3 validation passes (best: step {best})" in result.output  # step 0 is a pass, not a step


def test_stage_two_trains_on_stage_ones_data_unless_told_otherwise(stage_one, tmp_path):
    out, data, _ = stage_one
    args = ["train", "--preset", "tiny", "--out", str(tmp_path / "sapo"), f"model.init_adapter={out}/adapters/best",
            "--dry-run"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"config: data.path={data} (from {out}" in result.output
    assert "config: data.chat_template=chatml (from" in result.output
    assert f"from {data}, " in result.output  # the plan
    result = runner.invoke(app, [*args, "data.path=bundled:tiny-reverse"])
    assert result.exit_code == 0, result.output
    assert "config: data.path" not in result.output and "from bundled:tiny-reverse" in result.output


def test_offline_dpo_from_an_sft_stage_keeps_its_own_pairs_data(stage_one, tmp_path):
    """Stage one's chat file has no rejected answers: a second stage on the data's pairs (the paper's offline DPO
    from its SFT model, a pairs preset's data.path) keeps its pairs data and says why; SAPO from the same stage,
    which reads the chosen answers only, takes stage one's file as before."""
    from sapo_lite.train.resolve_files import resolve_with_files

    out, data, _ = stage_one
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"reverse : {i} 2", "chosen": f"2 {i}", "rejected": "2"}
                                                   for i in range(40)])
    for mode, expected in (("data", pairs), ("mix", pairs), ("self", data)):
        cfg = load_config("tiny", None, [f"model.init_adapter={out}/adapters/best", f"sapo.pairs={mode}"])
        cfg.data.path = str(pairs)  # as a preset of pairs data sets it: not a key the user typed
        resolve_with_files(cfg, {"model.init_adapter", "sapo.pairs"})
        assert cfg.data.path == str(expected), mode
        assert ("has none of" in cfg.notes.get("data.path", "")) == (mode != "self")


def test_mistakes_the_files_show_are_refused_before_any_model_loads(stage_one, tmp_path):
    """--dry-run loads no model: each of these was refused only after loading it (38-66 s on SmolLM2)."""
    out, data, _ = stage_one
    base = ["train", "--preset", "tiny", "--out", tmp_path / "run", f"data.path={data}", "--dry-run"]
    fails([*base, f"model.init_adapter={tmp_path / 'nowhere'}"], "does not exist")
    fails([*base, f"model.init_adapter={out}/adapters/best", "lora.r=8"], "rank 16 but lora.r=8", "lora.r=16")
    fails([*base, "lora.target_modules=q_proj", f"model.init_adapter={out}/adapters/best"], "target modules")
    fails([*base, "data.val_size=40", "train.eval_every=5"], "data.val_size=40", "data.val_size=5")
    fails([*base, "data.val_size=5", "train.eval_every=5", "train.best_metric=val/constraints"],
          "no row of", "train.best_metric=auto")


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_takes_ones_own_small_chat_file(tmp_path, preset):
    """A preset's data settings fit any data: a 60-row messages file passes every check made before loading,
    a preset's validation split too large for it is scaled down and said so."""
    from sapo_lite.train.preflight import check_before_loading
    from sapo_lite.train.resolve_files import resolve_with_files

    data = write_jsonl(tmp_path / "chats.jsonl", own_rows(60))
    cfg = load_config(preset, None, [f"data.path={data}"])
    resolve_with_files(cfg, {"data.path"})
    check_before_loading(cfg)
    if load_config(preset).data.val_size > 27:
        assert 1 <= cfg.data.val_size <= 6 and "a tenth" in cfg.notes["data.val_size"]


def test_the_sft_dry_run_plan_speaks_of_examples_not_pairs(tmp_path):
    result = runner.invoke(app, ["train", "--preset", "smollm2-135m-sft", "--out", str(tmp_path / "r"), "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = result.output.strip().splitlines()[-1]
    assert "SFT" in plan and "examples/step" in plan and "pair" not in plan and "buffer" not in plan
