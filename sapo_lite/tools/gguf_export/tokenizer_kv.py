"""The `tokenizer.*` keys of the GGUF file: copied from the GGUF the base came from, or built from the
Hugging Face tokenizer.

llama.cpp tokenizes with its own code, driven only by these keys. Getting them subtly wrong (a missing
merge, the wrong pre-tokenizer name) does not fail loudly: it mis-tokenizes. So when the run's base was
a GGUF file (models/gguf_base.py leaves its path in `base_model/GGUF_SOURCE`) they are copied from it
byte for byte; otherwise they are rebuilt as llama.cpp's converter does (`_set_vocab_gpt2`,
`get_vocab_base`, `get_vocab_base_pre`, `_set_vocab_llama_hf`), and a byte-level BPE tokenizer whose
pre-tokenizer the converter's table does not know is refused rather than guessed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from ...errors import ExportError
from .families import CONVERTER
from .pretok_hashes import CHKTXT, PRE_TOKENIZER_HASHES

_EXTRA_PRE_TOKENIZERS: dict[str, str] = {}


def register_pre_tokenizer(chkhsh: str, name: str) -> None:
    """Map a pre-tokenizer hash to a llama.cpp `tokenizer.ggml.pre` name the bundled table does not know yet."""
    _EXTRA_PRE_TOKENIZERS[chkhsh] = name


def pre_tokenizer_hash(tokenizer: Any) -> str:
    """The converter's fingerprint: sha256 of `str()` of the token ids of its fixed check text."""
    return sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def identify_pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a one-line refusal for unknown ones."""
    chkhsh = pre_tokenizer_hash(tokenizer)
    name = _EXTRA_PRE_TOKENIZERS.get(chkhsh) or PRE_TOKENIZER_HASHES.get(chkhsh)
    if name is None:
        raise ExportError(
            f"the base's BPE pre-tokenizer is not one llama.cpp knows (hash {chkhsh[:16]}...): "
            "llama.cpp would refuse or mis-tokenize the file",
            f"merge to a folder (--format hf) and convert it with llama.cpp's {CONVERTER} once its table has "
            "this tokenizer (convert_hf_to_gguf_update.py)",
        )
    return name


@dataclass
class TokenizerKV:
    """Tokenizer key/values ready to write, plus what the exporter needs to pick the stop tokens."""

    values: dict[str, gguf.GGUFValue]
    tokens: list[str]
    source: str  # "gguf:<path>" or "hf"
    chat_template: str | None

    def token_id(self, text: str) -> int | None:
        """Id of a token given its exact text (first occurrence), or None."""
        try:
            return self.tokens.index(text)
        except ValueError:
            return None

    @property
    def eos_id(self) -> int | None:
        """`tokenizer.ggml.eos_token_id` if set."""
        value = self.values.get(gguf.Keys.Tokenizer.EOS_ID)
        return None if value is None else int(value.value)


def from_gguf(path: Path) -> TokenizerKV:
    """Copy every `tokenizer.*` key of an existing GGUF file, byte for byte (strings stay raw bytes)."""
    values = read_keys(path, "tokenizer.")
    tokens: list[str] = []
    if gguf.Keys.Tokenizer.LIST in values:
        tokens = [t.decode("utf-8", errors="replace") for t in values[gguf.Keys.Tokenizer.LIST].value]
    template = values.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    return TokenizerKV(values, tokens, f"gguf:{path}", template.value.decode() if template else None)


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_keys(path: Path, prefix: str) -> dict[str, gguf.GGUFValue]:
    """The key/values of a GGUF file whose names start with `prefix`, read straight from its header.

    `gguf.GGUFReader` would do, but it makes a numpy view of every part of every string: for SmolLM2's
    49,152 tokens and 48,900 merges that is 140 MB at its peak, and several times that for Llama 3's
    vocabulary. Read here as plain bytes, they take a tenth of it.
    """
    with open(path, "rb") as handle:

        def unpack(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, handle.read(size))[0]

        def string() -> bytes:
            return handle.read(unpack("Q"))

        def value(vtype: int) -> Any:
            if vtype == gguf.GGUFValueType.STRING:
                return string()
            return unpack(_SCALARS[vtype])

        if handle.read(4) != b"GGUF" or unpack("I") not in (2, 3):
            raise ExportError(f"`{path}` is not a GGUF file this exporter reads (GGUF version 2 or 3)",
                              "the base's GGUF_SOURCE must name the GGUF file the run was trained from")
        unpack("Q")  # tensor count
        found: dict[str, gguf.GGUFValue] = {}
        for _ in range(unpack("Q")):
            key, vtype = string().decode("utf-8"), unpack("I")
            if vtype == gguf.GGUFValueType.ARRAY:
                sub_type, count = unpack("I"), unpack("Q")
                if sub_type == gguf.GGUFValueType.STRING:
                    items: Any = [string() for _ in range(count)]
                else:
                    items = list(struct.unpack(f"<{count}{_SCALARS[sub_type]}",
                                               handle.read(count * struct.calcsize(_SCALARS[sub_type]))))
                entry = gguf.GGUFValue(items, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(sub_type))
            else:
                entry = gguf.GGUFValue(value(vtype), gguf.GGUFValueType(vtype))
            if key.startswith(prefix):
                found[key] = entry
    return found


def from_hf(base_dir: Path, vocab_size: int) -> TokenizerKV:
    """Build the keys from a Hugging Face fast tokenizer, as llama.cpp's converter does."""
    tokenizer_json = base_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ExportError(
            f"the base `{base_dir}` has no tokenizer.json (a SentencePiece tokenizer.model alone is not read here)",
            f"merge to a folder (--format hf) and convert it with llama.cpp's {CONVERTER}",
        )
    kind = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    if kind["type"] != "BPE":  # the tiny preset's word-level tokenizer, WordPiece, Unigram
        raise ExportError(
            f"the base's tokenizer is {kind['type']}, which llama.cpp cannot run as a chat model's tokenizer here "
            "(GGUF export writes byte-level and SentencePiece-style BPE tokenizers)",
            "export a run of a model with a BPE tokenizer (Llama, Mistral, Qwen2, SmolLM2: e.g. --preset smollm2-135m)",
        )
    from transformers import AutoTokenizer  # slow import, only needed on this path

    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    collector = gguf.GGUFWriter(None, "llama")  # only its KV dictionary is used
    if kind.get("byte_fallback"):
        tokens = _add_llama_spm_vocab(collector, base_dir, tokenizer, vocab_size)
    else:
        tokens = _add_gpt2_vocab(collector, base_dir, tokenizer, vocab_size)
    # Whether BOS/EOS are added is set from what the HF tokenizer actually does, since llama.cpp's defaults
    # depend on the pre-tokenizer and training/inference must agree.
    for key in (gguf.Keys.Tokenizer.ADD_BOS, gguf.Keys.Tokenizer.ADD_EOS):  # SpecialVocab's guess is replaced
        collector.kv_data[0].pop(key, None)
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    collector.add_add_bos_token(len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id)
    collector.add_add_eos_token(len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id)
    values = {k: v for k, v in collector.kv_data[0].items() if k.startswith("tokenizer.")}
    return TokenizerKV(values, tokens, "hf", getattr(tokenizer, "chat_template", None))


def _add_gpt2_vocab(writer: gguf.GGUFWriter, base_dir: Path, tokenizer: Any, vocab_size: int) -> list[str]:
    """Byte-level BPE: `_set_vocab_gpt2` + `get_vocab_base` of llama.cpp's converter."""
    pre = identify_pre_tokenizer(tokenizer)
    reverse_vocab = {i: t for t, i in tokenizer.vocab.items()}
    added_vocab = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse_vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse_vocab[i]
        if token in added_vocab:
            # llama.cpp assumes added tokens are pre-normalised; normalise the ones HF does not
            if not added_decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added_decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalise user-defined spaces (converter does this)
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(base_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    _add_prefix_space(writer, base_dir)
    return tokens


def _add_llama_spm_vocab(writer: gguf.GGUFWriter, base_dir: Path, tokenizer: Any, vocab_size: int) -> list[str]:
    """Llama/Mistral-style (SentencePiece-derived, byte fallback) BPE: `_set_vocab_llama_hf` of the converter.

    Departs from it in two places, both so that llama.cpp tokenizes as the Hugging Face tokenizer did
    in training (the converter reads `tokenizer.model` with sentencepiece when there is one, and uses
    this path only without it):
    - scores: llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token scores
      highest; the converter's path writes -1000 for every token, so merges happen in the wrong order.
      Here a token scores minus the rank of the BPE merge that makes it, which is the order of
      tokenizer.json's merges (and of the SentencePiece scores they were made from).
    - types: an added token (`<|im_start|>` for a ChatML template) is CONTROL when special and
      USER_DEFINED otherwise, as in the converter's byte-level path; left NORMAL, llama.cpp reads a
      chat marker as text.
    An embedding with more rows than the tokenizer has tokens (Gemma 3 4B-27B: 262,208) gets the rest as
    `[PAD1]`, `[PAD2]`... of type UNUSED, as the converter's `_create_vocab_sentencepiece` pads it.
    """
    vocab = gguf.LlamaHfVocab(base_dir)
    merges = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"].get("merges", [])
    merge_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):  # "a b" (older tokenizers) or ["a", "b"]
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merge_rank.setdefault(left + right, rank)
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for token_id, (text, score, toktype) in enumerate(vocab.all_tokens()):
        token = text.decode("utf-8") if isinstance(text, bytes) else text
        tokens.append(token)
        scores.append(-float(merge_rank[token]) if token in merge_rank else score)
        if toktype == gguf.TokenType.NORMAL and token_id in added:
            toktype = gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED
        types.append(toktype)
    for pad in range(1, vocab_size - len(tokens) + 1):
        tokens.append(f"[PAD{pad}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(base_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    _add_prefix_space(writer, base_dir)
    return tokens


def _add_prefix_space(writer: gguf.GGUFWriter, base_dir: Path) -> None:
    """`add_prefix_space` from tokenizer_config.json, as LlamaModel.set_vocab copies it."""
    config_file = base_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if isinstance(config.get("add_prefix_space"), bool):
        writer.add_add_space_prefix(config["add_prefix_space"])


def _looks_special(token: str) -> bool:
    """The converter's `does_token_look_special`: added tokens that should be CONTROL though not flagged."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )
