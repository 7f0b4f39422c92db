"""Where rejected responses come from (`sapo.pairs`): the data's pairs, the mix, SPIN's previous iterate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sapo_lite.config.sources import load_config
from sapo_lite.data.examples import Example
from sapo_lite.sapo.augment import EMA_REWRITE, FROM_DATA, SPIN_ANSWER
from sapo_lite.sapo.sources import SourceContext, pair_source
from sapo_lite.sapo.sources.mixed import choose_from_data

STOP = 2


def example(prompt: list[int], chosen: list[int], rejected: list[int] | None = None) -> Example:
    return Example(np.asarray(prompt, np.int32), np.asarray(chosen, np.int32), "",
                   rejected_ids=None if rejected is None else np.asarray(rejected, np.int32))


def context(model, cfg, seed: int = 0) -> SourceContext:
    return SourceContext(model, cfg, 0, [STOP], np.random.default_rng(seed))


class CountingModel(torch.nn.Module):
    """A stand-in model that counts every call a generator would make (forward, generate) and answers none."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("the model was run")

    def generate(self, *args, **kwargs):
        return self.forward()


def test_data_pairs_generate_nothing_and_keep_the_datas_rejected_answer():
    cfg = load_config("tiny", overrides=["sapo.pairs=data"])
    model = CountingModel()
    made = pair_source(cfg).make(context(model, cfg), [example([1, 5], [7, 8, STOP], [9, STOP])])
    assert model.calls == 0
    (pair,) = made.pairs
    assert pair.origin == FROM_DATA and pair.prompt_len == 2
    assert pair.chosen_ids.tolist() == [1, 5, 7, 8, STOP] and pair.rejected_ids.tolist() == [1, 5, 9, STOP]


@pytest.mark.parametrize("share", [0.3, 0.6])
def test_mix_takes_the_configured_share_from_the_data_and_the_same_ones_for_the_same_seed(share):
    draws = [choose_from_data(4, share, np.random.default_rng([7, i])) for i in range(2000)]
    assert np.mean([len(d) for d in draws]) / 4 == pytest.approx(share, abs=0.02)
    again = [choose_from_data(4, share, np.random.default_rng([7, i])) for i in range(2000)]
    assert draws == again
    assert {len(d) for d in draws} == {int(share * 4), int(share * 4) + 1}  # rounded at random, never further


def test_mix_puts_both_origins_in_one_step_each_pair_from_its_own_source(tiny_base_dir):
    from helpers import with_random_adapters

    from sapo_lite.models.roles import load_base

    cfg = load_config("tiny", overrides=["sapo.pairs=mix", "sapo.mix_share=0.5", "sapo.segment_len=2"])
    model = with_random_adapters(load_base(cfg.model, str(tiny_base_dir), torch.device("cpu")))
    examples = [example([1, 10 + i], [20 + i, 21, 22, 23, 24, STOP], [30 + i, STOP]) for i in range(8)]
    made = pair_source(cfg).make(context(model, cfg), examples)
    origins = [p.origin for p in made.pairs]
    assert origins.count(FROM_DATA) == 4 and origins.count(EMA_REWRITE) == 4
    assert made.figures["pairs/from_data"] == 0.5
    for pair in made.pairs:
        source = examples[int(pair.chosen_ids[1]) - 10]
        if pair.origin == FROM_DATA:  # the data's answer, whole
            assert pair.rejected_ids[2:].tolist() == source.rejected_ids.tolist()
        else:  # the EMA's rewrite of a segment: the chosen answer up to the cut point
            t = pair.trunc_point
            assert pair.rejected_ids[: 2 + t].tolist() == pair.chosen_ids[: 2 + t].tolist()


def test_spin_answers_whole_from_the_prompt_with_the_previous_iterate_until_the_next_iteration(tiny_base_dir):
    """The rejected answer is written from the prompt alone by the `ref` adapter, the policy as it stood when the
    iteration began: a policy that moves within the iteration changes nothing, the next iteration takes it up."""
    from helpers import with_random_adapters

    from sapo_lite.models.roles import POLICY, REF, acting_as, adapter_tensors, load_base
    from sapo_lite.sapo.augment import generate_segments

    cfg = load_config("tiny", overrides=["sapo.pairs=spin", "loss.name=dpo", "sapo.spin_iteration_steps=3",
                                         "sapo.spin_max_new_tokens=6"])
    model = with_random_adapters(load_base(cfg.model, str(tiny_base_dir), torch.device("cpu")))
    source = pair_source(cfg)
    examples = [example([1, 10, 11], [20, 21, 22, STOP]), example([1, 12], [23, STOP])]

    class Buffer:  # the loop passes its ReplayBuffer: only this method is used
        cleared = 0

        def invalidate_reference(self):
            Buffer.cleared += 1

    def spin_answers(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        made = source.make(context(model, cfg), examples)
        assert all(p.origin == SPIN_ANSWER and p.trunc_point == 0 for p in made.pairs)
        return [p.rejected_ids[p.prompt_len :].tolist() for p in made.pairs]

    def by_ref(seed: int) -> list[list[int]]:  # what the `ref` adapter writes after each prompt, same seed
        torch.manual_seed(seed)
        with acting_as(model, REF):
            rows = generate_segments(model, [[1, 12], [1, 10, 11]], 6, 0, [STOP], 0.7, 50, 0.95)  # shortest first
        return [row[: row.index(STOP) + 1] if STOP in row else row for row in (rows[1], rows[0])]

    source.at_step_start(model, Buffer(), step=1)  # iteration 1 begins: the policy becomes generator and reference
    assert Buffer.cleared == 1
    first = spin_answers(seed=3)
    assert first == by_ref(seed=3) and all(answer for answer in first)
    with torch.no_grad():  # the policy trains on within the iteration
        for tensor in adapter_tensors(model, POLICY).values():
            tensor.add_(0.5)
    source.at_step_start(model, Buffer(), step=3)
    assert Buffer.cleared == 1 and spin_answers(seed=3) == first  # same iterate: same answers
    source.at_step_start(model, Buffer(), step=4)  # iteration 2: the moved policy is the new iterate
    assert Buffer.cleared == 2
    policy, ref = adapter_tensors(model, POLICY), adapter_tensors(model, REF)
    assert all(torch.equal(policy[name], ref[name]) for name in policy)
    assert spin_answers(seed=3) == by_ref(seed=3) != first


def test_one_dpo_step_on_the_datas_pair_has_trls_dpo_trainer_loss(tiny_base_dir, tiny_tokenizer, tmp_path):
    """The same pair, the same policy (random LoRA) and reference (adapters off): sapo-lite's loss on the pair
    `sapo.pairs=data` makes, with the reference log-probs the buffer caches, equals TRL DPOTrainer's."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from sapo_lite.models.roles import load_base
    from sapo_lite.sapo.losses import LOSSES, PairLogps
    from sapo_lite.sapo.pair_logps import pair_logps

    cfg = load_config("tiny", overrides=["sapo.pairs=data", "loss.name=dpo", "loss.beta=0.1"])
    row = {"prompt": "reverse : 1 2 3 4", "chosen": " 4 3 2 1", "rejected": " 1 2 3 4 4"}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=1, max_length=64, bf16=False,
                     use_cpu=True, gradient_checkpointing=False, report_to=[], beta=cfg.loss.beta,
                     logging_steps=10_000, save_strategy="no", dataloader_num_workers=0)
    trainer = DPOTrainer(model=load_base(cfg.model, str(tiny_base_dir), torch.device("cpu")), args=args,
                         train_dataset=Dataset.from_list([row]), processing_class=tiny_tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    model = trainer.model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy away from the reference, so the loss is not log 2 on both sides
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.6)
    inputs = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, inputs).item()

    ids, completion = inputs["input_ids"], inputs["completion_mask"].bool()
    keep = inputs["attention_mask"].bool()
    chosen, rejected = ids[0][keep[0]], ids[1][keep[1]]
    prompt_len = int((~completion[0][keep[0]]).sum())
    assert torch.equal(chosen[:prompt_len], rejected[:prompt_len])
    data_example = example(chosen[:prompt_len].tolist(), chosen[prompt_len:].tolist(), rejected[prompt_len:].tolist())
    (pair,) = pair_source(cfg).make(context(None, cfg), [data_example]).pairs
    with torch.no_grad():
        with model.disable_adapter():  # the reference log-probs, as the buffer caches them
            ref_c, ref_r, _, _ = pair_logps(model, [pair], tiny_tokenizer.pad_token_id, torch.device("cpu"))
        policy_c, policy_r, n_c, n_r = pair_logps(model, [pair], tiny_tokenizer.pad_token_id, torch.device("cpu"))
    ours = LOSSES["dpo"].fn(PairLogps(policy_c, policy_r, n_c, n_r, ref_c, ref_r), cfg.loss.beta).loss.item()
    assert abs(ours - np.log(2)) > 1e-2  # the check is not at DPO's symmetric point
    assert ours == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
