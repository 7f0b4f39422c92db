"""The FIFO replay buffer, kept on disk in SQLite so RAM stays flat and a crash loses nothing.

One row a pair: token ids as int32 blobs, prompt length, truncation point, segment length,
the reference log-probs computed when the pair entered (NULL for reference-free losses),
how often it was drawn, the step that added it, and how its rewrite ends (`ending`: tail kept,
stopped by the EMA, or cut at the length limit; NULL for pairs without a rewrite). Storing the
ending makes `pairs/cut_off` (the share of the buffer's pairs cut at the length limit) one SQL
count a step, the same count `sapo-lite buffer --stats` makes. Adding, evicting and counting
draws each happen in a single transaction, so a crash never leaves half a pair behind. Each pair
also records its `origin` (augment.py's ORIGINS: the EMA's rewrite, the data's rejected answer,
SPIN's whole answer, or none for SFT), so a run mixing sources can be read source by source.

Sampling is with replacement, weight 1 / (1 + times drawn), as in the official code's
buffer: fresh pairs are favoured without starving old ones.

Departures from the official code:
- one buffer of `sapo.buffer_size` (2000) pairs; the official code keeps 2000 per process,
  about 16,000 across its 8 GPUs, each process drawing from its own. Each official process
  adds 8 pairs a step, as a preset does, so a pair stays the same number of steps in both;
  `sapo.buffer_size=16000` matches the official total instead.
- on disk (SQLite) rather than in process memory, and snapshotted into each checkpoint.
- reference log-probs are stored with each pair when it enters (the official code runs the
  reference on every drawn batch); with a frozen reference the values are the same, and a
  reference refresh clears them so they are recomputed when next drawn.
"""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RunDirError, writing
from .augment import CHOSEN_ONLY, CUT_OFF, EMA_REWRITE, STOPPED, TAIL_KEPT, Pair, pair_ending

# Two tables: the small per-pair facts that sampling, counting and eviction scan, and the
# token blobs (8 KB a pair at 1,000 tokens) that are read only for the pairs drawn. Keeping
# the blobs out of the scanned table makes those scans cheap at 100k pairs.
SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_len INTEGER NOT NULL,
    trunc_point INTEGER NOT NULL,
    segment_len INTEGER NOT NULL,
    ref_logp_chosen REAL,
    ref_logp_rejected REAL,
    times_drawn INTEGER NOT NULL DEFAULT 0,
    step_added INTEGER NOT NULL,
    ending TEXT,
    origin TEXT
);
CREATE TABLE IF NOT EXISTS pair_tokens (
    id INTEGER PRIMARY KEY,
    chosen_ids BLOB NOT NULL,
    rejected_ids BLOB NOT NULL
);
"""
PAIR_COLUMNS = (
    "p.id, t.chosen_ids, t.rejected_ids, p.prompt_len, p.trunc_point, p.segment_len, p.ref_logp_chosen,"
    " p.ref_logp_rejected, p.times_drawn, p.step_added, p.ending, p.origin"
)
JOINED = "pairs p JOIN pair_tokens t ON t.id = p.id"
SCHEMA_VERSION = 3  # PRAGMA user_version; bump when the layout changes (2: the `ending` column, 3: `origin`)
ENDINGS_SINCE = 2  # buffers of version 1 are read with every ending unknown (NULL)
ORIGINS_SINCE = 3
# Before version 3 a pair's rejected response was the EMA's rewrite or, for SFT, empty: the origin is known exactly.
OLD_ORIGIN = f"CASE WHEN segment_len > 0 THEN '{EMA_REWRITE}' ELSE '{CHOSEN_ONLY}' END"
# How a rewrite ends, as stored in the `ending` column: short stable codes, not the labels people read.
ENDING_CODES = {TAIL_KEPT: "tail_kept", STOPPED: "stopped", CUT_OFF: "cut_off"}
ENDING_LABELS = {code: label for label, code in ENDING_CODES.items()}


def check_schema(db: sqlite3.Connection, path: Path) -> int:
    """The buffer's layout version; a layout this sapo-lite does not know is refused rather than misread."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in range(1, SCHEMA_VERSION + 1):
        raise RunDirError(
            f"replay buffer `{path}` has layout version {version}, this sapo-lite reads versions 1 to {SCHEMA_VERSION}",
            "finish that run with the sapo-lite version that started it, or start a new run",
        )
    return version


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring an older buffer to SCHEMA_VERSION in place, in one transaction (a resumed run, a restored snapshot).

    Version 1 had no `ending` column: its pairs keep an unknown (NULL) ending, which the cut-off share
    leaves out (and says so), rather than guessing one from the tokens without the run's stop tokens.
    Version 2 had no `origin`: every pair then was an EMA rewrite or an SFT pair, which `segment_len` tells.
    """
    version = check_schema(db, path)
    if version < SCHEMA_VERSION:
        with _Transaction(db):
            if version < ENDINGS_SINCE:
                db.execute("ALTER TABLE pairs ADD COLUMN ending TEXT")
            db.execute("ALTER TABLE pairs ADD COLUMN origin TEXT")
            db.execute(f"UPDATE pairs SET origin = {OLD_ORIGIN}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def read_as_current(db: sqlite3.Connection, path: Path) -> None:
    """Let a read-only connection query an older buffer with today's columns, without writing to it:
    a temporary view named `pairs` shadows the old table, with every ending unknown where none was recorded
    and the origin its layout implies."""
    version = check_schema(db, path)
    if version < SCHEMA_VERSION:
        ending = "ending" if version >= ENDINGS_SINCE else "NULL AS ending"
        columns = ("id, prompt_len, trunc_point, segment_len, ref_logp_chosen, ref_logp_rejected, times_drawn,"
                   " step_added")
        db.execute(f"CREATE TEMP VIEW pairs AS SELECT {columns}, {ending}, {OLD_ORIGIN} AS origin FROM main.pairs")


def ending_counts(db: sqlite3.Connection) -> dict[str | None, int]:
    """Pairs in the buffer with a rewrite (SFT pairs have none) by how it ends: stored code -> count, None
    for pairs whose ending was not recorded."""
    return dict(db.execute("SELECT ending, COUNT(*) FROM pairs WHERE segment_len > 0 GROUP BY ending").fetchall())


def origin_counts(db: sqlite3.Connection) -> dict[str, int]:
    """Pairs in the buffer by origin (augment.py's ORIGINS)."""
    return dict(db.execute("SELECT origin, COUNT(*) FROM pairs GROUP BY origin ORDER BY origin").fetchall())


def cut_off_share(counts: dict[str | None, int]) -> float:
    """`pairs/cut_off`: the share of the buffer's pairs with a known ending whose rewrite was cut at the
    length limit; NaN when no pair has a known ending (SFT pairs have no rewrite, old buffers no record)."""
    known = sum(count for code, count in counts.items() if code is not None)
    return counts.get(ENDING_CODES[CUT_OFF], 0) / known if known else math.nan


@dataclass
class StoredPair(Pair):
    """A pair read back from the buffer, with its id and cached reference log-probs."""

    pair_id: int = 0
    ref_logp_chosen: float | None = None
    ref_logp_rejected: float | None = None
    times_drawn: int = 0
    step_added: int = 0
    ending: str | None = None
    """How the rewrite ends (a label of augment.py: TAIL_KEPT, STOPPED, CUT_OFF), None when not recorded."""


class ReplayBuffer:
    """FIFO buffer of at most `capacity` pairs in a SQLite file (WAL mode).

    `stop_ids` (the tokens that end an answer) let `add` record how each rewrite ends; without them
    (buffers that only store pairs, such as the validation split's) the ending stays unknown.
    """

    def __init__(self, path: str | Path, capacity: int, stop_ids: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        self.capacity = capacity
        self.stop_ids = None if stop_ids is None else list(stop_ids)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, atomic always
            is_new = self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
            if is_new:
                self._db.executescript(SCHEMA)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("SELECT COUNT(*) FROM pairs").fetchone()
        except sqlite3.DatabaseError as exc:
            raise RunDirError(
                f"replay buffer `{self.path}` is corrupted ({exc})",
                "delete buffer.sqlite to start an empty buffer, or start a new run",
            ) from exc
        migrate(self._db, self.path)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def add(
        self,
        pairs: Sequence[Pair],
        step: int,
        ref_logps: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        """Insert pairs and evict the oldest beyond capacity, in one transaction."""
        refs = ref_logps if ref_logps is not None else [(None, None)] * len(pairs)
        with self._transaction():
            for p, (rc, rr) in zip(pairs, refs):
                cursor = self._db.execute(
                    "INSERT INTO pairs (prompt_len, trunc_point, segment_len, ref_logp_chosen, ref_logp_rejected,"
                    " step_added, ending, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (p.prompt_len, p.trunc_point, p.segment_len, rc, rr, step, self._ending(p), p.origin),
                )
                self._db.execute(
                    "INSERT INTO pair_tokens (id, chosen_ids, rejected_ids) VALUES (?, ?, ?)",
                    (cursor.lastrowid, p.chosen_ids.astype(np.int32).tobytes(),
                     p.rejected_ids.astype(np.int32).tobytes()),
                )
            # The newest id beyond capacity, if any: it and everything older leave the buffer.
            cutoff = self._db.execute(
                "SELECT id FROM pairs ORDER BY id DESC LIMIT 1 OFFSET ?", (self.capacity,)
            ).fetchone()
            if cutoff is not None:
                self._db.execute("DELETE FROM pairs WHERE id <= ?", cutoff)
                self._db.execute("DELETE FROM pair_tokens WHERE id <= ?", cutoff)

    def _ending(self, pair: Pair) -> str | None:
        if self.stop_ids is None or pair.segment_len == 0:  # no stop tokens given, or no rewrite (SFT, the data's)
            return None
        ending = pair_ending(pair.rejected_ids, pair.prompt_len, pair.trunc_point, pair.segment_len, self.stop_ids)
        return ENDING_CODES[ending]

    def origin_counts(self) -> dict[str, int]:
        return origin_counts(self._db)

    def cut_off_share(self) -> float:
        """The share of the buffer's pairs whose rewrite was cut at the length limit (`pairs/cut_off`)."""
        return cut_off_share(ending_counts(self._db))

    def sample(self, n: int, rng: np.random.Generator) -> list[StoredPair]:
        """Draw n pairs with replacement, weight 1/(1 + times drawn); count the draws."""
        index = self._db.execute("SELECT id, times_drawn FROM pairs ORDER BY id").fetchall()
        if not index:
            return []
        ids = np.fromiter((row[0] for row in index), dtype=np.int64, count=len(index))
        weights = 1.0 / (1.0 + np.fromiter((row[1] for row in index), dtype=np.float64, count=len(index)))
        chosen = rng.choice(ids, size=n, replace=True, p=weights / weights.sum()).tolist()
        with self._transaction():
            self._db.executemany(
                "UPDATE pairs SET times_drawn = times_drawn + 1 WHERE id = ?", [(i,) for i in chosen]
            )
        unique = sorted(set(chosen))
        marks = ",".join("?" * len(unique))
        rows = self._db.execute(f"SELECT {PAIR_COLUMNS} FROM {JOINED} WHERE p.id IN ({marks})", unique).fetchall()
        by_id = {row[0]: row_to_pair(row) for row in rows}
        return [by_id[i] for i in chosen]

    def invalidate_reference(self) -> None:
        """Forget every cached reference log-prob (the reference model changed)."""
        with self._transaction():
            self._db.execute("UPDATE pairs SET ref_logp_chosen = NULL, ref_logp_rejected = NULL")

    def set_reference(self, pairs: Sequence[StoredPair], ref_logps: Sequence[tuple[float, float]]) -> None:
        """Store reference log-probs computed for pairs whose cache was invalidated."""
        with self._transaction():
            self._db.executemany(
                "UPDATE pairs SET ref_logp_chosen = ?, ref_logp_rejected = ? WHERE id = ?",
                [(rc, rr, p.pair_id) for p, (rc, rr) in zip(pairs, ref_logps)],
            )

    def snapshot(self, path: Path) -> None:
        """A consistent copy of the whole buffer (SQLite's online backup), for a checkpoint."""
        target = sqlite3.connect(path)
        try:
            self._db.backup(target)
        finally:
            target.close()

    @staticmethod
    def restore(snapshot: Path, path: Path) -> None:
        """Put a checkpoint's snapshot in place of the run's buffer (closed), atomically.

        Safe to repeat: a crash half-way leaves a state the next resume restores again.
        """
        tmp = path.with_name(path.name + ".restore")
        shutil.copyfile(snapshot, tmp)
        if not _is_sound(tmp):
            tmp.unlink()
            raise RunDirError(
                f"the buffer snapshot `{snapshot}` is corrupted",
                f"delete the folder `{snapshot.parent}` to resume from the checkpoint before it",
            )
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        os.replace(tmp, path)

    def all_pairs(self) -> list[StoredPair]:
        rows = self._db.execute(f"SELECT {PAIR_COLUMNS} FROM {JOINED} ORDER BY p.id").fetchall()
        return [row_to_pair(r) for r in rows]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # A full disk surfaces here as "database or disk is full": one line naming this file.
        with writing(self.path, self.path.parent), _Transaction(self._db):
            yield


def _is_sound(path: Path) -> bool:
    try:
        db = sqlite3.connect(path)
        try:
            return db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return False


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def row_to_pair(row: tuple) -> StoredPair:
    """A row of `SELECT {PAIR_COLUMNS} FROM {JOINED}` as a StoredPair (the buffer view reads rows this way too)."""
    (pair_id, chosen, rejected, prompt_len, t, g, ref_c, ref_r, drawn, step, ending, origin) = row
    return StoredPair(
        chosen_ids=np.frombuffer(chosen, dtype=np.int32),
        rejected_ids=np.frombuffer(rejected, dtype=np.int32),
        prompt_len=prompt_len,
        trunc_point=t,
        segment_len=g,
        origin=origin,
        pair_id=pair_id,
        ref_logp_chosen=ref_c,
        ref_logp_rejected=ref_r,
        times_drawn=drawn,
        step_added=step,
        ending=ENDING_LABELS.get(ending),
    )
