"""The truncation rule, the splicing of the EMA's segment into the rejected response, and the decoders behind it."""

import numpy as np
import pytest
import torch

from sapo_lite.data.examples import Example
from sapo_lite.errors import TrainingDiverged
from sapo_lite.models.generation import left_pad
from sapo_lite.models.roles import EMA
from sapo_lite.sapo.augment import (
    STOPPED,
    TAIL_KEPT,
    choose_truncation,
    generate_segments,
    pair_ending,
    self_augment,
    splice_rejected,
)

EOS = 99


def test_truncation_point_stays_in_range_and_covers_it():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(2000):
        t, g = choose_truncation(response_len=20, prompt_len=5, segment_len=4, max_len=100, rng=rng)
        assert g == 4
        assert 0 <= t <= 20 - 3 - 4
        seen.add(t)
    assert seen == set(range(0, 14))


def test_truncation_respects_max_len():
    rng = np.random.default_rng(0)
    points = {choose_truncation(50, 40, 4, max_len=50, rng=rng)[0] for _ in range(500)}
    assert max(points) <= 50 - 40 - 4


def test_short_response_is_rewritten_whole():
    rng = np.random.default_rng(0)
    assert choose_truncation(response_len=5, prompt_len=3, segment_len=256, max_len=100, rng=rng) == (0, 5)


def test_splice_without_stop_token_keeps_the_tail():
    prompt = np.array([1, 2], dtype=np.int32)
    response = np.array([10, 11, 12, 13, 14, 15, EOS], dtype=np.int32)
    rejected = splice_rejected(prompt, response, t=2, g=2, segment=[50, 51, 52], stop_ids=[EOS])
    assert rejected.tolist() == [1, 2, 10, 11, 50, 51, 14, 15, EOS]


def test_splice_with_stop_token_ends_the_response():
    prompt = np.array([1, 2], dtype=np.int32)
    response = np.array([10, 11, 12, 13, 14, 15, EOS], dtype=np.int32)
    rejected = splice_rejected(prompt, response, t=1, g=3, segment=[50, EOS, 0], stop_ids=[EOS])
    assert rejected.tolist() == [1, 2, 10, 50, EOS]


def test_left_pad_aligns_sequences_to_the_right():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


class _EchoGenerator(torch.nn.Module):
    """Stands in for the EMA: its segment repeats the context's last token + 100, so a segment
    that lands on the wrong pair shows."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[list[int]] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        self.batches.append(attention_mask.sum(1).tolist())
        new = (input_ids[:, -1:] + 100).repeat(1, max_new_tokens)
        return torch.cat([input_ids, new], dim=1)


def test_generation_batches_sorted_by_context_length_keep_each_pairs_draw():
    lengths = np.random.default_rng(1).integers(4, 30, 7)
    examples = [Example(np.arange(3, dtype=np.int32), np.arange(10, 10 + n, dtype=np.int32), "") for n in lengths]
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    results = []
    for batch_size in (1, 3, 8):
        model = _EchoGenerator()
        pairs = self_augment(model, examples, 4, 64, 0, [EOS], np.random.default_rng(5), batch_size, sampling).pairs
        results.append([(p.trunc_point, p.rejected_ids.tolist()) for p in pairs])
        for pair in pairs:  # each rejected carries the segment generated from its own context
            context_end = pair.prompt_len + pair.trunc_point
            assert pair.rejected_ids[context_end] == pair.chosen_ids[context_end - 1] + 100
        flat = [n for batch in model.batches for n in batch]
        assert flat == sorted(flat)  # shortest contexts first: little left padding in a batch
    assert results[0] == results[1] == results[2]


@pytest.fixture(scope="module")
def ema_model(tiny_base_dir):
    from helpers import with_random_adapters

    from sapo_lite.config.schema import ModelConfig
    from sapo_lite.models.roles import load_base

    return with_random_adapters(load_base(ModelConfig(quant="none"), str(tiny_base_dir), torch.device("cpu")))


def random_examples(count: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(5, 49, rng.integers(3, 9)).astype(np.int32),
                    rng.integers(5, 49, rng.integers(6, 20)).astype(np.int32), "") for _ in range(count)]


def test_lean_and_hf_decoders_make_the_same_pairs_when_sampling_is_deterministic(ema_model):
    """top_k=1 leaves one candidate a step: both decoders must then write the same segments, so the same
    cut points, stops and splices, pair for pair (the lean batches of 3 mix lengths and stop early)."""
    from sapo_lite.models.decode_plan import why_not_lean

    assert why_not_lean(ema_model) is None  # the lean loop really runs
    examples = random_examples(7, seed=3)
    greedy = {"temperature": 0.7, "top_k": 1, "top_p": 0.95}
    free = self_augment(ema_model, examples, 6, 64, 0, [999], np.random.default_rng(1), 3, greedy).pairs
    segments = [p.rejected_ids[p.prompt_len + p.trunc_point :] for p in free]
    stops = sorted({int(segments[0][1]), int(segments[4][0])})  # tokens the EMA writes: some rows stop early
    made = {}
    for decoder in ("lean", "hf"):
        pairs = self_augment(ema_model, examples, 6, 64, 0, stops, np.random.default_rng(1), 3, greedy,
                             decoder=decoder).pairs
        made[decoder] = [(p.trunc_point, p.rejected_ids.tolist()) for p in pairs]
    assert made["lean"] == made["hf"]
    endings = {pair_ending(p.rejected_ids, p.prompt_len, p.trunc_point, p.segment_len, stops) for p in pairs}
    assert STOPPED in endings and TAIL_KEPT in endings


def test_a_diverged_ema_is_reported_by_the_lean_decoder_too(ema_model):
    with torch.no_grad():
        weight = ema_model.get_base_model().model.layers[0].self_attn.q_proj.lora_B[EMA].weight
        saved = weight.clone()
        weight.fill_(float("nan"))
    try:
        with pytest.raises(TrainingDiverged, match="diverged"):
            generate_segments(ema_model, [[5, 6, 7]], 4, 0, [999], 0.7, 50, 0.95, decoder="lean")
    finally:
        with torch.no_grad():
            weight.copy_(saved)
