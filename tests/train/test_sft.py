"""`loss.name=sft`: the baseline trains on the chosen responses alone and never generates."""

import json

import pytest
from rich.console import Console

from sapo_lite.config.sources import load_config


@pytest.mark.slow
def test_sft_learns_the_held_out_task_without_generating(tmp_path, monkeypatch):
    from sapo_lite.sapo.sources import self_made
    from sapo_lite.tools.plot import plot_run
    from sapo_lite.train import loop as trainer

    def no_generation(*args, **kwargs):
        pytest.fail("SFT asked the EMA to generate")

    monkeypatch.setattr(self_made, "self_augment", no_generation)  # where the EMA's rewrites are made
    cfg = load_config("tiny", overrides=["loss.name=sft", "train.max_steps=250", "train.save_every=0",
                                         "data.eval_size=50"])
    result = trainer.train(cfg, tmp_path, Console(quiet=True))
    assert result.eval_before == 0.0 and result.eval_after >= 0.8  # greedy answers to unseen prompts now right
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] / 2
    assert "rewards/margins" not in records[-1] and records[-1]["logps/chosen"] < 0
    assert plot_run(tmp_path, tmp_path / "plot.png", cfg.sapo.buffer_size).path.stat().st_size > 0
