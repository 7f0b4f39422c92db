"""Presets, overrides and validation."""

import pytest

from sapo_lite.config.sources import load_config, preset_names, read_preset
from sapo_lite.errors import ConfigError

REQUIRED_KEYS = [
    "model.name", "model.quant", "model.init_adapter", "lora.r", "lora.alpha", "lora.target_modules",
    "data.path", "loss.name", "loss.beta", "sapo.ema_decay", "sapo.ema_every", "sapo.segment_len",
    "sapo.buffer_size", "train.lr", "train.max_steps", "train.save_every",
]


CPU_PRESETS = ("tiny", "smollm2-135m", "smollm2-135m-sft", "smollm2-135m-pairs", "smollm2-135m-mix",
               "smollm2-135m-spin")


def test_the_presets_ship():
    assert set(preset_names()) == {
        "llama3-8b-qlora", "llama3-8b-qlora-orpo", "llama3-8b-qlora-pairs", "mistral-7b-qlora", "mistral-7b-qlora-orpo",
        *CPU_PRESETS,
        "qwen3-8b-qlora", "llama31-8b-qlora", "gemma3-12b-qlora", "phi4-mini-qlora", "mistral-nemo-12b-qlora"}


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_validates_and_sets_only_known_keys(name):
    cfg = load_config(name)
    mapping, description = read_preset(name)
    assert description
    for section, values in mapping.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value or isinstance(value, float)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_trains_without_lora_dropout(name):
    # The official code switches dropout off; with it on, the policy's log-probs (train mode) are noisy
    # against the cached reference log-probs (eval mode) once the adapter has moved.
    assert load_config(name).lora.dropout == 0.0


@pytest.mark.parametrize("name", [n for n in preset_names() if n not in CPU_PRESETS])
def test_gpu_presets_are_qlora_on_the_paper_data(name):
    cfg = load_config(name)
    assert cfg.model.quant == "nf4" and cfg.model.double_quant and cfg.model.dtype == "bf16"
    assert cfg.model.gradient_checkpointing and cfg.train.optimizer == "auto"
    assert cfg.data.path == "argilla/distilabel-capybara-dpo-7k-binarized" and cfg.data.column == "chosen"
    assert (cfg.data.max_len, cfg.data.max_prompt_len, cfg.sapo.segment_len) == (2048, 1792, 256)
    assert (cfg.sapo.buffer_size, cfg.sapo.ema_decay) == (2000, 0.5)
    assert cfg.loss.name == ("orpo" if name.endswith("orpo") else "dpo")


def test_every_required_key_can_be_overridden():
    cfg = load_config("tiny", overrides=["loss.name=dpo", "train.lr=1e-4", "lora.target_modules=q_proj,v_proj"])
    assert cfg.loss.name == "dpo" and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    for key in REQUIRED_KEYS:
        section, field = key.split(".")
        assert hasattr(getattr(cfg, section), field), key


def test_unknown_key_names_the_nearest():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=["train.max_step=5"])
    assert "train.max_step" in info.value.message and "train.max_steps" in info.value.hint


def test_wrong_type_and_out_of_range_are_reported_all_at_once():
    with pytest.raises(ConfigError, match="train.lr='abc' has the wrong type"):
        load_config("tiny", overrides=["train.lr=abc"])
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=["train.lr=-1", "sapo.ema_decay=1.5", "loss.beta=0"])
    assert all(k in info.value.message for k in ("train.lr", "sapo.ema_decay", "loss.beta"))


def test_unknown_loss_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="choose one of dpo, orpo"):
        load_config("tiny", overrides=["loss.name=kto"])


def test_unknown_preset_lists_near_names():
    with pytest.raises(ConfigError) as info:
        load_config("llama3-8b")
    assert "llama3-8b-qlora" in info.value.hint


def test_config_file_applies_over_the_preset_and_overrides_over_both(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  max_steps: 77\n  lr: 0.0002\nsapo:\n  segment_len: 3\n")
    cfg = load_config("tiny", path, ["train.max_steps=5"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.sapo.segment_len) == (5, 0.0002, 3)
    assert cfg.model.name == "tiny"  # untouched keys keep the preset's values


def test_a_config_file_with_an_unknown_section_or_bad_yaml_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key `trainer`"):
        load_config("tiny", tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config("tiny", tmp_path / "b.yaml")


@pytest.mark.parametrize("typed,meant", [
    ("train.max_step", "train.max_steps"), ("lr", "train.lr"), ("train.learning_rate", "train.lr"),
    ("trainer.lr", "train.lr"), ("lora.rank", "lora.r"), ("data.max_length", "data.max_len"),
    ("per_device_train_batch_size", "train.micro_batch"),
])
def test_unknown_keys_point_at_the_key_meant(typed, meant):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=[f"{typed}=1"])
    assert info.value.hint == f"did you mean `{meant}`?"


def test_the_reason_for_a_resolved_key_survives_writing_and_reading_the_config(tmp_path):
    from sapo_lite.config.schema import to_yaml

    cfg = load_config("smollm2-135m", overrides=["data.path=chats.jsonl"])
    written = tmp_path / "config.yaml"
    written.write_text(to_yaml(cfg))
    again = load_config(None, written)  # what a resumed run and `sapo-lite eval RUN` read
    assert again.data.eval_path == "holdout" and again.notes == cfg.notes
    assert again.notes["data.eval_path"].startswith("bundled:instruct-eval belongs to bundled:instruct: held out")
    mine = tmp_path / "mine.yaml"  # a user's own comments are no notes
    mine.write_text("train:\n  lr: 1.0e-4  # halved\n")
    assert load_config(None, mine).notes == {}
