"""Adapter roles on one base: policy trains, EMA follows, reference is the untouched base."""

import pytest
import torch

from sapo_lite.config.schema import LoraSettings, ModelConfig
from sapo_lite.models.roles import (
    EMA,
    POLICY,
    acting_as,
    adapter_tensors,
    attach_adapters,
    ema_update,
    load_base,
    policy_parameters,
    reference,
)


@pytest.fixture
def model(tiny_base_dir):
    base = load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu"))
    return attach_adapters(base, LoraSettings(r=4, alpha=8, dropout=0.0), None, gradient_checkpointing=False)


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def nudge_policy(model):
    """One real optimizer step on the policy (LoRA B starts at zero, so the policy = base before it)."""
    ids = torch.randint(5, 40, (2, 12))
    optimizer = torch.optim.SGD(policy_parameters(model), lr=1.0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return ids


def test_only_policy_tensors_get_gradients_and_change(model):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(5, 40, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(f".{POLICY}." in n for n in with_grad)
    torch.optim.SGD(policy_parameters(model), lr=1.0).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= with_grad  # nothing outside the policy adapter moved


def test_reference_logits_equal_base_logits(model, tiny_base_dir):
    ids = nudge_policy(model)
    plain = load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu")).eval()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        policy_logits = model(input_ids=ids).logits
    with reference(model):
        ref_logits = model(input_ids=ids).logits
    assert torch.allclose(ref_logits, expected, atol=1e-6)
    assert not torch.allclose(policy_logits, expected, atol=1e-3)  # the policy really moved
    assert model.active_adapter == POLICY


def test_base_weights_never_change(model):
    before = base_weights(model)
    nudge_policy(model)
    after = base_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("decay", [0.1, 0.9])
def test_ema_starts_equal_and_moves_toward_the_policy_by_one_minus_decay(model, decay):
    """ema <- decay * ema + (1 - decay) * policy, by hand; 0.1 and 0.9, since at 0.5 the two weights
    (or the two tensors) swapped would pass unnoticed."""
    policy, ema = adapter_tensors(model, POLICY), adapter_tensors(model, EMA)
    assert all(torch.equal(policy[n], ema[n]) for n in policy)
    ema_update(model, decay=0.0)  # still a copy
    first = {n: t.detach().clone() for n, t in ema.items()}
    nudge_policy(model)
    ema_update(model, decay=decay)
    moved = [n for n in policy if not torch.equal(first[n], policy[n])]
    assert moved  # the policy's B matrices left their zeros
    for name in policy:
        expected = decay * first[name] + (1 - decay) * policy[name]
        assert torch.allclose(ema[name], expected, atol=1e-7), name
    second_policy = {n: t.detach().clone() for n, t in policy.items()}
    after_one = {n: t.detach().clone() for n, t in ema.items()}
    nudge_policy(model)
    ema_update(model, decay=decay)  # a second update averages from the EMA, not from the old policy
    for name in moved:
        expected = decay * after_one[name] + (1 - decay) * policy[name]
        assert torch.allclose(ema[name], expected, atol=1e-7), name
        assert not torch.allclose(ema[name], decay * second_policy[name] + (1 - decay) * policy[name], atol=1e-9)


def test_acting_as_ema_uses_the_ema_and_restores_the_policy(model):
    ids = nudge_policy(model)
    with torch.no_grad():
        policy_logits = model(input_ids=ids).logits
    with acting_as(model, EMA):
        assert model.active_adapter == EMA and not model.training
        with torch.no_grad():
            ema_logits = model(input_ids=ids).logits
        assert not any(p.requires_grad for p in policy_parameters(model))
    assert not torch.allclose(policy_logits, ema_logits, atol=1e-4)
    assert model.active_adapter == POLICY and model.training
    assert all(p.requires_grad for p in policy_parameters(model))


def test_init_adapter_starts_policy_and_ema_from_it_and_becomes_the_reference(model, tiny_base_dir, tmp_path):
    ids = nudge_policy(model)
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path), selected_adapters=[POLICY])

    base = load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu"))
    resumed = attach_adapters(base, LoraSettings(), str(tmp_path / POLICY), gradient_checkpointing=False)
    assert set(resumed.peft_config) == {POLICY, EMA, "ref"}
    resumed.eval()
    with torch.no_grad():
        assert torch.allclose(resumed(input_ids=ids).logits, trained_logits, atol=1e-6)
    with reference(resumed):
        assert torch.allclose(resumed(input_ids=ids).logits, trained_logits, atol=1e-6)
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY}." in n for n in trainable)


def test_static_cache_generation_samples_the_same_segments(model):
    from sapo_lite.sapo.augment import generate_segments

    contexts = [[3, 5, 8, 9, 10], [3, 6, 7]]
    segments = []
    for static in (False, True):
        torch.manual_seed(7)
        with acting_as(model, EMA):
            segments.append(generate_segments(model, contexts, 6, 0, [4], 0.7, 50, 0.95, static_cache=static,
                                              decoder="hf"))
    assert segments[0] == segments[1]
    assert all(len(s) == 6 for s in segments[0])


def test_reference_refresh_copies_the_ema_into_a_frozen_ref_adapter(model):
    from sapo_lite.models.roles import REF, refresh_reference

    ids = nudge_policy(model)
    ema_update(model, decay=0.5)  # the EMA now differs from both the base and the policy
    with acting_as(model, EMA), torch.no_grad():
        ema_logits = model(input_ids=ids).logits
    refresh_reference(model)
    assert REF in model.peft_config
    with reference(model):
        ref_logits = model(input_ids=ids).logits
    assert torch.allclose(ref_logits, ema_logits, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY}." in n for n in trainable)
    assert model.active_adapter == POLICY
