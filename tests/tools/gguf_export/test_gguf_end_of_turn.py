"""The end-of-turn token of a base converted from a GGUF file (`GGUF_SOURCE`) survives an export whose template
names none: llama.cpp stops at `tokenizer.ggml.eot_token_id`, and without it at EOS only."""

from __future__ import annotations

import shutil

import gguf

from sapo_lite.tools.gguf_export import export_gguf

EOT_KEY = gguf.Keys.Tokenizer.EOT_ID


def eot_of(path):
    field = gguf.GGUFReader(path).get_field(EOT_KEY)
    return None if field is None else int(field.contents())


def test_a_gguf_sources_end_of_turn_is_kept_when_the_template_has_none(tmp_path, spm_base):
    source = tmp_path / "source.gguf"
    export_gguf(spm_base, source, "f32", eot_token="<|im_end|>")  # stands in for a downloaded GGUF model
    im_end = eot_of(source)
    assert im_end is not None
    base = shutil.copytree(spm_base, tmp_path / "base")
    (base / "GGUF_SOURCE").write_text(str(source))  # as models/gguf_base.py leaves a converted base

    export_gguf(base, tmp_path / "no-eot.gguf", "f32", eot_token=None)  # a template without an end of turn
    assert eot_of(tmp_path / "no-eot.gguf") == im_end
    export_gguf(base, tmp_path / "eos.gguf", "f32", eot_token="</s>")  # the run's own one replaces it
    assert eot_of(tmp_path / "eos.gguf") == 2
