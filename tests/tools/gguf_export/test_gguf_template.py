"""Chat templates as Ollama sees them: the per-message shape, the end-of-turn token, and a Go template
that renders what the Jinja template renders."""

from __future__ import annotations

import pytest

from sapo_lite.data.examples import BUILTIN_TEMPLATES
from sapo_lite.errors import ExportError
from sapo_lite.tools.gguf_export.chat_template import derive_shape, end_of_turn_token, renderer
from sapo_lite.tools.gguf_export.ollama import go_template, modelfile_text, render_go

SMOLLM2 = (  # SmolLM2-Instruct's own template: ChatML with a default system turn
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (  # refuses system messages and non-alternating roles: no fixed per-message shape
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize(("template", "family", "bos", "eos", "add_bos", "stops", "eot"), [
    (BUILTIN_TEMPLATES["chatml"], "chatml", "<s>", "</s>", True, ["</s>", "<|im_end|>"], "<|im_end|>"),
    (BUILTIN_TEMPLATES["zephyr"], "zephyr", "<s>", "</s>", True, ["</s>"], "</s>"),
    (SMOLLM2, "chatml", "<|im_start|>", "<|im_end|>", False, ["<|endoftext|>", "<|im_end|>"], "<|im_end|>"),
    (LLAMA3, "llama3", "<|begin_of_text|>", "<|end_of_text|>", True, ["<|end_of_text|>", "<|eot_id|>"],
     "<|eot_id|>"),
])
def test_templates_sapo_lite_trains_with_become_modelfiles(template, family, bos, eos, add_bos, stops, eot):
    render = renderer(template, bos, eos)
    shape = derive_shape(render, bos, add_bos)
    assert shape.family == family
    assert end_of_turn_token(shape, stops) == eot  # the stop token the model learned to end its turn with
    text = modelfile_text("m.q8_0.gguf", shape, render, stops)
    assert text.startswith('FROM ./m.q8_0.gguf\nTEMPLATE """{{ range')
    assert text.endswith('"""\n' + "".join(f'PARAMETER stop "{s}"\n' for s in stops))
    if add_bos and "bos_token" in template:
        assert bos not in text  # llama.cpp and Ollama add BOS themselves: the template must not add a second


def test_the_go_template_keeps_a_default_system_turn():
    render = renderer(SMOLLM2)
    source = go_template(derive_shape(render))
    expected = render(CONVERSATION, True)
    assert "You are a helpful AI assistant named SmolLM" in expected
    assert render_go(source, CONVERSATION) == expected
    with_system = [{"role": "system", "content": "Be terse."}, *CONVERSATION]
    assert render_go(source, with_system) == render(with_system, True)  # and leaves it out after a system message


def test_a_template_without_a_fixed_shape_is_refused_in_one_line():
    with pytest.raises(ExportError) as info:
        derive_shape(renderer(MISTRAL, "<s>", "</s>"), "<s>", True)
    assert "no fixed per-message shape" in info.value.message and "\n" not in info.value.message
    assert end_of_turn_token(None, ["</s>"]) is None  # and no end-of-turn token is guessed


def test_the_go_interpreter_applies_trim_markers():
    source = ("{{- range $i, $_ := .Messages }}\n  {{- if eq $i 0 }}[first] {{ end -}}\n {{ .Role }}:{{ .Content }}\n"
              "{{ end }}")
    assert render_go(source, CONVERSATION[:2]) == "[first] user:Hi\nassistant:Hello!\n"
