"""Seeing what training does: plot, buffer inspection, TensorBoard, env."""

import re
import shutil
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.sapo.buffer import ReplayBuffer
from sapo_lite.tools.buffer_view import render_pair

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = runner.invoke(app, ["train", "--out", str(out), "data.eval_path=null", "train.max_steps=40",
                                 "train.report_to=tensorboard", "train.sample_every=20"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_plot_writes_a_png_with_every_curve(run, tmp_path):
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "curves.png")[..., :3]
    rows, cols = 2, 4
    height, width = pixels.shape[0] // rows, pixels.shape[1] // cols
    for r in range(rows):
        for c in range(cols):  # every panel has drawn colour in it (curves), not only white, black and greys
            panel = pixels[r * height : (r + 1) * height, c * width : (c + 1) * width]
            coloured = (panel.max(-1) - panel.min(-1)) > 0.2
            assert coloured.sum() > 200, f"panel {r},{c} has no curve"


def test_plot_works_while_a_run_is_still_writing(run, tmp_path):
    pytest.importorskip("matplotlib")
    live = tmp_path / "live"
    shutil.copytree(run, live)
    with (live / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 41, "loss": 1.')  # the line being written right now
    result = runner.invoke(app, ["plot", str(live)])
    assert result.exit_code == 0, result.output
    assert (live / "plot.png").is_file()


def test_plot_without_matplotlib_says_how_to_get_it(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 1 and 'pip install "sapo-lite[plot]"' in result.stderr


def test_buffer_stats(run):
    result = runner.invoke(app, ["buffer", str(run), "--stats"])
    assert result.exit_code == 0, result.output
    assert "pairs: 1280 of 2000 (64% full)" in result.output  # 40 steps x 32 new pairs
    assert "times drawn: mean 1.00" in result.output  # 40 steps x 32 draws over 1280 pairs
    assert "age in steps (newest step 40)" in result.output
    shares = re.search(r"rewrites: identical to the chosen (\d+)%, tail kept (\d+)%, ended by the EMA's stop token "
                       r"(\d+)%, cut at the length limit (\d+)%", result.output)
    assert shares, result.output
    assert 98 <= sum(int(share) for share in shares.groups()[1:]) <= 102  # every pair ends one of three ways


def test_buffer_show_prints_pairs(run):
    result = runner.invoke(app, ["buffer", str(run), "--show", "3"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert result.output.count("prompt: <|im_start|> user reverse :") == 3
    assert result.output.count("chosen:") == 3 and result.output.count("rejected:") == 3


def test_rewritten_segment_is_highlighted(run):
    buffer = ReplayBuffer(run / "buffer.sqlite", capacity=2000)
    pair = next(p for p in reversed(buffer.all_pairs()) if p.trunc_point > 0 and
                p.chosen_ids.tolist() != p.rejected_ids.tolist())
    buffer.close()
    from sapo_lite.data.examples import stop_token_ids
    from sapo_lite.models.roles import load_tokenizer

    tokenizer = load_tokenizer(str(run / "base_model"))
    panel = render_pair(pair, lambda ids: tokenizer.decode([int(i) for i in ids]), stop_token_ids(tokenizer))
    prompt_line, chosen_line, rejected_line = panel.renderable.renderables
    styled = {str(span.style): chosen_line.plain[span.start : span.end] for span in chosen_line.spans}
    rewritten = {str(span.style): rejected_line.plain[span.start : span.end] for span in rejected_line.spans}
    p, t, g = pair.prompt_len, pair.trunc_point, pair.segment_len
    assert styled["bold green"].split() == tokenizer.decode(pair.chosen_ids[p + t : p + t + g].tolist()).split()
    assert "bold red" in rewritten and rewritten["bold red"] != styled["bold green"]
    assert styled["dim"] == rewritten["dim"]  # the shared prefix R[:t]
    console = Console(record=True, width=120)
    console.print(panel)
    assert "rejected:" in console.export_text()


def test_tensorboard_gets_scalars_and_sampled_pairs(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert len(events.Scalars("train/loss")) == 40
    assert "train/rewards/margins" in events.Tags()["scalars"]
    samples = events.Tensors("samples/text_summary")
    assert [s.step for s in samples] == [20, 40]
    assert b"| prompt | chosen | rejected |" in samples[0].tensor_proto.string_val[0]


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "train.report_to=wandb",
                                 "train.max_steps=1"])
    assert result.exit_code == 1
    assert "train.report_to=wandb needs the `wandb` package" in result.stderr
    assert not (tmp_path / "run").exists()


def test_env_lists_versions():
    result = runner.invoke(app, ["env"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    for name in ("python", "torch", "transformers", "peft", "bitsandbytes", "flash-attn", "GPU"):
        assert name in result.output
