"""`sapo.generate_every`: new pairs every N optimizer steps, training from the buffer in between."""

import json

import pytest
from typer.testing import CliRunner

import sapo_lite.sapo.sources.self_made
from sapo_lite.cli import app
from sapo_lite.errors import ConfigError
from sapo_lite.sapo.buffer import ReplayBuffer

runner = CliRunner()
TINY = ["--preset", "tiny", "data.eval_path=null", "train.max_steps=10", "sapo.gen_per_step=8",
        "sapo.gen_batch_size=8", "train.micro_batch=8"]


def train_counting_generations(tmp_path, monkeypatch, *overrides):
    """Train the tiny model; return the metrics records and how many examples each generation call got."""
    calls = []
    real = sapo_lite.sapo.sources.self_made.self_augment

    def counting(model, examples, *args, **kwargs):
        calls.append(len(examples))
        return real(model, examples, *args, **kwargs)

    monkeypatch.setattr(sapo_lite.sapo.sources.self_made, "self_augment", counting)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *TINY, "--out", str(out), *overrides])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records, calls


def test_generate_every_3_makes_pairs_on_steps_1_4_7_10_only(tmp_path, monkeypatch):
    out, records, calls = train_counting_generations(tmp_path, monkeypatch, "sapo.generate_every=3")
    assert calls == [8, 8, 8, 8]
    generated = [r["step"] for r in records if r["gen_s"] > 0]
    assert generated == [1, 4, 7, 10]
    assert all(r["gen_s"] == 0 and r["ref_s"] == 0 and r["pairs/identical"] is None
               for r in records if r["step"] not in generated)
    # The buffer grows only when pairs are made, and every step still trains on a batch from it.
    assert [r["buffer_size"] for r in records] == [8, 8, 8, 16, 16, 16, 24, 24, 24, 32]
    assert all(r["loss"] is not None for r in records)
    buffer = ReplayBuffer(out / "buffer.sqlite", 2000)
    assert sorted({p.step_added for p in buffer.all_pairs()}) == [1, 4, 7, 10]
    buffer.close()


def test_generate_every_1_makes_pairs_every_step(tmp_path, monkeypatch):
    _, records, calls = train_counting_generations(tmp_path, monkeypatch)
    assert len(calls) == 10 and all(r["gen_s"] > 0 for r in records)
    assert [r["buffer_size"] for r in records] == [8 * step for step in range(1, 11)]


def test_generate_every_must_be_positive():
    from sapo_lite.config.sources import load_config

    with pytest.raises(ConfigError, match="sapo.generate_every must be >= 1"):
        load_config("tiny", overrides=["sapo.generate_every=0"])
