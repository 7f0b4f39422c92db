"""The truncation rule and the splicing of the EMA's segment into the rejected response."""

import numpy as np

from sapo_lite.augment import choose_truncation, left_pad, splice_rejected

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
