"""The SQLite replay buffer: FIFO, weighted sampling, persistence."""

import sqlite3

import numpy as np
import pytest

from sapo_lite.errors import RunDirError
from sapo_lite.sapo.augment import Pair
from sapo_lite.sapo.buffer import SCHEMA_VERSION, ReplayBuffer


def make_pair(tag: int) -> Pair:
    return Pair(np.array([1, tag, 2], np.int32), np.array([1, tag, 3, 4], np.int32), 1, 0, 2)


def test_fifo_evicts_the_oldest(tmp_path):
    buffer = ReplayBuffer(tmp_path / "b.sqlite", capacity=3)
    for step in range(5):
        buffer.add([make_pair(step)], step=step)
    kept = [int(p.chosen_ids[1]) for p in buffer.all_pairs()]
    assert kept == [2, 3, 4]
    assert len(buffer) == 3


def test_sampling_counts_draws_and_favours_fresh_pairs(tmp_path):
    buffer = ReplayBuffer(tmp_path / "b.sqlite", capacity=10)
    buffer.add([make_pair(0)], step=0, ref_logps=[(-1.0, -2.0)])
    rng = np.random.default_rng(0)
    for _ in range(9):  # pair 0 drawn 9 times: its weight falls to 1/10
        buffer.sample(1, rng)
    buffer.add([make_pair(1)], step=1, ref_logps=[(-3.0, -4.0)])
    drawn = [int(p.chosen_ids[1]) for p in buffer.sample(4000, rng)]
    share_fresh = drawn.count(1) / len(drawn)
    assert share_fresh == pytest.approx(1.0 / (1.0 + 0.1), abs=0.03)
    old = buffer.all_pairs()[0]
    assert old.times_drawn == 9 + drawn.count(0)


def test_contents_survive_closing_and_reopening(tmp_path):
    path = tmp_path / "b.sqlite"
    buffer = ReplayBuffer(path, capacity=10)
    buffer.add([make_pair(7), make_pair(8)], step=3, ref_logps=[(-1.5, -2.5), (-0.5, -0.25)])
    buffer.close()
    reopened = ReplayBuffer(path, capacity=10)
    pairs = reopened.all_pairs()
    assert [p.rejected_ids.tolist() for p in pairs] == [[1, 7, 3, 4], [1, 8, 3, 4]]
    assert [(p.ref_logp_chosen, p.ref_logp_rejected) for p in pairs] == [(-1.5, -2.5), (-0.5, -0.25)]
    assert pairs[0].step_added == 3 and pairs[0].prompt_len == 1 and pairs[0].segment_len == 2
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_corrupted_file_is_a_clear_error(tmp_path):
    path = tmp_path / "b.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RunDirError, match="corrupted"):
        ReplayBuffer(path, capacity=10)


def test_snapshot_and_restore_bring_back_pairs_and_draw_counts(tmp_path):
    path = tmp_path / "b.sqlite"
    buffer = ReplayBuffer(path, capacity=2)
    buffer.add([make_pair(1), make_pair(2)], step=1)
    buffer.sample(3, np.random.default_rng(0))
    before = [(p.pair_id, p.times_drawn, p.chosen_ids.tolist()) for p in buffer.all_pairs()]
    buffer.snapshot(tmp_path / "snap.sqlite")
    buffer.add([make_pair(3), make_pair(4)], step=2)  # evicts both snapshotted pairs
    buffer.sample(5, np.random.default_rng(1))
    buffer.close()
    ReplayBuffer.restore(tmp_path / "snap.sqlite", path)
    restored = ReplayBuffer(path, capacity=2)
    assert [(p.pair_id, p.times_drawn, p.chosen_ids.tolist()) for p in restored.all_pairs()] == before
    restored.add([make_pair(5)], step=3)
    assert restored.all_pairs()[-1].pair_id == 3  # ids continue as if pairs 3 and 4 never existed


def test_invalidated_reference_log_probs_are_refilled(tmp_path):
    buffer = ReplayBuffer(tmp_path / "b.sqlite", capacity=10)
    buffer.add([make_pair(1), make_pair(2)], step=1, ref_logps=[(-1.0, -2.0), (-3.0, -4.0)])
    buffer.invalidate_reference()
    assert all(p.ref_logp_chosen is None and p.ref_logp_rejected is None for p in buffer.all_pairs())
    first = buffer.all_pairs()[0]
    buffer.set_reference([first], [(-5.0, -6.0)])
    refs = [(p.ref_logp_chosen, p.ref_logp_rejected) for p in buffer.all_pairs()]
    assert refs == [(-5.0, -6.0), (None, None)]


# A buffer as sapo-lite wrote it before endings were recorded (layout version 1).
V1_SCHEMA = """
CREATE TABLE pairs (id INTEGER PRIMARY KEY AUTOINCREMENT, prompt_len INTEGER NOT NULL, trunc_point INTEGER NOT NULL,
    segment_len INTEGER NOT NULL, ref_logp_chosen REAL, ref_logp_rejected REAL,
    times_drawn INTEGER NOT NULL DEFAULT 0, step_added INTEGER NOT NULL);
CREATE TABLE pair_tokens (id INTEGER PRIMARY KEY, chosen_ids BLOB NOT NULL, rejected_ids BLOB NOT NULL);
INSERT INTO pairs (prompt_len, trunc_point, segment_len, step_added) VALUES (1, 0, 2, 1), (1, 0, 2, 1);
INSERT INTO pair_tokens VALUES (1, x'', x''), (2, x'', x'');
PRAGMA user_version = 1;
"""
STOP = 9
CUT = Pair(np.array([1, 5, 6, STOP], np.int32), np.array([1, 7, 8], np.int32), 1, 0, 2)  # no stop within 2 tokens
STOPPED = Pair(np.array([1, 5, 6, STOP], np.int32), np.array([1, 7, STOP], np.int32), 1, 0, 2)
TAIL = Pair(np.array([1, 5, 6, 4, 3, STOP], np.int32), np.array([1, 7, 8, 4, 3, STOP], np.int32), 1, 0, 2)


def test_each_pair_records_how_its_rewrite_ends_and_the_cut_off_share_is_of_the_whole_buffer(tmp_path):
    buffer = ReplayBuffer(tmp_path / "b.sqlite", capacity=4, stop_ids=[STOP])
    buffer.add([CUT, CUT, STOPPED], step=1)
    assert buffer.cut_off_share() == pytest.approx(2 / 3)
    buffer.add([TAIL, STOPPED], step=2)  # evicts the first CUT: 1 of the 4 buffered pairs is cut off
    assert buffer.cut_off_share() == pytest.approx(1 / 4)
    assert [p.ending for p in buffer.all_pairs()] == ["cut at the length limit", "ended by the EMA's stop token",
                                                      "tail kept", "ended by the EMA's stop token"]


def test_an_older_buffer_is_migrated_in_place_and_its_unknown_endings_left_out(tmp_path):
    path = tmp_path / "b.sqlite"
    old = sqlite3.connect(path)
    old.executescript(V1_SCHEMA)
    old.close()
    buffer = ReplayBuffer(path, capacity=10, stop_ids=[STOP])  # as a resumed run opens it
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [p.ending for p in buffer.all_pairs()] == [None, None] and np.isnan(buffer.cut_off_share())
    buffer.add([CUT, STOPPED], step=2)
    assert buffer.cut_off_share() == 0.5  # the two old pairs count for neither side


# A buffer as sapo-lite wrote it before origins were recorded (layout version 2): an EMA rewrite and an SFT pair.
V2_SCHEMA = """
CREATE TABLE pairs (id INTEGER PRIMARY KEY AUTOINCREMENT, prompt_len INTEGER NOT NULL, trunc_point INTEGER NOT NULL,
    segment_len INTEGER NOT NULL, ref_logp_chosen REAL, ref_logp_rejected REAL,
    times_drawn INTEGER NOT NULL DEFAULT 0, step_added INTEGER NOT NULL, ending TEXT);
CREATE TABLE pair_tokens (id INTEGER PRIMARY KEY, chosen_ids BLOB NOT NULL, rejected_ids BLOB NOT NULL);
INSERT INTO pairs (prompt_len, trunc_point, segment_len, step_added, ending) VALUES (1, 0, 2, 1, 'cut_off'),
    (1, 0, 0, 1, NULL);
INSERT INTO pair_tokens VALUES (1, x'', x''), (2, x'', x'');
PRAGMA user_version = 2;
"""


def test_a_buffer_without_origins_migrates_with_the_origin_its_pairs_had_and_keeps_new_ones(tmp_path):
    """Before `origin`, a pair with a segment was the EMA's rewrite and one without an SFT pair: the migration
    says so, read-only readers see the same without writing, and pairs added after it keep their own origin."""
    from sapo_lite.tools.buffer_view import buffer_stats, open_buffer_readonly

    path = tmp_path / "buffer.sqlite"
    old = sqlite3.connect(path)
    old.executescript(V2_SCHEMA)
    old.close()
    reader = open_buffer_readonly(tmp_path)
    assert buffer_stats(reader, 10).origins == {"ema": 1, "sft": 1}
    reader.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2  # a reader never migrates
    buffer = ReplayBuffer(path, capacity=10, stop_ids=[STOP])  # as a resumed run opens it
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    data_pair = Pair(np.array([1, 5, STOP], np.int32), np.array([1, 7, STOP], np.int32), 1, 0, 0, "data")
    buffer.add([data_pair], step=2)
    assert [p.origin for p in buffer.all_pairs()] == ["ema", "sft", "data"]
    assert [p.ending for p in buffer.all_pairs()] == ["cut at the length limit", None, None]
    assert buffer.origin_counts() == {"data": 1, "ema": 1, "sft": 1}
