"""Look inside a run's replay buffer: statistics, and pairs rendered with the rewritten segment in colour."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from ..errors import ConfigError, RunDirError
from ..run.layout import RunDir
from ..sapo.augment import CUT_OFF, FROM_DATA, SPIN_ANSWER, TAIL_KEPT, is_identical, pair_ending
from ..sapo.buffer import (
    ENDING_CODES,
    ENDING_LABELS,
    JOINED,
    PAIR_COLUMNS,
    StoredPair,
    cut_off_share,
    ending_counts,
    origin_counts,
    read_as_current,
    row_to_pair,
)

# How `buffer --show/--stats` names where a pair's rejected response comes from.
ORIGIN_NAMES = {"ema": "EMA rewrites", "data": "the data's rejected", "spin": "SPIN answers (previous iterate)",
                "sft": "chosen only (SFT)"}


@dataclass
class BufferStats:
    pairs: int
    capacity: int
    newest_step: int
    times_drawn: np.ndarray
    ages: np.ndarray
    endings: dict[str | None, int]
    """How the rewrites end, as recorded when each pair entered the buffer: code -> pairs (None: not recorded)."""
    identical: int
    origins: dict[str, int] | None = None
    """Pairs by where their rejected response comes from (the buffer's `origin` column)."""

    @property
    def cut_off(self) -> float:
        """The share `pairs/cut_off` in metrics.jsonl logs for the same buffer."""
        return cut_off_share(self.endings)

    def lines(self) -> list[str]:
        drawn, ages = self.times_drawn, self.ages
        lines = [
            f"pairs: {self.pairs} of {self.capacity} ({self.pairs / self.capacity:.0%} full)",
            f"times drawn: mean {drawn.mean():.2f}, median {np.median(drawn):.0f}, max {drawn.max()}, "
            f"never drawn {np.mean(drawn == 0):.0%}",
            f"age in steps (newest step {self.newest_step}): min {ages.min()}, median {np.median(ages):.0f}, "
            f"p90 {np.percentile(ages, 90):.0f}, max {ages.max()}",
        ]
        if self.origins and (len(self.origins) > 1 or set(self.origins) & {"data", "spin"}):  # EMA or SFT pairs alone
            lines.append("origin: " + ", ".join(f"{ORIGIN_NAMES.get(code, code)} {count} ({count / self.pairs:.0%})"
                                                for code, count in self.origins.items()))
        if not self.endings:
            return [*lines, "rewrites: none (the pairs hold the chosen responses alone)"]
        known = sum(count for code, count in self.endings.items() if code is not None)
        identical = f"rewrites: identical to the chosen {self.identical / self.pairs:.0%}, "
        if known:
            cut = self.endings.get(ENDING_CODES[CUT_OFF], 0)
            lines.append(identical + ", ".join(f"{ENDING_LABELS[code]} {self.endings.get(code, 0) / known:.0%}"
                                               for code in ENDING_LABELS)
                         + f" ({cut} of {known} pairs: `pairs/cut_off` in metrics.jsonl)")
        else:
            lines.append(identical + "how they end was not recorded")
        if self.endings.get(None):
            lines.append(f"{self.endings[None]} pairs added before sapo-lite recorded how rewrites end are left out "
                         "of these shares")
        return lines


def buffer_path(run_dir: Path, rank: int | None = None) -> tuple[Path, int]:
    """(the buffer file to read, how many processes keep one): `buffer.sqlite` for a one-process run,
    `buffer-rankK.sqlite` (rank 0 unless told) for a run trained by N processes."""
    ranked = sorted(run_dir.glob("buffer-rank*.sqlite"))
    single = RunDir(run_dir) / RunDir.buffer_name()
    if single.is_file() or not ranked:
        if rank:
            raise ConfigError(f"`{run_dir}` was trained by one process: it has one buffer", "drop --rank")
        return single, 1
    path = RunDir(run_dir) / RunDir.buffer_name(rank or 0, len(ranked))
    if not path.is_file():
        raise ConfigError(f"`{run_dir}` has no buffer for rank {rank}", f"choose --rank 0 to {len(ranked) - 1}")
    return path, len(ranked)


def open_buffer_readonly(run_dir: Path, rank: int | None = None) -> sqlite3.Connection:
    path, _ = buffer_path(run_dir, rank)
    if not path.is_file():
        raise RunDirError(f"`{run_dir}` has no buffer.sqlite", "point at the --out folder of a run that trained")
    return open_pairs_readonly(path)


def open_pairs_readonly(path: Path) -> sqlite3.Connection:
    """A file of pairs (the replay buffer, or RUN/validation.sqlite: the validation split's pairs), read-only."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # never writes into the run
        db.execute("SELECT COUNT(*) FROM pairs").fetchone()
    except sqlite3.DatabaseError as exc:
        raise RunDirError(f"`{path}` cannot be read ({exc})", "resume the run to restore it from a checkpoint") from exc
    read_as_current(db, path)  # an older buffer is read as it is, never migrated by a reader
    return db


def buffer_stats(db: sqlite3.Connection, capacity: int) -> BufferStats:
    pairs = [row_to_pair(row) for row in db.execute(f"SELECT {PAIR_COLUMNS} FROM {JOINED}")]
    if not pairs:
        raise RunDirError("the buffer is empty", "wait for the first training step")
    drawn = np.array([p.times_drawn for p in pairs], dtype=np.int64)
    added = np.array([p.step_added for p in pairs], dtype=np.int64)
    identical = sum(is_identical(p) for p in pairs)
    newest = int(added.max())
    return BufferStats(len(pairs), capacity, newest, drawn, newest - added, ending_counts(db), identical,
                       origin_counts(db))


def newest_pairs(db: sqlite3.Connection, count: int, first_step: int = 0,
                 last_step: int | None = None) -> list[StoredPair]:
    """The `count` newest pairs, newest first; only those made at steps first_step..last_step when given."""
    last = (1 << 62) if last_step is None else last_step
    rows = db.execute(f"SELECT {PAIR_COLUMNS} FROM {JOINED} WHERE p.step_added BETWEEN ? AND ? "
                      "ORDER BY p.id DESC LIMIT ?", (first_step, last, count)).fetchall()
    return [row_to_pair(row) for row in rows]


def decode_pieces(decode, ids: np.ndarray, bounds: list[int]) -> list[str]:
    """Texts of ids[b0:b1], ids[b1:b2], ... as the tokenizer renders them in one piece.

    Decoding each piece alone would drop the spaces a tokenizer puts between tokens.
    """
    texts = [decode(ids[:b]) for b in bounds]
    return [later[len(earlier):] for earlier, later in zip(texts, texts[1:])]


@dataclass
class PairText:
    """One pair as text, cut where it differs: the prompt, the shared prefix R[:t], the chosen segment and the
    EMA's rewrite of it, and the chosen tail R[t+g:] (which the rejected response keeps when `kept_tail`)."""

    prompt: str
    prefix: str
    chosen_segment: str
    rejected_segment: str
    tail: str
    ending: str
    kept_tail: bool


def pair_text(pair: StoredPair, decode, stop_ids: list[int]) -> PairText:
    """The texts `buffer --show` and the dashboard's Pairs page show, cut at the pair's truncation point."""
    p, t, g = pair.prompt_len, pair.trunc_point, pair.segment_len
    chosen, rejected = pair.chosen_ids, pair.rejected_ids
    ending = pair.ending or pair_ending(rejected, p, t, g, stop_ids)  # recorded when added; else from the tokens
    kept_tail = ending == TAIL_KEPT  # the rejected response goes on with the chosen R[t+g:]
    cut = min(p + t + g, len(chosen))  # under sapo.short_rewrite=free the segment may outrun the chosen response
    prompt, prefix, chosen_segment, tail = decode_pieces(decode, chosen, [0, p, p + t, cut, len(chosen)])
    rewrite_end = p + t + g if kept_tail else len(rejected)
    (rejected_segment,) = decode_pieces(decode, rejected, [p + t, rewrite_end])
    return PairText(prompt, prefix, chosen_segment, rejected_segment, tail, ending, kept_tail)


def render_pair(pair: StoredPair, decode, stop_ids: list[int]) -> Panel:
    """Prompt, shared prefix, then the chosen segment (green) against the EMA's rewrite (red); a pair whose
    rejected response is a whole answer (the data's, SPIN's) shows both answers whole."""
    if pair.origin in (FROM_DATA, SPIN_ANSWER):
        return _render_whole(pair, decode)
    text = pair_text(pair, decode, stop_ids)
    t, g = pair.trunc_point, pair.segment_len
    chosen_text = Text.assemble((text.prefix, "dim"), (text.chosen_segment, "bold green"), (text.tail, "dim"))
    rejected_text = Text.assemble((text.prefix, "dim"), (text.rejected_segment, "bold red"),
                                  (text.tail if text.kept_tail else "", "dim"))
    body = Group(
        Text.assemble(("prompt: ", "bold"), text.prompt),
        Text.assemble(("chosen:   ", "bold green"), chosen_text),
        Text.assemble(("rejected: ", "bold red"), rejected_text),
    )
    same = ", identical to the chosen" if is_identical(pair) else ""
    title = (f"pair {pair.pair_id}, step {pair.step_added}, drawn {pair.times_drawn}x, "
             f"tokens {t}-{t + g} rewritten: {text.ending}{same}")
    return Panel(body, title=title, title_align="left")


def _render_whole(pair: StoredPair, decode) -> Panel:
    p = pair.prompt_len
    body = Group(
        Text.assemble(("prompt: ", "bold"), decode(pair.chosen_ids[:p])),
        Text.assemble(("chosen:   ", "bold green"), (decode(pair.chosen_ids[p:]), "bold green")),
        Text.assemble(("rejected: ", "bold red"), (decode(pair.rejected_ids[p:]), "bold red")),
    )
    title = (f"pair {pair.pair_id}, step {pair.step_added}, drawn {pair.times_drawn}x, "
             f"rejected: {ORIGIN_NAMES[pair.origin]}")
    return Panel(body, title=title, title_align="left")
