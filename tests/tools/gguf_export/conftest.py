"""What the GGUF tests export: a tiny Llama with a SentencePiece-style BPE tokenizer trained three steps
(fast); the two-step smollm2-135m run, exported once per quant type by `sapo-lite merge`; and SmolLM2
with a seeded small LoRA (slow: both convert the GGUF base and train).

Why the second SmolLM2 export: the two-step run's policy has taken a single full-size Adam step, and
it answers nonsense ("What is the capital of France?" -> "L'Étoile, la Marseillaise, la femme...", in
`sapo-lite generate` too). Logits compare fine on it, but greedy agreement across quant types needs a
model with clear preferences, and an answer worth checking needs a model that still knows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gguf_families import make_family_model, make_gemma3_mm_model, smollm2_tokenizer_dir
from gguf_models import make_model, make_random_lora, make_spm_tokenizer
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.data.examples import install_chat_template
from sapo_lite.models.roles import load_tokenizer
from sapo_lite.tools.gguf_export import export_gguf, register_pre_tokenizer
from sapo_lite.tools.gguf_export.tokenizer_kv import _EXTRA_PRE_TOKENIZERS, pre_tokenizer_hash

SMOL_QUANTS = ("f32", "f16", "q8_0")
SMOL_LORA_QUANTS = ("f16", "q8_0", "q4_0")


def train(out: Path, *args: str) -> Path:
    result = CliRunner().invoke(app, ["train", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def spm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("spm") / "base")


@pytest.fixture(scope="session")
def spm_run(tmp_path_factory: pytest.TempPathFactory, spm_base: Path) -> Path:
    """Three SAPO steps of the tiny preset recipe on the SentencePiece-style base, with the ChatML template
    (the first step runs at learning rate 0 in the warm-up, and the EMA follows the policy a step behind)."""
    return train(tmp_path_factory.mktemp("runs") / "spm", "--preset", "tiny", f"model.name={spm_base}",
                 "data.chat_template=chatml", "data.eval_path=null", "train.max_steps=3", "train.save_every=0",
                 "train.num_threads=1")


@pytest.fixture(scope="session")
def smol_exports(tmp_path_factory: pytest.TempPathFactory, smollm2_run: Path) -> dict[str, Path]:
    """The SmolLM2 run's policy as GGUF, once per quant type, written by `sapo-lite merge`."""
    out_dir = tmp_path_factory.mktemp("smol-gguf")
    exports = {}
    for quant in SMOL_QUANTS:
        exports[quant] = out_dir / f"smol.{quant}.gguf"
        result = CliRunner().invoke(app, ["merge", str(smollm2_run), "--out", str(exports[quant]), "--quant", quant])
        assert result.exit_code == 0, result.output
    return exports


@pytest.fixture(scope="session")
def smol_lora(tmp_path_factory: pytest.TempPathFactory, smollm2_base_dir: Path) -> Path:
    """A LoRA on every linear layer of SmolLM2 with small random B (r 8, std 0.02, seed 0)."""
    return make_random_lora(smollm2_base_dir, tmp_path_factory.mktemp("smol-lora") / "adapter", r=8, std=0.02)


@pytest.fixture(scope="session")
def smol_lora_exports(tmp_path_factory: pytest.TempPathFactory, smollm2_base_dir: Path,
                      smol_lora: Path) -> dict[str, Path]:
    """SmolLM2 + `smol_lora` as GGUF per quant type, with the template and end of turn the preset trains with."""
    tokenizer = load_tokenizer(str(smollm2_base_dir))
    install_chat_template(tokenizer, None)  # the smollm2-135m preset trains with SmolLM2's own template
    out_dir = tmp_path_factory.mktemp("smol-lora-gguf")
    exports = {}
    for quant in SMOL_LORA_QUANTS:
        exports[quant] = out_dir / f"smol-lora.{quant}.gguf"
        export_gguf(smollm2_base_dir, exports[quant], quant, adapter_dir=smol_lora,
                    chat_template=tokenizer.chat_template, eot_token="<|im_end|>")
    return exports


@pytest.fixture
def known_pre_tokenizer() -> Any:
    """Register a freshly trained byte-level tokenizer under the llama.cpp pre-tokenizer it really uses (its
    vocabulary, and so its hash, is in no table): GPT-2's, or Qwen2's, which transformers puts in place of
    the trained one when it loads the tokenizer of a Qwen2 folder (digits one at a time)."""
    from transformers import AutoTokenizer

    registered = []

    def register(folder: Path, kind: str = "llama") -> None:
        chkhsh = pre_tokenizer_hash(AutoTokenizer.from_pretrained(folder))
        register_pre_tokenizer(chkhsh, "qwen2" if kind == "qwen2" else "gpt-2")
        registered.append(chkhsh)

    yield register
    for chkhsh in registered:
        _EXTRA_PRE_TOKENIZERS.pop(chkhsh, None)


@pytest.fixture(scope="session")
def family_base(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`family_base(FAMILY)`: the tiny model of gguf_families.FAMILIES[FAMILY] with a random LoRA on every linear
    layer (r 4, B ~ N(0, 0.05): it moves the logits by about 2), built once a session: (base, adapter)."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, tuple[Path, Path]] = {}

    def build(family: str) -> tuple[Path, Path]:
        if family not in built:
            base = make_family_model(root / family, family, smollm2_tokenizer_dir(root))
            built[family] = (base, make_random_lora(base, root / f"{family}-adapter", r=4, std=0.05))
        return built[family]

    return build


@pytest.fixture(scope="session")
def gemma_spm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma 3 with a tokenizer of Gemma's own kind: SentencePiece-style BPE with byte fallback that puts
    no "▁" before the first word."""
    root = tmp_path_factory.mktemp("gemma-spm")
    make_spm_tokenizer(root / "tokenizer", prefix_space=False)
    return make_family_model(root / "base", "gemma3", root / "tokenizer")


@pytest.fixture(scope="session")
def gemma_mm(family_base: Any) -> tuple[Path, Path]:
    """The tiny Gemma 3 text model (gemma3's config) inside a Gemma3ForConditionalGeneration with a vision tower, and
    a random LoRA on every linear layer, the vision tower's included (peft's all-linear takes them): (base, adapter)."""
    root = family_base("gemma3")[0].parent  # its tokenizer folder is built there
    base = make_gemma3_mm_model(root / "gemma3_mm", smollm2_tokenizer_dir(root))
    return base, make_random_lora(base, root / "gemma3_mm-adapter", r=4, std=0.05)
