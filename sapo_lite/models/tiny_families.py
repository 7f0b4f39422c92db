"""Tiny random models of each family (`families/`), every quirk switched on, built locally in a second.

`build_family_base("qwen3", folder)` writes a Hugging Face folder: a 2-layer model from the family's own
config class (`AutoConfig.for_model`) with the family's `tiny_config` quirks (Qwen3's q/k norms and
head_dim != hidden / heads, Gemma 3's sandwich norms and two layer types, Phi's fused projections, ...)
and a 400-token byte-level BPE trained on the bundled task, with the family's special tokens and published
chat template (`sapo_lite/assets/chat-*.jinja`), so a family's tiny model trains on `bundled:tiny-reverse`
like the `tiny` preset. `initializer_range` 0.08 makes the random
logits peaked enough that top-1 comparisons (greedy decoding, GGUF agreement) are not near-ties; biases and
norm weights are perturbed from transformers' zeros and ones, so a decoder or exporter that drops a bias or
misreads Gemma's x * (1 + w) gives other logits.

Tests, bench/families.py, and the merge and GGUF checks of the families all build their models here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .families import FAMILIES, Family
from .tiny import WORDS, reverse_task_rows

TOKENIZER_VOCAB = 400
TINY_FAMILY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.08,
}


def family_names() -> list[str]:
    return list(FAMILIES)


def build_family_tokenizer(family: Family | str) -> Any:
    """A byte-level BPE (Llama 3's, Qwen's and Phi-4's kind) trained in milliseconds on the bundled task and the
    family's template words, with `family`'s special tokens and chat template.

    Byte-level, not the `tiny` preset's word-level tokenizer: transformers 5 loads a `qwen2`/`qwen3` folder's
    tokenizer as Qwen2Tokenizer whatever its files say, rebuilt from vocab and merges (a word-level vocabulary
    then splits into characters); a BPE survives that rebuild with the same tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[family] if isinstance(family, str) else family
    m = family.markers
    specials = list(dict.fromkeys(t for t in (m.pad, m.bos, m.eos, m.end_of_turn, *m.specials, "<unk>") if t))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_corpus(family), trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in m.added])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=m.bos, eos_token=m.eos, pad_token=m.pad, unk_token="<unk>",
        additional_special_tokens=[t for t in specials if t not in (m.bos, m.eos, m.pad, "<unk>")],
    )
    tokenizer.chat_template = family.chat_template()
    return tokenizer


def _corpus(family: Family) -> list[str]:
    """Text the BPE learns from: the digit-reversal rows and the family's template rendered around them."""
    import re

    rows = reverse_task_rows(200, seed=3)
    template_words = re.findall(r"[A-Za-z][A-Za-z ,.:]+", family.chat_template())
    return [f"{r['prompt']}\n{r['response']}" for r in rows] + template_words * 5 + [" ".join(WORDS)] * 5


def family_config(family: Family | str, tokenizer: Any, vocab_size: int | None = None, **overrides: Any) -> Any:
    """The tiny model's config: the shared shape, the family's quirks, the tokenizer's ids, then `overrides`."""
    from transformers import AutoConfig

    family = FAMILIES[family] if isinstance(family, str) else family
    settings = {**TINY_FAMILY_SHAPE, **family.tiny_config, **overrides}
    model_type = settings.pop("model_type")
    if "layer_types" in settings:  # the family's pattern of layer kinds, repeated over the layers asked for
        pattern = settings["layer_types"]
        settings["layer_types"] = [pattern[i % len(pattern)] for i in range(settings["num_hidden_layers"])]
    eos = [tokenizer.convert_tokens_to_ids(t) for t in dict.fromkeys((family.markers.eos, family.markers.end_of_turn))]
    return AutoConfig.for_model(
        model_type, vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=tokenizer.pad_token_id, **settings,
    )


def build_family_model(family: Family | str, seed: int = 0, vocab_size: int | None = None,
                       **overrides: Any) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer): the family's tiny model with seeded random weights, in memory."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_family_tokenizer(family)
    config = family_config(family, tokenizer, vocab_size, **overrides)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # transformers starts biases at 0 and norm weights at 1 (Gemma: 0): quirks that do nothing
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    torch.random.set_rng_state(state)
    return model.eval(), tokenizer


def build_family_base(family: Family | str, folder: Path, seed: int = 0, vocab_size: int | None = None,
                      **overrides: Any) -> Path:
    """Build (once) and save `family`'s tiny model and tokenizer into `folder`, a model.name for any command."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    model, tokenizer = build_family_model(family, seed, vocab_size, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
