"""Look inside a run's replay buffer: statistics, and pairs rendered with the rewritten segment in colour."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from .buffer import StoredPair, check_schema
from .errors import ConfigError, RunDirError


@dataclass
class BufferStats:
    pairs: int
    capacity: int
    newest_step: int
    times_drawn: np.ndarray
    ages: np.ndarray

    def lines(self) -> list[str]:
        drawn, ages = self.times_drawn, self.ages
        return [
            f"pairs: {self.pairs} of {self.capacity} ({self.pairs / self.capacity:.0%} full)",
            f"times drawn: mean {drawn.mean():.2f}, median {np.median(drawn):.0f}, max {drawn.max()}, "
            f"never drawn {np.mean(drawn == 0):.0%}",
            f"age in steps (newest step {self.newest_step}): min {ages.min()}, median {np.median(ages):.0f}, "
            f"p90 {np.percentile(ages, 90):.0f}, max {ages.max()}",
        ]


def buffer_path(run_dir: Path, rank: int | None = None) -> tuple[Path, int]:
    """(the buffer file to read, how many processes keep one): `buffer.sqlite` for a one-process run,
    `buffer-rankK.sqlite` (rank 0 unless told) for a run trained by N processes."""
    ranked = sorted(run_dir.glob("buffer-rank*.sqlite"))
    if (run_dir / "buffer.sqlite").is_file() or not ranked:
        if rank:
            raise ConfigError(f"`{run_dir}` was trained by one process: it has one buffer", "drop --rank")
        return run_dir / "buffer.sqlite", 1
    path = run_dir / f"buffer-rank{rank or 0}.sqlite"
    if not path.is_file():
        raise ConfigError(f"`{run_dir}` has no buffer for rank {rank}", f"choose --rank 0 to {len(ranked) - 1}")
    return path, len(ranked)


def open_buffer_readonly(run_dir: Path, rank: int | None = None) -> sqlite3.Connection:
    path, _ = buffer_path(run_dir, rank)
    if not path.is_file():
        raise RunDirError(f"`{run_dir}` has no buffer.sqlite", "point at the --out folder of a run that trained")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # never writes into the run
        db.execute("SELECT COUNT(*) FROM pairs").fetchone()
    except sqlite3.DatabaseError as exc:
        raise RunDirError(f"`{path}` cannot be read ({exc})", "resume the run to restore it from a checkpoint") from exc
    check_schema(db, path)
    return db


def buffer_stats(db: sqlite3.Connection, capacity: int) -> BufferStats:
    rows = np.array(db.execute("SELECT times_drawn, step_added FROM pairs").fetchall(), dtype=np.int64)
    if len(rows) == 0:
        raise RunDirError("the buffer is empty", "wait for the first training step")
    newest = int(rows[:, 1].max())
    return BufferStats(len(rows), capacity, newest, rows[:, 0], newest - rows[:, 1])


def newest_pairs(db: sqlite3.Connection, count: int) -> list[StoredPair]:
    from .buffer import JOINED, PAIR_COLUMNS, _row_to_pair

    rows = db.execute(f"SELECT {PAIR_COLUMNS} FROM {JOINED} ORDER BY p.id DESC LIMIT ?", (count,)).fetchall()
    return [_row_to_pair(row) for row in rows]


def decode_pieces(decode, ids: np.ndarray, bounds: list[int]) -> list[str]:
    """Texts of ids[b0:b1], ids[b1:b2], ... as the tokenizer renders them in one piece.

    Decoding each piece alone would drop the spaces a tokenizer puts between tokens.
    """
    texts = [decode(ids[:b]) for b in bounds]
    return [later[len(earlier):] for earlier, later in zip(texts, texts[1:])]


def render_pair(pair: StoredPair, decode) -> Panel:
    """Prompt, shared prefix, then the chosen segment (green) against the EMA's rewrite (red)."""
    p, t, g = pair.prompt_len, pair.trunc_point, pair.segment_len
    chosen, rejected = pair.chosen_ids, pair.rejected_ids
    cut = p + t + g
    # Either the rewrite kept the chosen tail R[t+g:] (same length, same tail), or it ended the answer early.
    kept_tail = len(rejected) == len(chosen) and np.array_equal(rejected[cut:], chosen[cut:])
    prompt, prefix, chosen_segment, tail = decode_pieces(decode, chosen, [0, p, p + t, cut, len(chosen)])
    rewrite_end = cut if kept_tail else len(rejected)
    (rejected_segment,) = decode_pieces(decode, rejected, [p + t, rewrite_end])
    chosen_text = Text.assemble((prefix, "dim"), (chosen_segment, "bold green"), (tail, "dim"))
    rejected_text = Text.assemble((prefix, "dim"), (rejected_segment, "bold red"), (tail if kept_tail else "", "dim"))
    body = Group(
        Text.assemble(("prompt: ", "bold"), prompt),
        Text.assemble(("chosen:   ", "bold green"), chosen_text),
        Text.assemble(("rejected: ", "bold red"), rejected_text),
    )
    ending = "keeps the tail" if kept_tail else "ends the answer"
    title = (f"pair {pair.pair_id}, step {pair.step_added}, drawn {pair.times_drawn}x, "
             f"tokens {t}-{t + g}: rewrite {ending}")
    return Panel(body, title=title, title_align="left")
