"""Chunked, response-only log-probs equal the plain log_softmax(logits) path, values and gradients."""

import pytest
import torch

from sapo_lite.config.schema import LoraSettings, ModelConfig
from sapo_lite.models.roles import attach_adapters, load_base, policy_parameters
from sapo_lite.sapo.logps import response_token_logps
from sapo_lite.sapo.losses import response_logps
from sapo_lite.sapo.pair_logps import right_pad


@pytest.fixture
def model(tiny_base_dir):
    base = load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu"))
    model = attach_adapters(base, LoraSettings(r=4, alpha=8, dropout=0.0), None, gradient_checkpointing=True)
    for name, param in model.named_parameters():
        if "lora_B.policy" in name:
            torch.nn.init.normal_(param, std=0.05)  # non-zero B so every LoRA tensor gets a gradient
    return model


def batch():
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(5, 40, (n,), generator=generator).numpy() for n in (17, 9, 23, 12)]
    return right_pad(sequences, prompt_lens=[5, 3, 10, 11], pad_id=0)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_same_logps_and_gradients_as_full_logits(model, chunk_tokens):
    ids, attention, response = batch()
    grads = []
    results = []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        if chunked:
            sums, counts = response_token_logps(model, ids, attention, response, chunk_tokens)
        else:
            logits = model(input_ids=ids, attention_mask=attention).logits
            sums, counts = response_logps(logits, ids, response)
        (sums * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        results.append((sums.detach(), counts))
        grads.append([p.grad.clone() for p in policy_parameters(model)])
    (plain_sums, plain_counts), (chunked_sums, chunked_counts) = results
    assert torch.equal(plain_counts, chunked_counts) and plain_counts.tolist() == [12, 6, 13, 1]
    assert torch.allclose(plain_sums, chunked_sums, atol=1e-5)
    for plain, chunked in zip(*grads):
        assert torch.allclose(plain, chunked, atol=1e-6, rtol=1e-4)


def test_works_without_gradients_for_reference_log_probs(model):
    ids, attention, response = batch()
    with torch.no_grad():
        sums, _ = response_token_logps(model, ids, attention, response, chunk_tokens=5)
        plain, _ = response_logps(model(input_ids=ids, attention_mask=attention).logits, ids, response)
    assert torch.allclose(sums, plain, atol=1e-5)


def test_a_262k_vocabulary_goes_through_the_head_a_chunk_at_a_time():
    """Gemma 3's vocabulary on its tiny model: 2 x 40 scored tokens would be 84 MB of fp32 logits at once;
    the head never sees more than `chunk_tokens` rows, in the forward or in backward's recompute."""
    from sapo_lite.models.tiny_families import build_family_model

    base, _ = build_family_model("gemma3", vocab_size=262_144)
    model = attach_adapters(base, LoraSettings(r=4, alpha=8, dropout=0.0), None, gradient_checkpointing=False)
    rows_seen = []
    model.get_base_model().lm_head.register_forward_hook(lambda m, i, out: rows_seen.append(out.shape))
    generator = torch.Generator().manual_seed(0)
    ids, attention, response = right_pad([torch.randint(5, 300, (48,), generator=generator).numpy()] * 2,
                                         prompt_lens=[8, 8], pad_id=0)
    sums, counts = response_token_logps(model, ids, attention, response, chunk_tokens=16)
    sums.sum().backward()
    assert counts.tolist() == [40, 40] and torch.isfinite(sums).all()
    assert len(rows_seen) == 2 * 5 and {shape[0] for shape in rows_seen} == {16}  # 80 rows: 5 chunks, twice
    assert all(shape[-1] == 262_144 for shape in rows_seen)
