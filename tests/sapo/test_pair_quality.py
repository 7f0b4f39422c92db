"""Pairs worth training on: the short-response rewrite rule, identical rewrites, how a rewrite ends."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.data.examples import Example
from sapo_lite.sapo.augment import (
    CUT_OFF,
    STOPPED,
    TAIL_KEPT,
    choose_truncation,
    is_identical,
    pair_ending,
    self_augment,
)
from sapo_lite.sapo.buffer import ReplayBuffer

EOS = 99
SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


class _ScriptedEMA(torch.nn.Module):
    """Stands in for the EMA: each context (the prompt, for short responses) answers with the next
    of its scripted segments, so a test decides which rewrites come out identical."""

    def __init__(self, script: dict[tuple[int, ...], list[list[int]]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script = {context: list(answers) for context, answers in script.items()}
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        self.calls += 1
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            context = tuple(i for i, m in zip(ids, mask) if m)
            segment = self.script[context].pop(0)[:max_new_tokens]
            rows.append(ids + segment + [pad_token_id] * (max_new_tokens - len(segment)))
        return torch.tensor(rows)


def example(prompt: list[int], response: list[int]) -> Example:
    return Example(np.array(prompt, dtype=np.int32), np.array(response, dtype=np.int32), "")


def augment(ema, examples, **options):
    return self_augment(ema, examples, 8, 64, 0, [EOS], np.random.default_rng(0), 4, SAMPLING, **options)


# ---------------------------------------------------------------- the short-response rule


def test_official_rule_rewrites_a_short_response_with_at_most_its_own_length():
    rng = np.random.default_rng(0)
    assert choose_truncation(5, 3, 16, 100, rng) == (0, 5)
    assert choose_truncation(5, 3, 16, 100, rng, short_rewrite="official") == (0, 5)


def test_free_rule_lets_the_ema_write_a_whole_segment_within_max_len():
    rng = np.random.default_rng(0)
    assert choose_truncation(5, 3, 16, 100, rng, short_rewrite="free") == (0, 16)
    assert choose_truncation(5, 90, 16, 100, rng, short_rewrite="free") == (0, 10)  # P + g <= max_len
    assert choose_truncation(5, 96, 16, 100, rng, short_rewrite="free") == (0, 5)  # never less than official


def test_both_rules_agree_on_responses_long_enough_to_keep_a_tail():
    for response_len in (20, 40, 200):
        official = [choose_truncation(response_len, 5, 16, 512, np.random.default_rng(s)) for s in range(20)]
        free = [choose_truncation(response_len, 5, 16, 512, np.random.default_rng(s), "free") for s in range(20)]
        assert official == free


def test_a_short_rewrite_cut_off_under_official_ends_by_itself_under_free():
    chosen = [10, 11, 12, EOS]
    ema_answer = [20, 21, 22, 23, 24, EOS]  # the EMA's own, longer answer
    prompt = [1, 2, 3]
    official = augment(_ScriptedEMA({tuple(prompt): [ema_answer]}), [example(prompt, chosen)])
    free = augment(_ScriptedEMA({tuple(prompt): [ema_answer]}), [example(prompt, chosen)], short_rewrite="free")
    (cut,), (ended,) = official.pairs, free.pairs
    assert cut.rejected_ids.tolist() == [*prompt, 20, 21, 22, 23]  # mid-answer, no stop token
    assert pair_ending(cut.rejected_ids, cut.prompt_len, cut.trunc_point, cut.segment_len, [EOS]) == CUT_OFF
    assert ended.rejected_ids.tolist() == [*prompt, *ema_answer]  # longer than the chosen, ended by the EMA
    assert pair_ending(ended.rejected_ids, ended.prompt_len, ended.trunc_point, ended.segment_len, [EOS]) == STOPPED


# ---------------------------------------------------------------- how a rewrite ends


def test_pair_ending_labels_each_way_a_rejected_response_ends():
    prompt_len, t, g = 2, 1, 3
    tail_kept = np.array([1, 2, 10, 50, 51, 52, 14, 15, EOS])  # segment 50 51 52, then the chosen tail
    stopped = np.array([1, 2, 10, 50, EOS])  # the EMA ended the answer inside its segment
    stopped_at_limit = np.array([1, 2, 10, 50, 51, EOS])  # ... on its last allowed token
    cut_off = np.array([1, 2, 10, 50, 51, 52])  # whole response rewritten, no stop token
    assert pair_ending(tail_kept, prompt_len, t, g, [EOS]) == TAIL_KEPT
    assert pair_ending(stopped, prompt_len, t, g, [EOS]) == STOPPED
    assert pair_ending(stopped_at_limit, prompt_len, t, g, [EOS]) == STOPPED
    assert pair_ending(cut_off, prompt_len, t, g, [EOS]) == CUT_OFF
    assert pair_ending(np.array([1, 2, 10, 50, 7]), prompt_len, t, g, [EOS, 7]) == STOPPED  # any stop token


# ---------------------------------------------------------------- identical rewrites


PROMPTS = [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
CHOSEN = [10, 11, EOS]


def script(first: list[list[int]], second: list[list[int]] | None = None) -> _ScriptedEMA:
    answers = {tuple(prompt): [answer] for prompt, answer in zip(PROMPTS, first)}
    for prompt, answer in zip(PROMPTS, second or []):
        answers[tuple(prompt)].append(answer)
    return _ScriptedEMA(answers)


FIRST = [CHOSEN, [30, EOS], CHOSEN]  # the first and third rewrites copy the chosen response
SECOND = [[40, 41, EOS], [31, EOS], CHOSEN]  # on a second try the first differs, the third copies again


def test_identical_keep_is_the_official_behaviour():
    new = augment(script(FIRST), [example(p, CHOSEN) for p in PROMPTS])
    assert [is_identical(p) for p in new.pairs] == [True, False, True]
    assert (new.identical, new.dropped, new.resampled) == (2, 0, 0)


def test_identical_drop_leaves_them_out_of_the_new_pairs():
    new = augment(script(FIRST), [example(p, CHOSEN) for p in PROMPTS], identical="drop")
    assert [p.chosen_ids[:3].tolist() for p in new.pairs] == [PROMPTS[1]]
    assert (new.identical, new.dropped) == (2, 2)


def test_identical_drop_keeps_a_round_of_only_identical_pairs_when_the_buffer_is_empty():
    examples = [example(p, CHOSEN) for p in PROMPTS]
    everything_copied = [CHOSEN] * 3
    assert len(augment(script(everything_copied), examples, identical="drop", buffer_empty=True).pairs) == 3
    assert augment(script(everything_copied), examples, identical="drop", buffer_empty=False).pairs == []


def test_identical_resample_rewrites_only_those_once_more():
    ema = script(FIRST, SECOND)
    new = augment(ema, [example(p, CHOSEN) for p in PROMPTS], identical="resample")
    assert [p.rejected_ids[3:].tolist() for p in new.pairs] == [[40, 41, EOS], [30, EOS], CHOSEN]
    assert (new.identical, new.dropped, new.resampled) == (2, 0, 2)
    assert ema.calls == 2  # one batch, then one batch of the two identical ones; never a third try


# ---------------------------------------------------------------- in a run


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["drop", "resample"])
def test_a_run_logs_what_happened_to_its_pairs(tmp_path, rule):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--preset", "tiny", "--out", str(out), "data.eval_path=null", "train.max_steps=130",
        "train.save_every=0", "sapo.buffer_size=5000", f"sapo.identical={rule}", "sapo.short_rewrite=free",
    ])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["pairs/identical"] <= 1 and 0 <= r["pairs/cut_off"] <= 1 for r in records)
    assert any(r["pairs/identical"] > 0 for r in records)  # the tiny EMA learns to copy by step ~100
    added = [r["pairs/added"] for r in records]
    buffer = ReplayBuffer(out / "buffer.sqlite", 2000)
    stored = buffer.all_pairs()
    buffer.close()
    assert len(stored) == sum(added)
    if rule == "drop":
        assert min(added) < 32 and not any(is_identical(p) for p in stored if p.step_added > 1)
    else:
        assert added == [32] * len(records)


def test_buffer_show_titles_name_how_the_rewrite_ends():
    from sapo_lite.sapo.buffer import StoredPair
    from sapo_lite.tools.buffer_view import render_pair

    def title(rejected, t, g):
        chosen = np.array([1, 2, 10, 11, 12, EOS], dtype=np.int32)
        pair = StoredPair(chosen, np.array(rejected, dtype=np.int32), 2, t, g, pair_id=7, step_added=3)
        return render_pair(pair, lambda ids: " ".join(str(int(i)) for i in ids), [EOS]).title

    assert title([1, 2, 10, 50, 12, EOS], 1, 1).endswith("tokens 1-2 rewritten: tail kept")
    assert title([1, 2, 10, 50, 51, 52, 53, EOS], 1, 8).endswith("rewritten: ended by the EMA's stop token")
    assert title([1, 2, 50, 51, 52, 53], 0, 4).endswith("tokens 0-4 rewritten: cut at the length limit")
    assert title([1, 2, 10, 11, 12, EOS], 0, 4).endswith("ended by the EMA's stop token, identical to the chosen")
