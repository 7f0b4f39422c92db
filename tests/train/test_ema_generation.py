"""How the loop's EMA generates: merged into scratch weights with the lean decoder on a full-precision base
(the base the policy trains on stays bit for bit the same), `generate` as before with `sapo.decoder=hf`."""

import pytest
import torch
from typer.testing import CliRunner

import sapo_lite.sapo.sources.self_made
import sapo_lite.train.loop
from sapo_lite.cli import app
from sapo_lite.config.sources import load_config
from sapo_lite.errors import ConfigError
from sapo_lite.sapo import augment
from sapo_lite.train.session import ema_generation

TINY = ["--preset", "tiny", "data.eval_path=null", "train.max_steps=3", "sapo.gen_per_step=8",
        "sapo.gen_batch_size=8", "train.micro_batch=8"]


def train_watching_generation(tmp_path, monkeypatch, *overrides):
    """Train the tiny model; return its session, its base weights at setup and, per generation round,
    whether the EMA was merged and which decoder ran."""
    seen: dict = {"rounds": [], "hf_calls": 0, "threads": []}
    real_setup, real_hf = sapo_lite.train.loop.setup_session, augment._hf_generate
    real_augment = sapo_lite.sapo.sources.self_made.self_augment

    def setup(*args, **kwargs):
        session = seen["session"] = real_setup(*args, **kwargs)
        seen["base"] = {n: p.detach().clone() for n, p in session.model.named_parameters() if "lora_" not in n}
        return session

    def watched_augment(model, *args, **kwargs):
        seen["rounds"].append(any(getattr(m, "merged_adapters", None) for m in model.modules()))
        seen["threads"].append(torch.get_num_threads())
        return real_augment(model, *args, **kwargs)

    def watched_hf(*args, **kwargs):
        seen["hf_calls"] += 1
        return real_hf(*args, **kwargs)

    monkeypatch.setattr(sapo_lite.train.loop, "setup_session", setup)
    monkeypatch.setattr(sapo_lite.sapo.sources.self_made, "self_augment", watched_augment)
    monkeypatch.setattr(augment, "_hf_generate", watched_hf)
    result = CliRunner().invoke(app, ["train", *TINY, "--out", str(tmp_path / "run"), *overrides])
    assert result.exit_code == 0, result.output
    return seen


def test_lean_decoder_generates_merged_and_leaves_the_base_bit_identical(tmp_path, monkeypatch):
    seen = train_watching_generation(tmp_path, monkeypatch)
    assert seen["rounds"] == [True, True, True] and seen["hf_calls"] == 0
    model = seen["session"].model
    after = {n: p.detach() for n, p in model.named_parameters() if "lora_" not in n}
    assert after.keys() == seen["base"].keys()
    assert all(torch.equal(after[n], seen["base"][n]) for n in after)
    assert not any(getattr(m, "merged_adapters", None) for m in model.modules())


def test_hf_decoder_generates_with_generate_unmerged(tmp_path, monkeypatch):
    seen = train_watching_generation(tmp_path, monkeypatch, "sapo.decoder=hf")
    assert seen["rounds"] == [False, False, False] and seen["hf_calls"] == 3
    assert seen["session"].merged_ema is None


def test_a_model_the_lean_decoder_does_not_cover_is_named_with_the_reason():
    from transformers import OlmoConfig, OlmoForCausalLM  # a family without a file in models/families/

    from sapo_lite.config.schema import LoraSettings
    from sapo_lite.models.roles import attach_adapters

    base = OlmoForCausalLM(OlmoConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    model = attach_adapters(base, LoraSettings(r=2, alpha=4), None, gradient_checkpointing=False)
    merged, note = ema_generation(load_config("tiny"), model, torch.device("cpu"))
    assert merged is None and "transformers' generate" in note and "OlmoForCausalLM" in note


def test_static_cache_asks_for_the_hf_decoder():
    with pytest.raises(ConfigError, match="set sapo.decoder=hf"):
        load_config("tiny", overrides=["sapo.static_cache=true"])
    assert load_config("tiny", overrides=["sapo.static_cache=true", "sapo.decoder=hf"]).sapo.static_cache


@pytest.fixture
def idle_two_core_machine(monkeypatch):
    """threads.py sees 2 cores and nobody else working: every look 2 s later, the machine exactly as busy
    as this process."""
    from sapo_lite.models import threads

    clock = {"wall": 0.0}

    def cpu_times():
        clock["wall"] += 2.0
        return clock["wall"], 0.0, 0.0

    monkeypatch.setattr(threads, "cpu_times", cpu_times)
    monkeypatch.setattr(threads, "physical_cores", lambda: 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_generation_takes_the_idle_core_and_training_keeps_one(tmp_path, monkeypatch, idle_two_core_machine):
    updates: list[int] = []
    real_update = sapo_lite.train.loop._policy_update

    def watched_update(*args, **kwargs):
        updates.append(torch.get_num_threads())
        return real_update(*args, **kwargs)

    monkeypatch.setattr(sapo_lite.train.loop, "_policy_update", watched_update)
    seen = train_watching_generation(tmp_path, monkeypatch)
    assert seen["threads"] == [2, 2, 2] and updates == [1, 1, 1]


def test_an_explicit_thread_count_holds_for_generation_too(tmp_path, monkeypatch, idle_two_core_machine):
    seen = train_watching_generation(tmp_path, monkeypatch, "train.num_threads=1")
    assert seen["threads"] == [1, 1, 1] and seen["session"].decode_threads is None
