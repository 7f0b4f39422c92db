"""The Ollama `Modelfile` beside an exported GGUF: `FROM`, a Go `TEMPLATE` equal to the training
chat template, and one `PARAMETER stop` per stop token.

Ollama does not run the Jinja template stored in the GGUF: without a TEMPLATE it sends the raw
prompt, and a chat-tuned model then answers worse without any error; with a wrong one it may never
stop. So the Go template is built from the template's shape (chat_template.py) and then *executed*
by a small interpreter of the Go template subset it uses: it must reproduce the Jinja rendering
byte for byte on real conversations, or no Modelfile is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from ...errors import ExportError
from .chat_template import Render, TemplateShape

CHECK_TURNS = [
    ("user", "What is the capital of France?"),
    ("assistant", "Paris."),
    ("user", "And of Italy?\nAnswer briefly."),
    ("assistant", "Rome."),
    ("user", "Thanks! {{ not code }}"),
]


def _literal(text: str) -> str:
    """Template text as Go template source: as is, unless it holds action delimiters."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if "{{" in text or "}}" in text else text


def go_template(shape: TemplateShape) -> str:
    """One generic Go template for the shape (no trim markers, so every byte outside actions is literal)."""
    lit = _literal
    user_head = (
        f"{{{{ if eq $i 0 }}}}{lit(shape.head_user)}{{{{ else }}}}{lit(shape.prefix['user'])}{{{{ end }}}}"
        if shape.head_user != shape.prefix["user"] else lit(shape.prefix["user"])
    )
    return (
        "{{ range $i, $_ := .Messages }}"
        f'{{{{ if eq .Role "system" }}}}{lit(shape.head_system)}{{{{ .Content }}}}{lit(shape.suffix["system"])}'
        f'{{{{ else if eq .Role "user" }}}}{user_head}{{{{ .Content }}}}{lit(shape.suffix["user"])}'
        f'{{{{ else if eq .Role "assistant" }}}}{lit(shape.prefix["assistant"])}{{{{ .Content }}}}'
        f"{lit(shape.suffix['assistant'])}{{{{ end }}}}{{{{ end }}}}{lit(shape.generation_prompt)}"
    )


def modelfile_text(gguf_name: str, shape: TemplateShape, render: Render, stop_tokens: Sequence[str]) -> str:
    """The Modelfile for `gguf_name` (a file in the same folder); ExportError when Ollama cannot carry it."""
    source = go_template(shape)
    check_go_template(source, shape, render)
    bad = next((c for c in source if not c.isprintable() and c not in "\n\t"), None)
    if '"""' in source or bad is not None:  # Ollama's parser ends the value at """ and drops control characters
        raise ExportError('the chat template holds """ or control characters, which a Modelfile cannot carry',
                          "write the Ollama TEMPLATE by hand")
    if any('"' in token for token in stop_tokens):  # Ollama strips the quotes and applies no escapes
        raise ExportError("a stop token holds a double quote, which a Modelfile cannot carry",
                          "write the Modelfile by hand")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{source}"""']
    lines += [f'PARAMETER stop "{token}"' for token in dict.fromkeys(stop_tokens)]
    return "\n".join(lines) + "\n"


def check_go_template(source: str, shape: TemplateShape, render: Render) -> None:
    """The Go template must render what the Jinja template renders, with and without a system message."""
    turns = [{"role": role, "content": content} for role, content in CHECK_TURNS]
    with_system = [{"role": "system", "content": "You are terse."}, *turns]
    for messages in (with_system, with_system[1:], with_system[1:2]):
        expected = render(messages, True)
        got = shape.stripped_bos + render_go(source, messages)
        if got != expected:
            raise ExportError(f"the Ollama template built from the chat template renders {got!r}, not {expected!r}",
                              "write the Ollama TEMPLATE by hand")


# ------------------------------------------------------------ a tiny Go template interpreter
# The subset go_template() emits, plus trim markers: range over .Messages, if / else if / else / end,
# eq on .Role or a range index, .Role, .Content and string literals.

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_RANGE = re.compile(r"^range \$(\w+), \$\w+ := \.Messages$")
_CONDITION = re.compile(r'^eq (\.Role|\$\w+) ("(?:[^"\\]|\\.)*"|\d+)$')


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """Execute `template` on `messages` as Ollama's Go template engine would."""
    tokens: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        text = text.lstrip(" \t\r\n") if trim_next else text
        tokens.append(("text", text.rstrip(" \t\r\n") if match.group(1) else text))
        tokens.append(("action", match.group(2)))
        position, trim_next = match.end(), bool(match.group(3))
    tail = template[position:]
    tokens.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    nodes, index, ended_by = _parse(tokens, 0)
    if ended_by is not None or index != len(tokens):
        raise ValueError(f"unbalanced template near {ended_by!r}")
    return _evaluate(nodes, {"messages": messages}, {})


def _parse(tokens: list[tuple[str, str]], index: int) -> tuple[list[Any], int, str | None]:
    nodes: list[Any] = []
    while index < len(tokens):
        kind, value = tokens[index]
        index += 1
        if kind == "text":
            nodes.append(("text", value))
        elif value in ("end", "else") or value.startswith("else if "):
            return nodes, index, value
        elif value.startswith("range "):
            body, index, ended_by = _parse(tokens, index)
            if ended_by != "end":
                raise ValueError("range without end")
            nodes.append(("range", value, body))
        elif value.startswith("if "):
            node, index = _parse_if(tokens, index, value[3:])
            nodes.append(node)
        else:
            nodes.append(("expr", value))
    return nodes, index, None


def _parse_if(tokens: list[tuple[str, str]], index: int, condition: str) -> tuple[Any, int]:
    body, index, ended_by = _parse(tokens, index)
    if ended_by == "end":
        return ("if", condition, body, []), index
    if ended_by == "else":
        else_body, index, ended_by = _parse(tokens, index)
        if ended_by != "end":
            raise ValueError("else without end")
        return ("if", condition, body, else_body), index
    if ended_by and ended_by.startswith("else if "):
        node, index = _parse_if(tokens, index, ended_by[8:])
        return ("if", condition, body, [node]), index
    raise ValueError("if without end")


def _evaluate(nodes: list[Any], dot: dict[str, Any], variables: dict[str, Any]) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            expr = node[1]
            out.append(json.loads(expr) if expr.startswith('"') else str(dot[expr.removeprefix(".").lower()]))
        elif node[0] == "range":
            match = _RANGE.match(node[1])
            if match is None:
                raise ValueError(f"unsupported range: {node[1]}")
            for index, message in enumerate(dot["messages"]):
                out.append(_evaluate(node[2], message, {**variables, match[1]: index}))
        else:
            match = _CONDITION.match(node[1])
            if match is None:
                raise ValueError(f"unsupported condition: {node[1]}")
            left = dot["role"] if match[1] == ".Role" else variables[match[1][1:]]
            out.append(_evaluate(node[2] if left == json.loads(match[2]) else node[3], dot, variables))
    return "".join(out)


def ollama_model_name(gguf_file: Any, quant: str) -> str:
    """The name `ollama create` is suggested for a GGUF file: its name without `.gguf`, with the quant added when
    the name does not carry it, so two quants of one run (`smol.gguf` at q8_0 and q4_0, or `smol.q8_0.gguf` and
    `smol.q4_0.gguf`) never suggest the same Ollama model."""
    stem = re.sub(r"\.gguf$", "", str(getattr(gguf_file, "name", gguf_file)), flags=re.IGNORECASE).lower()
    name = re.sub(r"[^a-z0-9_-]+", "-", stem).strip("-") or "sapo-lite"
    quant = quant.lower()
    return name if quant in name else f"{name}-{quant}"
