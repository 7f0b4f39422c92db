"""The shared-prefix layout gives the same log-probs and gradients as chosen and rejected apart."""

import numpy as np
import pytest
import torch

from sapo_lite.config.schema import LoraSettings, ModelConfig
from sapo_lite.models.roles import attach_adapters, load_base, policy_parameters, reference
from sapo_lite.sapo.augment import Pair
from sapo_lite.sapo.pair_logps import pack_pairs, pair_logps, shared_prefix_len


def make_model(tiny_base_dir, attention: str, checkpointing: bool):
    torch.manual_seed(0)
    base = load_base(ModelConfig(quant="none", attn_implementation=attention), str(tiny_base_dir),
                     torch.device("cpu"))
    model = attach_adapters(base, LoraSettings(r=4, alpha=8, dropout=0.0), None, gradient_checkpointing=checkpointing)
    for name, param in model.named_parameters():
        if "lora_B.policy" in name:
            torch.nn.init.normal_(param, std=0.05)  # non-zero B so every LoRA tensor gets a gradient
    return model


def sapo_pairs() -> list[Pair]:
    """Pairs shaped like SAPO's: rewrite points early and late, an early stop, an unchanged pair."""
    rng = np.random.default_rng(0)

    def tokens(n):
        return rng.integers(5, 40, n).astype(np.int32)

    pairs = []
    for prompt_len, response_len, t, segment, stop_early in [
        (6, 20, 9, 4, False), (3, 12, 0, 5, False), (10, 15, 4, 6, True), (4, 9, 2, 3, False)
    ]:
        prompt, response = tokens(prompt_len), tokens(response_len)
        chosen = np.concatenate([prompt, response])
        new = tokens(segment)
        new[0] = (response[t] + 1) % 40 + 5 if response[t] != new[0] else new[0]  # differs at the rewrite point
        tail = [] if stop_early else response[t + segment :]
        rejected = np.concatenate([prompt, response[:t], new, tail]).astype(np.int32)
        pairs.append(Pair(chosen, rejected, prompt_len, t, segment))
    pairs.append(Pair(pairs[0].chosen_ids, pairs[0].chosen_ids.copy(), 6, 3, 4))  # the EMA repeated the segment
    return pairs


def test_layout_shares_the_common_prefix_once():
    pairs = sapo_pairs()
    packed = pack_pairs(pairs, pad_id=0)
    shared = [shared_prefix_len(p.chosen_ids, p.rejected_ids) for p in pairs]
    assert shared[:2] == [6 + 9, 3 + 0] and shared[4] == len(pairs[4].chosen_ids)
    assert packed.shared_tokens == sum(shared)
    assert packed.input_ids.shape == (5, max(len(p.chosen_ids) + len(p.rejected_ids) - s
                                             for p, s in zip(pairs, shared)))


@pytest.mark.parametrize(("attention", "checkpointing"), [("sdpa", True), ("sdpa", False), ("eager", False)])
def test_same_logps_and_gradients_as_separate_sequences(tiny_base_dir, attention, checkpointing):
    model = make_model(tiny_base_dir, attention, checkpointing)
    pairs = sapo_pairs()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    results, grads = [], []
    for shared_prefix in (False, True):
        model.zero_grad(set_to_none=True)
        chosen, rejected, n_chosen, n_rejected = pair_logps(
            model, pairs, 0, torch.device("cpu"), chunk_tokens=7, shared_prefix=shared_prefix
        )
        ((chosen - 0.7 * rejected) * weights).sum().backward()
        results.append((chosen.detach(), rejected.detach(), n_chosen, n_rejected))
        grads.append([p.grad.clone() for p in policy_parameters(model)])
    (c0, r0, nc0, nr0), (c1, r1, nc1, nr1) = results
    assert torch.equal(nc0, nc1) and torch.equal(nr0, nr1)
    assert nr0.tolist() == [len(p.rejected_ids) - p.prompt_len for p in pairs]
    assert torch.allclose(c0, c1, atol=1e-4, rtol=1e-5) and torch.allclose(r0, r1, atol=1e-4, rtol=1e-5)
    assert torch.equal(c1[4], r1[4])  # an unchanged pair scores the same on both sides
    for separate, shared in zip(*grads):
        # fp32 sums run in another order in each layout: equal up to rounding at the gradient's scale
        assert torch.allclose(separate, shared, atol=1e-5 * separate.abs().max().item(), rtol=1e-4)


def test_reference_pass_matches_too(tiny_base_dir):
    model = make_model(tiny_base_dir, "sdpa", True)
    pairs = sapo_pairs()
    with reference(model):
        separate = pair_logps(model, pairs, 0, torch.device("cpu"), shared_prefix=False)
        shared = pair_logps(model, pairs, 0, torch.device("cpu"))  # the default layout here
    for a, b in zip(separate, shared):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)


def test_same_logps_in_bf16_as_the_gpu_presets_compute(tiny_base_dir):
    """bf16 weights and activations (the 8B presets' dtype): the layouts agree to bf16 precision, not bit for bit."""
    torch.manual_seed(0)
    base = load_base(ModelConfig(quant="none", dtype="bf16"), str(tiny_base_dir), torch.device("cpu"))
    model = attach_adapters(base, LoraSettings(r=4, alpha=8, dropout=0.0), None, gradient_checkpointing=True)
    for name, param in model.named_parameters():
        if "lora_B.policy" in name:
            torch.nn.init.normal_(param, std=0.05)
    pairs = sapo_pairs()
    separate = pair_logps(model, pairs, 0, torch.device("cpu"), shared_prefix=False)
    shared = pair_logps(model, pairs, 0, torch.device("cpu"), shared_prefix=True)
    assert base.dtype == torch.bfloat16
    for a, b in zip(separate, shared):
        # summed log-probs around -50 from bf16 hidden states: 3e-3 apart here, where fp32 agrees to 1e-5
        assert torch.allclose(a, b, atol=0.02, rtol=1e-3), (a, b)
    assert torch.equal(shared[0][4], shared[1][4])  # an unchanged pair still scores the same on both sides


def test_only_architectures_that_place_tokens_by_position_ids_are_packed(tiny_base_dir):
    """GPT-2's learned absolute positions would put the packed rejected suffix at the wrong positions (the
    layout restarts its positions through `position_ids`): such models run chosen and rejected apart."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sapo_lite.sapo.pair_logps import packable, why_not_packable

    llama = make_model(tiny_base_dir, "sdpa", False)
    assert packable(llama) and why_not_packable(llama) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, attn_implementation="sdpa")).eval()
    assert not packable(gpt2)
    assert why_not_packable(gpt2) == "`gpt2` models are not known to place tokens by position_ids"
    pairs = sapo_pairs()
    default = pair_logps(gpt2, pairs, 0, torch.device("cpu"))  # falls back to the separate layout by itself
    separate = pair_logps(gpt2, pairs, 0, torch.device("cpu"), shared_prefix=False)
    assert all(torch.equal(a, b) for a, b in zip(default, separate))
