"""The lean decode loop writes what `generate` writes: same greedy tokens, same early stops, same padding;
models it does not cover go to `generate` untouched."""

import pytest
import torch
from helpers import hf_tokens, random_contexts, tiny_mistral, with_random_adapters

from sapo_lite.config.schema import ModelConfig
from sapo_lite.models import matmul
from sapo_lite.models.decode_plan import build_plan, why_not_lean
from sapo_lite.models.decoding import kv_cache, lean_generate, prefill
from sapo_lite.models.generation import left_pad
from sapo_lite.models.roles import EMA, POLICY, load_base
from sapo_lite.models.sampling import greedy
from sapo_lite.sapo import augment
from sapo_lite.sapo.augment import generate_segments

NEVER = [999]  # a stop id no model here can produce
LENGTHS = [[5, 9, 12, 17], [1, 30], [3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.fixture(scope="module")
def llama(tiny_base_dir):
    return with_random_adapters(load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu")))


@pytest.fixture(scope="module")
def mistral():
    return with_random_adapters(tiny_mistral(), seed=2)


@pytest.fixture(params=["onednn", "F.linear"])
def matmul_route(request, monkeypatch):
    """Both routes of models/matmul.py: oneDNN where this torch has it (for every weight, however small: the
    tiny models' weights are all below the size it is kept for), and the `F.linear` fallback."""
    if request.param == "onednn" and not matmul.onednn_usable():
        pytest.skip("oneDNN's linear is not usable in this torch build")
    monkeypatch.setattr(matmul, "_onednn_verified", request.param == "onednn")
    monkeypatch.setattr(matmul, "ONEDNN_MIN_WEIGHT", 0)
    return request.param


def lean_tokens(model, contexts, new_tokens, stop_ids, pick=greedy):
    return lean_generate(build_plan(model), contexts, new_tokens, 0, stop_ids, pick)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_greedy_tokens_equal_generate_with_rows_stopping_early(request, arch, lengths, matmul_route):
    model = request.getfixturevalue(arch)
    contexts = random_contexts(len(lengths), lengths)
    free = hf_tokens(model, contexts, 14, NEVER)
    assert lean_tokens(model, contexts, 14, NEVER) == free
    stops = sorted({free[0][3], free[-1][1]})  # tokens the free run writes, so rows stop at different steps
    expected = hf_tokens(model, contexts, 14, stops)
    ours = lean_tokens(model, contexts, 14, stops)
    assert ours == expected
    stopped = [row for row in ours if any(t in stops for t in row[:-1])]
    assert stopped and all(row[-1] == 0 for row in stopped)  # pad after the stop token, as generate writes


def test_output_ends_when_every_row_has_stopped(llama):
    contexts = random_contexts(7, [6, 9, 4])
    stops = sorted({row[0] for row in hf_tokens(llama, contexts, 12, NEVER)})  # every row stops at once
    ours = lean_tokens(llama, contexts, 12, stops)
    assert ours == hf_tokens(llama, contexts, 12, stops)
    assert [len(row) for row in ours] == [1, 1, 1]


def test_decodes_with_the_active_adapter_and_with_adapters_off(llama):
    contexts = random_contexts(11, [4, 13, 8])
    ema = lean_tokens(llama, contexts, 10, NEVER)
    try:
        llama.set_adapter(POLICY)
        policy = lean_tokens(llama, contexts, 10, NEVER)
        assert policy == hf_tokens(llama, contexts, 10, NEVER)
        with llama.disable_adapter():
            base = lean_tokens(llama, contexts, 10, NEVER)
            assert base == hf_tokens(llama, contexts, 10, NEVER)
    finally:
        llama.set_adapter(EMA, inference_mode=True)
    assert ema != policy and ema != base  # the three roles really are three models here


def test_packed_prefill_logits_equal_the_models(llama):
    contexts = random_contexts(3, [3, 11, 7])
    ids, mask = left_pad(contexts, 0)
    with torch.no_grad():
        expected = llama(input_ids=ids, attention_mask=mask).logits[:, -1]
    plan = build_plan(llama)
    keys, values = kv_cache(plan, 3, 20)
    with torch.inference_mode():
        ours = prefill(plan, contexts, ids.shape[1], keys, values)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_nf4_base_decodes_with_its_adapter_unmerged(tiny_base_dir):
    pytest.importorskip("bitsandbytes")
    model = with_random_adapters(load_base(ModelConfig(quant="nf4", dtype="fp32"), str(tiny_base_dir),
                                           torch.device("cpu")))
    plan = build_plan(model)
    assert plan.layers[0].qkv.parts[0].module is not None and plan.layers[0].qkv.stacked_a is not None
    contexts = random_contexts(13, [5, 9, 12, 17])
    stops = [hf_tokens(model, contexts, 12, NEVER)[1][2]]
    assert lean_tokens(model, contexts, 12, stops) == hf_tokens(model, contexts, 12, stops)


def olmo():
    """A Llama-like family sapo-lite has no file for (models/families/)."""
    from transformers import OlmoConfig, OlmoForCausalLM

    torch.manual_seed(0)
    return OlmoForCausalLM(OlmoConfig(vocab_size=60, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()


def with_repetition_penalty():
    model = tiny_mistral(seed=3)
    model.generation_config.repetition_penalty = 1.3
    return model


@pytest.mark.parametrize("build, reason", [
    (olmo, "not OlmoForCausalLM"),
    (with_repetition_penalty, "sets repetition_penalty"),
    (lambda: tiny_mistral().train(), "train mode"),
])
def test_models_it_does_not_cover_are_refused_and_decoded_by_generate(build, reason):
    model = build()
    assert reason in why_not_lean(model)
    contexts = random_contexts(5, [4, 9])
    runs = []
    for decoder in ("lean", "hf"):
        torch.manual_seed(11)
        runs.append(generate_segments(model, contexts, 6, 0, NEVER, 0.7, 50, 0.95, decoder=decoder))
    assert runs[0] == runs[1]  # exactly today's path: same seed, same tokens


def test_a_sequence_past_the_sliding_window_is_decoded_lean_with_generates_tokens(monkeypatch):
    model = tiny_mistral(seed=4, sliding_window=6)
    calls = []
    monkeypatch.setattr(augment, "lean_generate", lambda *args: calls.append(args) or lean_generate(*args))
    past = random_contexts(6, [4, 9, 5])  # 9 + 8 tokens: past the window in prefill and in decoding
    expected = hf_tokens(model, past, 8, NEVER)
    assert generate_segments(model, past, 8, 0, NEVER, 0.7, 1, 0.95) == expected  # top_k 1: greedy
    assert len(calls) == 1
    assert lean_tokens(model, past, 8, NEVER) == expected


def test_greedy_answers_follow_the_runs_decoder_choice(llama, tiny_tokenizer, monkeypatch):
    """Validation and held-out answers decode as `sapo.decoder` says: `hf` never enters the lean loop."""
    from sapo_lite.models import generation

    calls = []
    monkeypatch.setattr(generation, "lean_generate", lambda *args: calls.append(1) or lean_generate(*args))
    prompts = random_contexts(8, [5, 7])
    lean = generation.generate_answers(llama, tiny_tokenizer, prompts, 6, NEVER)
    assert calls == [1]
    assert generation.generate_answers(llama, tiny_tokenizer, prompts, 6, NEVER, decoder="hf") == lean
    assert calls == [1]
    caches = []
    real_generate = llama.generate
    monkeypatch.setattr(llama, "generate", lambda **kw: caches.append(kw["cache_implementation"]) or real_generate(
        **kw))
    static = generation.generate_answers(llama, tiny_tokenizer, prompts, 6, NEVER, decoder="hf", static_cache=True)
    assert static == lean
    assert caches == ["static"] and calls == [1]  # `sapo.static_cache` reaches generate
