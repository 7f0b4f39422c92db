"""The `tiny` model: a small Llama and its tokenizer, built locally with no download.

It backs the offline demo (`sapo-lite train --preset tiny`) and the tests. The weights are
random but seeded, so every build is identical; it is saved as a normal Hugging Face folder
so adapters trained on it load with plain peft. The bundled task (reverse a list of
digits) is one a random base cannot do and a LoRA adapter learns in a couple of minutes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.examples import BUILTIN_TEMPLATES

TINY_NAME = "tiny"
SPECIAL_TOKENS = ["<pad>", "<s>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "reverse", "sort", "copy", ":", "=>", *map(str, range(10))]
WORDS += [chr(c) for c in range(ord("a"), ord("z") + 1)]
MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def build_tokenizer():
    """A word-level tokenizer: every digit, letter and task word is one token; chatml markers are special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    return tokenizer


def build_tiny_base(folder: Path, seed: int = 0) -> Path:
    """Build (once) and save the tiny Llama and its tokenizer into `folder`."""
    import torch  # here, not at the top: `sapo-lite estimate` reads this module's shape without loading torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **MODEL_SHAPE,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(state)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the bundled task


def reverse_task_rows(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """`count` distinct prompt/response rows of the digit-reversal task, none in `exclude`."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen = set(exclude)
    while len(rows) < count:
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(4, 6))]
        prompt = f"reverse : {' '.join(digits)}"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "response": " ".join(reversed(digits))})
    return rows


def write_bundled_task(assets: Path, train_count: int = 4000, eval_count: int = 200) -> None:
    """Regenerate sapo_lite/assets/tiny-reverse{,-eval}.jsonl (held-out prompts never seen in training)."""
    eval_rows = reverse_task_rows(eval_count, seed=1)
    train_rows = reverse_task_rows(train_count, seed=2, exclude={r["prompt"] for r in eval_rows})
    for name, rows in (("tiny-reverse", train_rows), ("tiny-reverse-eval", eval_rows)):
        with (assets / f"{name}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    write_bundled_task(Path(__file__).parents[1] / "assets")
