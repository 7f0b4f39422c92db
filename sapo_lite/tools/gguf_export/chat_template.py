"""The training chat template reduced to literal pieces, and the token that ends an assistant turn.

llama.cpp runs the Jinja template stored in the GGUF as it is, but Ollama needs a Go template
(ollama.py) and both need to know which token ends a turn. Rather than pattern-match template
source, the template is *rendered* with sentinel messages, and the text before and after each
sentinel is read off per role: a head, a prefix and suffix per role, and the generation prompt.
Templates whose per-message text depends on position in other ways (Mistral's `[INST]`, which also
refuses system messages) have no such shape and are reported as such.

Rendering goes through the same function `apply_chat_template` uses (transformers'
`render_jinja_template`), so the pieces are exactly what training tokenized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...errors import ExportError

# messages, add_generation_prompt -> rendered text
Render = Callable[[list[dict[str, str]], bool], str]
SENTINELS = {"system": "SENTINELSYSTEMQ", "user": "SENTINELUSERONEQ", "assistant": "SENTINELASSISTANTQ",
             "user2": "SENTINELUSERTWOQ"}
FAMILIES = {  # (user prefix, assistant suffix) -> family name, for the report only
    ("<|im_start|>user\n", "<|im_end|>\n"): "chatml",
    ("<|user|>\n", "</s>\n"): "zephyr",
    ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"): "llama3",
}


def renderer(template: str, bos_token: str = "", eos_token: str = "") -> Render:
    """Render `template` the way `tokenizer.apply_chat_template(..., tokenize=False)` does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        texts, _ = render_jinja_template([messages], chat_template=template,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token)
        return texts[0]

    return render


@dataclass
class TemplateShape:
    """A chat template as literal pieces: what goes before and after each message, and at the end."""

    head_system: str  # before a leading system message's content (with anything the template prepends)
    head_user: str  # before the first user message when there is no system message (with a default system turn)
    prefix: dict[str, str]  # role -> text before the content of a later message
    suffix: dict[str, str]  # role -> text after the content
    generation_prompt: str
    stripped_bos: str  # BOS text taken off the heads because the runtime adds BOS by itself

    @property
    def family(self) -> str:
        """chatml, zephyr, llama3 or generic."""
        return FAMILIES.get((self.prefix["user"], self.suffix["assistant"]), "generic")


def _split(text: str, sentinel: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise ValueError(f"a message rendered {text.count(sentinel)} times")
    before, after = text.split(sentinel)
    return before, after


def _between(text: str, first: str, second: str) -> str:
    return text.split(first, 1)[1].split(second, 1)[0]


def derive_shape(render: Render, bos_token: str = "", add_bos: bool = False) -> TemplateShape:
    """Read the per-role pieces off sentinel renders; ExportError for a template that has none."""
    s = SENTINELS
    system, user, assistant, user2 = (
        {"role": role, "content": s[key]}
        for role, key in (("system", "system"), ("user", "user"), ("assistant", "assistant"), ("user", "user2"))
    )
    try:
        head_system, suffix_system = _split(render([system], False), s["system"])
        suffix_user = _split(render([system, user], False), s["user"])[1]
        suffix_assistant = _split(render([system, user, assistant], False), s["assistant"])[1]
        head_user, suffix_user_alone = _split(render([user], False), s["user"])
        full = render([system, user, assistant, user2], True)
        system_to_user = _between(full, s["system"], s["user"])
        user_to_assistant = _between(full, s["user"], s["assistant"])
        assistant_to_user = _between(full, s["assistant"], s["user2"])
        tail = _split(full, s["user2"])[1]
        if not (system_to_user.startswith(suffix_system) and user_to_assistant.startswith(suffix_user)
                and assistant_to_user.startswith(suffix_assistant) and tail.startswith(suffix_user)
                and suffix_user_alone == suffix_user):
            raise ValueError("the text after a message depends on what follows it")
        prefix_user = system_to_user[len(suffix_system):]
        prefix_assistant = user_to_assistant[len(suffix_user):]
        if assistant_to_user[len(suffix_assistant):] != prefix_user:
            raise ValueError("the user prefix differs between turns")
    except Exception as exc:  # a template error (raise_exception) or an inconsistency: no shape to translate
        raise ExportError(f"the chat template has no fixed per-message shape ({str(exc).splitlines()[0]})",
                          "write the Ollama TEMPLATE by hand") from exc
    stripped = ""
    if add_bos and bos_token and head_system.startswith(bos_token) and head_user.startswith(bos_token):
        # llama.cpp and Ollama add BOS themselves for such models; the template's BOS would be a second one
        stripped, head_system, head_user = bos_token, head_system[len(bos_token):], head_user[len(bos_token):]
    return TemplateShape(
        head_system, head_user,
        {"system": head_system, "user": prefix_user, "assistant": prefix_assistant},
        {"system": suffix_system, "user": suffix_user, "assistant": suffix_assistant},
        tail[len(suffix_user):], stripped,
    )


def end_of_turn_token(shape: TemplateShape | None, stop_tokens: Sequence[str]) -> str | None:
    """The stop token the template writes after an assistant message: what the model learned to emit.

    The longest stop token inside the assistant suffix (`<|im_end|>` in `<|im_end|>\\n`). None without a
    shape or when no stop token is there: llama.cpp then stops on EOS and the end-of-turn names it knows.
    """
    if shape is None:
        return None
    inside = [token for token in stop_tokens if token and token in shape.suffix["assistant"]]
    return max(inside, key=len) if inside else None
