"""Tiny Llama-family models with BPE tokenizers (what llama.cpp reads), and the checks every GGUF test makes.

The tiny preset's word-level tokenizer has no llama.cpp equivalent, so the GGUF tests build their own
bases: a SentencePiece-style BPE with byte fallback (Llama-2, Mistral), which llama.cpp reads with no
pre-tokenizer table, and a byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM2) whose freshly trained
pre-tokenizer hash a test registers as llama.cpp's "gpt-2". The reference in every comparison is the
transformers model with the adapter merged by peft in fp32: does the file compute what training made?
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sapo_lite.data.examples import BUILTIN_TEMPLATES

CHATML = BUILTIN_TEMPLATES["chatml"]
TEXTS = [
    "<|im_start|>user\nreverse : 1 2 3 4<|im_end|>\n<|im_start|>assistant\n4 3 2 1<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! 123 4567 ... ok?",
    "def f(x):\n    return x",
]


def make_spm_tokenizer(folder: Path, prefix_space: bool = True) -> Any:
    """A Llama/Mistral-style tokenizer.json: BPE over "▁"-joined words with <0xNN> byte fallback; adds <s>.
    prefix_space False: Gemma's kind, which puts no "▁" before the first word."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    prepend = [normalizers.Prepend("▁")] if prefix_space else []
    tok.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if prefix_space else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<0x{i:02X}>" for i in range(256)]
    words = [f"reverse : {' '.join(str((i * 7 + j) % 10) for j in range(4 + i % 3))}" for i in range(50)]
    tok.train_from_iterator((TEXTS + words) * 20, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials[:5]])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def make_bytelevel_tokenizer(folder: Path) -> Any:
    """A 400-token byte-level BPE (GPT-2 style pre-tokenizer) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def make_model(folder: Path, kind: str = "llama", tokenizer: str = "spm", **overrides: Any) -> Path:
    """A random tiny model and its tokenizer, saved as a Hugging Face folder (safetensors)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = (make_spm_tokenizer if tokenizer == "spm" else make_bytelevel_tokenizer)(folder)
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config = (LlamaConfig if kind == "llama" else Qwen2Config)(**{**common, **overrides})
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # norms start at exactly one and biases at zero: perturb them so they are tested too
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder


def make_random_lora(base_dir: Path, out_dir: Path, r: int = 4, seed: int = 0, std: float = 0.2, **extra: Any) -> Path:
    """A LoRA adapter on every linear layer with non-zero B (a fresh adapter has B = 0 and changes nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", **extra)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def merged_model(base_dir: Path, adapter_dir: Path | None = None) -> Any:
    """The reference: the base in fp32 with the adapter merged by peft."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval()


def merged_folder(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Any:
    """The base with the adapter merged by sapo-lite's folder merge (tools/merge.py, fp32), loaded by transformers."""
    from transformers import AutoModelForCausalLM

    from sapo_lite.tools.merge import merge_adapter

    merge_adapter(base_dir, adapter_dir, out_dir, dtype="fp32")
    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()


def gguf_model(gguf_file: Path) -> Any:
    """A GGUF file loaded back by transformers (it dequantises and undoes the Q/K permutation)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()


def ids_of(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(text).input_ids for text in TEXTS]


@torch.no_grad()
def max_logit_diff(model_a: Any, model_b: Any, prompts_ids: list[list[int]]) -> float:
    """The largest absolute logit difference over every position of every prompt."""
    worst = 0.0
    for ids in prompts_ids:
        x = torch.tensor([ids])
        worst = max(worst, (model_a(x).logits - model_b(x).logits).abs().max().item())
    return worst


@torch.no_grad()
def greedy_hf(model: Any, ids: list[int], max_new_tokens: int = 32, stop_ids: list[int] | None = None) -> list[int]:
    """Greedy continuation ids (with the stop token when one is produced)."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                         pad_token_id=(stop_ids or [0])[0])
    return out[0, len(ids):].tolist()


def greedy_llamacpp(llm: Any, ids: list[int], max_new_tokens: int = 32) -> tuple[list[int], bool]:
    """Greedy continuation in llama.cpp: (ids with the stop token, whether llama.cpp stopped by itself)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return out, True
        if len(out) >= max_new_tokens:
            break
    return out, False


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
