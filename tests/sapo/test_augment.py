"""The truncation rule and the splicing of the EMA's segment into the rejected response."""

import numpy as np
import torch

from sapo_lite.data.examples import Example
from sapo_lite.models.generation import left_pad
from sapo_lite.sapo.augment import choose_truncation, self_augment, splice_rejected

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
