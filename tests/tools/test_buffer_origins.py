"""`sapo-lite buffer` on a buffer of mixed origins: the counts by origin, and whole answers for real pairs."""

from __future__ import annotations

import numpy as np
from rich.console import Console

from sapo_lite.sapo.augment import Pair
from sapo_lite.sapo.buffer import ReplayBuffer
from sapo_lite.tools.buffer_view import buffer_stats, newest_pairs, open_buffer_readonly, render_pair

STOP = 9
WORDS = {1: "<s>", 3: "Q", 5: "good", 6: "answer", 7: "bad", 8: "reply", STOP: "."}


def decode(ids) -> str:
    return " ".join(WORDS[int(i)] for i in ids)


def test_stats_count_pairs_by_origin_and_show_renders_the_datas_rejected_answer_whole(tmp_path):
    buffer = ReplayBuffer(tmp_path / "buffer.sqlite", capacity=10, stop_ids=[STOP])
    rewrite = Pair(np.array([1, 3, 5, 6, STOP], np.int32), np.array([1, 3, 5, 7, STOP], np.int32), 2, 1, 1)
    real = Pair(np.array([1, 3, 5, 6, STOP], np.int32), np.array([1, 3, 7, 8, STOP], np.int32), 2, 0, 0, "data")
    buffer.add([rewrite, real, real], step=1)
    buffer.close()
    db = open_buffer_readonly(tmp_path)
    lines = buffer_stats(db, 10).lines()
    assert "origin: the data's rejected 2 (67%), EMA rewrites 1 (33%)" in lines
    console = Console(record=True, width=120)
    console.print(render_pair(newest_pairs(db, 1)[0], decode, [STOP]))
    shown = console.export_text()
    assert "rejected: the data's rejected" in shown
    assert "chosen:   good answer ." in shown and "rejected: bad reply ." in shown
