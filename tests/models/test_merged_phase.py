"""The merged EMA phase: the EMA's logits inside, the base weights back bit for bit after, whatever happens."""

import pytest
import torch
from helpers import hf_tokens, random_contexts, with_random_adapters

from sapo_lite.config.schema import ModelConfig
from sapo_lite.models.decode_plan import build_plan
from sapo_lite.models.merged_phase import MergedAdapter
from sapo_lite.models.roles import EMA, POLICY, load_base

NEVER = [999]


@pytest.fixture(scope="module")
def model(tiny_base_dir):
    return with_random_adapters(load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu")))


def base_weights(model):
    return {n: p for n, p in model.named_parameters() if "base_layer.weight" in n}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_weights_come_back_bit_identical_after_many_phases(model):
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    ids = torch.tensor([random_contexts(5, [12])[0]])
    unmerged = logits(model, ids)
    phase = MergedAdapter(model, EMA)
    for round_index in range(300):
        with phase:
            if round_index % 100 == 0:
                torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
                assert any(not torch.equal(p, before[n][1]) for n, p in base_weights(model).items())  # really merged
    for name, param in model.named_parameters():
        assert param.data_ptr() == before[name][0] and torch.equal(param.detach(), before[name][1]), name
    assert not any(getattr(m, "merged_adapters", None) for m in model.modules())
    assert torch.equal(logits(model, ids), unmerged)
    assert phase.scratch_bytes() == sum(p.numel() * p.element_size() for p in base_weights(model).values())


def test_lean_loop_inside_the_phase_reads_merged_weights_and_writes_the_same_tokens(model):
    from sapo_lite.models.decoding import lean_generate
    from sapo_lite.models.sampling import greedy

    contexts = random_contexts(9, [5, 9, 12, 17])
    expected = hf_tokens(model, contexts, 12, NEVER)
    with MergedAdapter(model, EMA):
        plan = build_plan(model)
        assert all(part.lora is None for layer in plan.layers for part in layer.qkv.parts)
        assert lean_generate(plan, contexts, 12, 0, NEVER, greedy) == expected


def test_weights_are_restored_when_the_phase_ends_with_an_exception(model):
    before = {n: p.detach().clone() for n, p in base_weights(model).items()}
    with pytest.raises(KeyboardInterrupt), MergedAdapter(model, EMA):
        raise KeyboardInterrupt  # Ctrl-C in the middle of generation
    assert all(torch.equal(p.detach(), before[n]) for n, p in base_weights(model).items())
    assert not any(getattr(m, "merged_adapters", None) for m in model.modules())


def test_merging_an_adapter_that_is_not_the_active_one_is_refused_untouched(model):
    before = {n: p.detach().clone() for n, p in base_weights(model).items()}
    try:
        model.set_adapter(POLICY)
        with pytest.raises(RuntimeError, match="only active one"), MergedAdapter(model, EMA):
            pass
    finally:
        model.set_adapter(EMA, inference_mode=True)
    assert all(torch.equal(p.detach(), before[n]) for n, p in base_weights(model).items())


def test_an_nf4_base_is_not_merged(tiny_base_dir):
    pytest.importorskip("bitsandbytes")
    model = with_random_adapters(load_base(ModelConfig(quant="nf4", dtype="fp32"), str(tiny_base_dir),
                                           torch.device("cpu")))
    with MergedAdapter(model, EMA) as phase:  # merging into 4-bit weights would re-round them: left alone
        assert phase.scratch_bytes() == 0
        assert build_plan(model).layers[0].qkv.stacked_a is not None  # the adapter still runs unmerged


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """A tied tiny Llama (SmolLM2, Llama 3.2, Qwen2.5 and Gemma tie theirs) with a LoRA on the output head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sapo_lite.config.schema import LoraSettings
    from sapo_lite.models.roles import attach_adapters

    folder = tmp_path_factory.mktemp("tied") / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    base = load_base(ModelConfig(quant="none"), str(folder), torch.device("cpu"))
    model = attach_adapters(base, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]), None,
                            gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()
    model.set_adapter(EMA, inference_mode=True)
    return model


def test_a_tied_head_is_merged_into_its_own_weight_never_into_the_embedding(tied_model):
    """Merging the head's LoRA into the shared Parameter would change every input embedding too."""
    from sapo_lite.models.decoding import lean_generate
    from sapo_lite.models.sampling import greedy

    embedding = tied_model.get_input_embeddings().weight
    before = embedding.detach().clone()
    contexts = random_contexts(4, [5, 9, 12])
    ids = torch.tensor([contexts[2]])
    unmerged, expected = logits(tied_model, ids), hf_tokens(tied_model, contexts, 10, NEVER)
    with MergedAdapter(tied_model, EMA):
        assert torch.equal(tied_model.get_input_embeddings().weight, before)
        torch.testing.assert_close(logits(tied_model, ids), unmerged, atol=1e-4, rtol=1e-4)
        plan = build_plan(tied_model)
        assert plan.head.parts[0].lora is None  # merged, and read as one weight
        assert lean_generate(plan, contexts, 10, 0, NEVER, greedy) == expected
    assert tied_model.get_output_embeddings().base_layer.weight is embedding  # tied again after the phase
    assert torch.equal(embedding, before)
