"""`sapo-lite merge RUN --out FILE.gguf` on a tiny trained run: the file computes the merged model,
carries the run's chat template and stop tokens, has an Ollama Modelfile beside it, and bad input is
one line with nothing written."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gguf
import pytest
from gguf_models import agreement, gguf_model, greedy_hf, ids_of, max_logit_diff, merged_model
from helpers import fails
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.data.examples import BUILTIN_TEMPLATES, install_chat_template, render_prompt_ids, stop_token_ids
from sapo_lite.models.roles import load_tokenizer
from sapo_lite.tools.gguf_export.ollama import render_go

runner = CliRunner()
PROMPTS = ["reverse : 1 2 3 4", "reverse : 9 8 7 6 5", "reverse : 5 0 5 1"]


def merge(*args: str | Path) -> str:
    result = runner.invoke(app, ["merge", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def run_tokenizer(base: Path):
    tokenizer = load_tokenizer(str(base))
    install_chat_template(tokenizer, "chatml")  # what the run trained with (data.chat_template=chatml)
    return tokenizer


def read_fields(path: Path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


@pytest.fixture(scope="module")
def prompt_ids(spm_base):
    tokenizer = run_tokenizer(spm_base)
    return [render_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.mark.parametrize("adapter", ["policy", "ema"])
def test_an_out_ending_in_gguf_writes_one_file_that_computes_the_merged_model(spm_run, spm_base, prompt_ids,
                                                                               tmp_path, adapter):
    out = tmp_path / "tiny.f32.gguf"
    output = merge(spm_run, "--out", out, "--quant", "f32", "--adapter", adapter)  # no --format: the name says it
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"  # a file, not a folder named tiny.f32.gguf
    reference = merged_model(spm_base, spm_run / "adapters" / adapter)
    prompts = prompt_ids + ids_of(spm_base)
    assert max_logit_diff(merged_model(spm_base), reference, prompts) > 0.1  # the adapter changes the model ...
    assert max_logit_diff(gguf_model(out), reference, prompts) < 1e-4  # ... and the file holds that change
    assert f"wrote {out}: " in output and "f32, 21 tensors" in output
    assert "folded into 14 weights" in output and f"{adapter} adapter" in output


def test_f16_logits_and_q8_0_greedy_answers_follow_the_merged_model(spm_run, spm_base, prompt_ids, tmp_path):
    merge(spm_run, "--out", tmp_path / "tiny.f16.gguf", "--quant", "f16")
    merge(spm_run, "--out", tmp_path / "tiny.q8_0.gguf")  # q8_0 is the default
    reference = merged_model(spm_base, spm_run / "adapters" / "policy")
    assert max_logit_diff(gguf_model(tmp_path / "tiny.f16.gguf"), reference, prompt_ids) < 0.25  # logits are O(10)
    assert read_fields(tmp_path / "tiny.q8_0.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    stops = stop_token_ids(run_tokenizer(spm_base))
    q8 = gguf_model(tmp_path / "tiny.q8_0.gguf")
    agreed = [agreement(greedy_hf(reference, ids, 16, stops), greedy_hf(q8, ids, 16, stops)) for ids in prompt_ids]
    assert min(agreed) >= 4 and sum(agreed) >= 0.75 * 16 * len(prompt_ids), agreed


def test_the_file_and_the_modelfile_carry_the_training_template_and_stop_tokens(spm_run, spm_base, tmp_path):
    out = tmp_path / "tiny.q8_0.gguf"
    output = merge(spm_run, "--out", out)
    tokenizer = run_tokenizer(spm_base)
    stops = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))
    assert stops == ["</s>", "<|im_end|>"]
    fields = read_fields(out)
    assert fields["tokenizer.chat_template"] == BUILTIN_TEMPLATES["chatml"]  # the run's, not the tokenizer's own
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True

    modelfile = tmp_path / "tiny.q8_0.Modelfile"
    lines = modelfile.read_text().splitlines()
    assert lines[0] == "FROM ./tiny.q8_0.gguf"
    assert lines[-2:] == ['PARAMETER stop "</s>"', 'PARAMETER stop "<|im_end|>"']
    go_source = modelfile.read_text().split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse : 1 2"},
                    {"role": "assistant", "content": "2 1"}, {"role": "user", "content": "reverse : 3 4"}]
    for messages in (conversation, conversation[1:]):
        assert render_go(go_source, messages) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    assert f"wrote {modelfile}" in output
    assert f"llama-cli -m {out}" in output and f"ollama create tiny-q8_0 -f {modelfile}" in output
    assert "stop tokens: </s> <|im_end|>" in output


def test_overwrite_replaces_an_earlier_export_only(spm_run, tmp_path):
    out = tmp_path / "tiny.gguf"
    merge(spm_run, "--out", out, "--quant", "q4_0")
    fails(["merge", spm_run, "--out", out], "already exists", "--overwrite")
    assert read_fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0  # untouched
    merge(spm_run, "--out", out, "--quant", "f16", "--overwrite")
    assert read_fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    fails(["merge", spm_run, "--out", notes, "--overwrite"], "is not a GGUF file")
    assert notes.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "tiny.Modelfile", "tiny.gguf"]


@pytest.mark.parametrize(("args", "expected"), [
    (["--out", "{d}/m.gguf", "--format", "hf"], ["names a GGUF file", "--format hf writes a folder"]),
    (["--out", "{d}/m", "--format", "gguf"], ["does not end in .gguf", "--out {d}/m.gguf"]),
    (["--out", "{d}/m.gguf", "--format", "onnx"], ["--format onnx"]),
    (["--out", "{d}/m.q4_k_m.gguf", "--quant", "q4_k_m"],
     ["llama-quantize", "--quant f16 --out {d}/m.f16.gguf", "llama-quantize {d}/m.f16.gguf {d}/m.q4_k_m.gguf Q4_K_M"]),
    (["--out", "{d}/m.gguf", "--quant", "iq2_xs"], ["llama-quantize", "IQ2_XS"]),
    (["--out", "{d}/m.gguf", "--quant", "q3"], ["unknown --quant q3", "q8_0"]),
    (["--out", "{d}/m.q4_0.gguf", "--quant", "f16"], ["`m.q4_0.gguf` names q4_0, but --quant f16", "m.f16.gguf"]),
    (["--out", "{d}/m-Q4_K_M.gguf"], ["--quant q4_k_m can only be written by llama.cpp's llama-quantize"]),
    (["--out", "{d}/m.gguf", "--dtype", "fp16"], ["--dtype is for model folders"]),
    (["--out", "{d}/m.gguf", "--nf4-roundtrip"], ["--nf4-roundtrip is not available for GGUF"]),
    (["--out", "{d}/m", "--quant", "q8_0"], ["--quant is for GGUF files"]),
])
def test_bad_options_are_one_line_and_write_nothing(spm_run, tmp_path, args, expected):
    fails(["merge", spm_run, *(a.format(d=tmp_path) for a in args)], *(e.format(d=tmp_path) for e in expected))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "file_type"), [("m.q4_0.gguf", gguf.LlamaFileType.MOSTLY_Q4_0),
                                               ("m-F16.gguf", gguf.LlamaFileType.MOSTLY_F16),
                                               ("m.gguf", gguf.LlamaFileType.MOSTLY_Q8_0)])
def test_without_quant_the_file_name_decides_the_type_else_q8_0(spm_run, tmp_path, name, file_type):
    merge(spm_run, "--out", tmp_path / name)
    assert read_fields(tmp_path / name)["general.file_type"] == file_type


def test_a_run_without_adapters_is_one_line(spm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(spm_run, run, ignore=shutil.ignore_patterns("adapters", "checkpoints"))
    fails(["merge", run, "--out", tmp_path / "out" / "m.gguf"], "has no `policy` adapter yet")
    assert not (tmp_path / "out").exists()


def test_an_unsupported_architecture_is_named_with_the_supported_ones(finished_tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_tiny_run, run)  # the tiny preset's base lives in RUN/base_model
    config = run / "base_model" / "config.json"
    config.write_text(config.read_text().replace('"LlamaForCausalLM"', '"GPT2LMHeadModel"'))
    fails(["merge", run, "--out", tmp_path / "m.gguf", "--quant", "f16"], "GPT2LMHeadModel",
          "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM, "
          "Gemma3ForConditionalGeneration, Phi3ForCausalLM",
          f"sapo-lite merge {run} --out {tmp_path / 'm'}-hf/ && python convert_hf_to_gguf.py "
          f"{tmp_path / 'm'}-hf/ --outfile {tmp_path / 'm.gguf'} --outtype f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_tiny_presets_word_level_tokenizer_is_refused(finished_tiny_run, tmp_path):
    fails(["merge", finished_tiny_run, "--out", tmp_path / "m.gguf"], "WordLevel", "BPE")
    assert list(tmp_path.iterdir()) == []


def test_a_template_ollama_cannot_express_still_gives_a_gguf_without_modelfile(spm_run, tmp_path):
    # Mistral's [INST] template refuses system messages: it has no fixed per-message shape.
    template = tmp_path / "inst.jinja"
    template.write_text(
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}")
    run = tmp_path / "run"
    shutil.copytree(spm_run, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("chat_template: chatml", f"chat_template: {template}"))
    out = tmp_path / "out" / "inst.gguf"
    output = merge(run, "--out", out)
    assert "no Modelfile: the chat template has no fixed per-message shape" in output
    assert read_fields(out)["tokenizer.chat_template"] == template.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["inst.gguf"]
    assert "ollama create" not in output


def test_a_missing_gguf_package_is_one_line_with_the_install_command(spm_run, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "gguf" or m.startswith(("gguf.", "sapo_lite.tools.gguf_export"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    fails(["merge", spm_run, "--out", tmp_path / "m.gguf"], "needs the `gguf` package", 'pip install "sapo-lite[gguf]"')
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_nothing(spm_run, tmp_path, monkeypatch):
    from sapo_lite.tools.gguf_export import export as export_module

    def interrupted(p, source, adapter):
        if p.name.startswith("blk.1."):
            raise KeyboardInterrupt  # a Ctrl-C half-way through the tensors
        return original(p, source, adapter)

    original = export_module._chunks
    monkeypatch.setattr(export_module, "_chunks", interrupted)
    result = runner.invoke(app, ["merge", str(spm_run), "--out", str(tmp_path / "out" / "m.gguf")])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file, its temporary name, the Modelfile nor out/
    monkeypatch.setattr(export_module, "_chunks", original)
    merge(spm_run, "--out", tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]
