"""CPU fp32 bases stored for decoding (weights [in, out], q/k/v and gate/up side by side): the same model
to everything that reads it, and the lean loop's projections joined into one matmul a group."""

import copy

import pytest
import torch
from helpers import hf_tokens, random_contexts, tiny_mistral, with_random_adapters

from sapo_lite.config.schema import LoraSettings, ModelConfig
from sapo_lite.models import matmul
from sapo_lite.models.decode_plan import build_plan
from sapo_lite.models.decoding import lean_generate
from sapo_lite.models.merged_phase import MergedAdapter
from sapo_lite.models.roles import EMA, POLICY, attach_adapters, load_base
from sapo_lite.models.sampling import greedy
from sapo_lite.models.weight_layout import side_by_side, store_transposed_for_decoding

NEVER = [999]
pytestmark = pytest.mark.skipif(not matmul.onednn_usable(), reason="weights are re-stored only for oneDNN's matmul")


def plain(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32).eval()


def restored(model):
    store_transposed_for_decoding(model)
    return model


def test_the_base_keeps_its_values_and_shapes_and_computes_the_same(tiny_base_dir):
    ours = load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu")).eval()
    theirs = plain(tiny_base_dir)
    attention, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    assert side_by_side([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]) is not None
    assert side_by_side([mlp.gate_proj.weight, mlp.up_proj.weight]) is not None
    assert mlp.down_proj.weight.t().is_contiguous() and not mlp.down_proj.weight.is_contiguous()
    for (name, mine), (_, reference) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert mine.shape == reference.shape and torch.equal(mine, reference), name
    ids = torch.tensor(random_contexts(3, [11, 11]))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    contexts = random_contexts(4, [6, 13])
    assert hf_tokens(ours, contexts, 10, NEVER) == hf_tokens(theirs, contexts, 10, NEVER)


def test_training_gradients_do_not_depend_on_the_layout(tiny_base_dir):
    def policy_gradients(base):
        model = attach_adapters(base, LoraSettings(r=4, alpha=8), None, gradient_checkpointing=False)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:  # A and B alike: peft draws A from the global generator
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        model.set_adapter(POLICY)
        ids = torch.tensor(random_contexts(5, [16, 16]))
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ours = policy_gradients(load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu")))
    theirs = policy_gradients(plain(tiny_base_dir).requires_grad_(False))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5)


def test_the_lean_loop_reads_each_group_with_one_matmul_also_merged(tiny_base_dir):
    model = with_random_adapters(load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu")))
    contexts = random_contexts(7, [5, 9, 12])
    expected = hf_tokens(model, contexts, 12, NEVER)
    plan = build_plan(model)
    assert all(layer.qkv.joined is not None and layer.gate_up.joined is not None for layer in plan.layers)
    assert lean_generate(plan, contexts, 12, 0, NEVER, greedy) == expected
    with MergedAdapter(model, EMA):  # the merged copies lie side by side too
        merged = build_plan(model)
        assert all(layer.qkv.joined is not None and layer.gate_up.joined is not None for layer in merged.layers)
        assert merged.layers[0].qkv.joined.data_ptr() != plan.layers[0].qkv.joined.data_ptr()
        assert lean_generate(merged, contexts, 12, 0, NEVER, greedy) == expected


def test_an_adapter_on_some_projections_of_a_group_merges_and_decodes_the_same(tiny_base_dir):
    base = load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = attach_adapters(base, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), None,
                            gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    model.eval()
    model.set_adapter(EMA, inference_mode=True)
    contexts = random_contexts(8, [4, 10])
    expected = hf_tokens(model, contexts, 12, NEVER)
    with MergedAdapter(model, EMA):
        assert lean_generate(build_plan(model), contexts, 12, 0, NEVER, greedy) == expected
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()
             if "lora_" not in n}
    assert all(torch.equal(after[name], value) for name, value in before.items())


@pytest.mark.parametrize("packing", [True, False])
def test_a_tied_head_is_re_stored_once_with_its_embedding_unless_read_packed(monkeypatch, packing):
    if packing and not matmul.packing_usable():
        pytest.skip("this torch's oneDNN cannot lay a weight out its own way")
    monkeypatch.setattr(matmul, "_packing_verified", packing)
    model = tiny_mistral(tie_word_embeddings=True).requires_grad_(False)  # frozen, as load_base leaves a base
    reference = copy.deepcopy(model)
    restored(model)
    head = model.lm_head.weight
    assert head is model.model.embed_tokens.weight and model.model.layers[0].mlp.down_proj.weight.t().is_contiguous()
    assert head.is_contiguous() if packing else head.t().is_contiguous()  # packed: embedding rows stay contiguous
    assert (build_plan(model).head.packed is not None) == packing
    contexts = random_contexts(2, [7, 9], high=59)
    expected = hf_tokens(reference, contexts, 8, NEVER)
    assert hf_tokens(model, contexts, 8, NEVER) == expected
    assert lean_generate(build_plan(model), contexts, 8, 0, NEVER, greedy) == expected


def test_side_by_side_only_for_blocks_of_one_buffer_in_order():
    columns = torch.randn(8, 12)
    q, k, v = (columns[:, a:b].t() for a, b in ((0, 6), (6, 9), (9, 12)))
    joined = side_by_side([q, k, v])
    assert joined is not None and torch.equal(joined, torch.cat([q, k, v]))
    assert side_by_side([k, q, v]) is None  # out of order
    assert side_by_side([q, k]) is None  # not the whole buffer: the row stride is wider than q + k
    assert side_by_side([torch.randn(6, 8), torch.randn(3, 8)]) is None


def test_a_block_of_a_wider_buffer_multiplies_correctly_on_either_route(monkeypatch):
    monkeypatch.setattr(matmul, "ONEDNN_MIN_WEIGHT", 0)
    columns = torch.randn(64, 96)
    block, x = columns[:, 16:80].t(), torch.randn(3, 64)  # [64 out, 64 in], rows 96 apart
    expected = x @ block.contiguous().t()
    torch.testing.assert_close(matmul.matmul_t(x, block), expected)
    torch.testing.assert_close(matmul.matmul_t(x, columns.t()), x @ columns)  # [in, out] stored: oneDNN as is


def test_a_frozen_head_is_read_from_one_packed_copy_that_follows_its_weight(tiny_base_dir):
    if not matmul.packing_usable():
        pytest.skip("this torch's oneDNN cannot lay a weight out its own way")
    model = with_random_adapters(load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu")))
    contexts = random_contexts(9, [6, 11])
    plan = build_plan(model)
    assert plan.head.packed is not None and build_plan(model).head.packed is plan.head.packed  # made once
    assert lean_generate(plan, contexts, 10, 0, NEVER, greedy) == hf_tokens(model, contexts, 10, NEVER)
    head = model.get_base_model().lm_head
    head.weight.data = head.weight.data * 1.5  # other memory: the packed copy must not be the old one's
    assert build_plan(model).head.packed is not plan.head.packed
    assert lean_generate(build_plan(model), contexts, 10, 0, NEVER, greedy) == hf_tokens(model, contexts, 10, NEVER)


def test_an_adapted_head_gets_no_packed_copy(tiny_base_dir):
    """A LoRA on the head changes with every EMA update and is merged into scratch memory rewritten in
    place: a packed copy of it would go stale without torch seeing a new version."""
    base = load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu"))
    model = attach_adapters(base, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "lm_head"]), None,
                            gradient_checkpointing=False).eval()
    model.set_adapter(EMA, inference_mode=True)
    contexts = random_contexts(10, [5, 8])
    assert build_plan(model).head.packed is None
    for step in range(2):  # two phases: the second merges other values into the same scratch memory
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name and f".{EMA}." in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(step)) * 0.3)
        expected = hf_tokens(model, contexts, 10, NEVER)
        with MergedAdapter(model, EMA):
            assert build_plan(model).head.packed is None
            assert lean_generate(build_plan(model), contexts, 10, 0, NEVER, greedy) == expected
