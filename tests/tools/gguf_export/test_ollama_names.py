"""Two quants of one run are two Ollama models: the suggested `ollama create` names differ."""

from pathlib import Path

import pytest

pytest.importorskip("gguf")

from sapo_lite.tools.gguf_export.ollama import ollama_model_name  # noqa: E402


@pytest.mark.parametrize("first, second", [("smol.q8_0.gguf", "smol.q4_0.gguf"), ("smol.gguf", "smol.gguf"),
                                           ("runs/a/model.gguf", "runs/b/model.gguf")])
def test_the_two_quants_of_one_run_get_different_ollama_names(first, second):
    names = ollama_model_name(Path(first), "Q8_0"), ollama_model_name(Path(second), "Q4_0")
    assert names[0] != names[1]
    assert all(name.replace("-", "").replace("_", "").isalnum() and name == name.lower() for name in names)


def test_a_name_that_already_says_its_quant_is_kept():
    assert ollama_model_name(Path("smol-q4_0.gguf"), "Q4_0") == "smol-q4_0"
