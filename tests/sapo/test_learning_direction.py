"""DPO and ORPO move the policy the right way: a few steps on fixed pairs raise the chosen-over-rejected margin on
other, held pairs of the same task. A sign error in either loss lowers it; "the last loss is below the first" could
not tell (ORPO's NLL term alone makes its loss fall)."""

import numpy as np
import pytest
import torch

from sapo_lite.config.schema import LoraSettings, ModelConfig
from sapo_lite.models.roles import attach_adapters, load_base, policy_parameters, reference, training_mode
from sapo_lite.sapo.augment import Pair
from sapo_lite.sapo.losses import LOSSES, PairLogps
from sapo_lite.sapo.pair_logps import pair_logps


def odd_over_even_pairs(tokenizer, count: int, seed: int) -> list[Pair]:
    """A preference a few steps can learn and carry to new pairs: chosen answers are odd digits, rejected ones even
    digits, after prompts and with digits drawn afresh for every pair."""
    rng = np.random.default_rng(seed)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def answer(tokens: list[str]) -> list[int]:
        return tokenizer(" ".join(tokens), add_special_tokens=False)["input_ids"] + [end]

    pairs = []
    for _ in range(count):
        digits = [str(d) for d in rng.integers(0, 10, 5)]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "reverse : " + " ".join(digits)}],
                                               tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        odd, even = rng.choice(list("13579"), 4), rng.choice(list("02468"), 4)
        chosen, rejected = answer(list(odd)), answer(list(even))
        pairs.append(Pair(np.asarray(prompt_ids + chosen, np.int32), np.asarray(prompt_ids + rejected, np.int32),
                          len(prompt_ids), 0, len(chosen)))
    return pairs


def margin(model, pairs, ref_c, ref_r) -> float:
    """Mean implicit reward margin (pi_c - ref_c) - (pi_r - ref_r) on `pairs`."""
    with torch.no_grad():
        chosen, rejected, _, _ = pair_logps(model, pairs, 0, torch.device("cpu"))
    return ((chosen - ref_c) - (rejected - ref_r)).mean().item()


@pytest.mark.parametrize("loss,beta,lr", [("dpo", 0.1, 3e-3), ("orpo", 1.0, 3e-3)])
def test_a_few_steps_raise_the_margin_on_held_pairs(tiny_base_dir, tiny_tokenizer, loss, beta, lr):
    torch.manual_seed(0)
    base = load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu"))
    model = attach_adapters(base, LoraSettings(r=8, alpha=16), None, gradient_checkpointing=False)
    train_pairs, held = odd_over_even_pairs(tiny_tokenizer, 16, seed=1), odd_over_even_pairs(tiny_tokenizer, 16, seed=2)
    with reference(model):
        train_ref = pair_logps(model, train_pairs, 0, torch.device("cpu"))
        held_ref_c, held_ref_r, _, _ = pair_logps(model, held, 0, torch.device("cpu"))
    before = margin(model, held, held_ref_c, held_ref_r)
    optimizer = torch.optim.AdamW(policy_parameters(model), lr=lr)
    spec = LOSSES[loss]
    for _ in range(8):
        training_mode(model)
        optimizer.zero_grad()
        chosen, rejected, n_chosen, n_rejected = pair_logps(model, train_pairs, 0, torch.device("cpu"))
        logps = PairLogps(chosen, rejected, n_chosen, n_rejected, train_ref[0], train_ref[1])
        spec.fn(logps, beta).loss.mean().backward()
        optimizer.step()
    after = margin(model, held, held_ref_c, held_ref_r)
    assert before == pytest.approx(0.0, abs=1e-5)  # B = 0: the policy starts as the reference
    assert after > 0.5, (before, after)  # the held pairs' chosen answers now beat their rejected ones
