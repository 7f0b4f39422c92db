"""Every family of models/families/ decodes through the lean loop exactly as transformers computes it.

Each family's tiny model (models/tiny_families.py: its quirks on, biases and norm weights perturbed) with
random policy and EMA adapters: the lean loop's logits at every step equal the model's own forward over
the same tokens, and its greedy tokens, with rows stopping early, are `generate`'s. Where a family has
sliding-window layers (Gemma 3, Mistral, Phi-3), the window is set below the sequence so it masks something."""

import pytest
import torch
from helpers import hf_tokens, random_contexts, with_random_adapters

from sapo_lite.models.decode_plan import build_plan, why_not_lean
from sapo_lite.models.decoding import lean_generate
from sapo_lite.models.generation import left_pad
from sapo_lite.models.sampling import greedy
from sapo_lite.models.tiny_families import build_family_model, family_names

NEVER = [999]
WINDOWED = {"gemma3": {"sliding_window": 6}, "mistral-nemo": {"sliding_window": 6}, "phi4-mini": {"sliding_window": 6}}


@pytest.fixture(scope="module", params=family_names())
def family_model(request):
    family = request.param
    base, tokenizer = build_family_model(family, **WINDOWED.get(family, {}))
    return family, with_random_adapters(base, seed=3, std=0.1), len(tokenizer)


def test_each_family_is_decoded_by_the_lean_loop(family_model):
    family, model, _ = family_model
    assert why_not_lean(model) is None, family


def test_step_logits_equal_the_models_forward_over_the_same_tokens(family_model):
    family, model, vocab = family_model
    contexts = random_contexts(4, [3, 11, 8], low=5, high=vocab)
    seen = []

    def pick(logits):
        seen.append(logits.clone())
        return greedy(logits)

    tokens = lean_generate(build_plan(model), contexts, 6, 0, NEVER, pick)
    ids, mask = left_pad([c + row[:-1] for c, row in zip(contexts, tokens)], 0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.float()
    steps = len(seen)
    ours = torch.stack(seen, 1)  # [B, steps, V]
    torch.testing.assert_close(ours, expected[:, -steps:], atol=2e-4, rtol=1e-4)


def test_greedy_tokens_equal_generate_with_rows_stopping_early(family_model):
    family, model, vocab = family_model
    contexts = random_contexts(5, [4, 9, 13], low=5, high=vocab)
    free = hf_tokens(model, contexts, 10, NEVER)
    assert lean_generate(build_plan(model), contexts, 10, 0, NEVER, greedy) == free
    stops = sorted({free[0][2], free[-1][1]})
    assert lean_generate(build_plan(model), contexts, 10, 0, stops, greedy) == hf_tokens(model, contexts, 10, stops)


def test_gemma3s_published_multimodal_class_is_decoded_lean_on_text():
    """Gemma-3-4B/12B/27B-it load as Gemma3ForConditionalGeneration (a vision tower beside the text model):
    with text in, the lean loop decodes its language model, as `generate` does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sapo_lite.models.tiny_families import build_family_tokenizer, family_config

    tokenizer = build_family_tokenizer("gemma3")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    config = AutoConfig.for_model("gemma3", text_config=family_config("gemma3", tokenizer, sliding_window=6).to_dict(),
                                  vision_config=vision, mm_tokens_per_image=4, image_token_index=len(tokenizer) - 1)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    assert type(base).__name__ == "Gemma3ForConditionalGeneration"
    model = with_random_adapters(base, seed=4, std=0.1)
    assert why_not_lean(model) is None
    contexts = random_contexts(6, [4, 9, 13], low=5, high=len(tokenizer) - 2)
    assert lean_generate(build_plan(model), contexts, 10, 0, NEVER, greedy) == hf_tokens(model, contexts, 10, NEVER)


def test_sampled_first_tokens_follow_generates_distribution(family_model):
    """3,000 rewrites' first tokens through the lean sampler (temperature 0.7, top-k 50, top-p 0.95, as the
    loop samples), against the distribution transformers' warpers make of the model's own logits."""
    stats = pytest.importorskip("scipy.stats")
    import numpy as np
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from sapo_lite.sapo.augment import generate_segments

    family, model, vocab = family_model
    context = random_contexts(9, [7], low=5, high=vocab)[0]
    torch.manual_seed(0)
    rows = generate_segments(model, [context] * 3000, 1, 0, NEVER, 0.7, 50, 0.95)
    counts = np.bincount([row[0] for row in rows], minlength=vocab)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[:, -1].float()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.95)])
    probs = warpers(None, logits).softmax(-1)[0].double().numpy()
    support = probs > 0
    assert counts[~support].sum() == 0 and support.sum() >= 2
    assert stats.chisquare(counts[support], probs[support] / probs[support].sum() * 3000).pvalue > 1e-3
