"""The ledger: one SQLite row per original, the single source of truth for its state.

States (SPEC §6) and the action each one guards — a state is committed *before* its action, so a
crash at any instant leaves a row that says what to do next (docs/ledger.md has the full table):

    received    landed in watch/ under a temporary name; waits for the rename to a final name
    queued      complete original in watch/, waiting (or waiting to retry after next_attempt_at)
    optimizing  a worker is converting it; a crash here just converts again
    uploading   the bytes to send are fixed (work_path + upload_sha1): a re-send after a crash
                carries the same checksum, so Immich answers "duplicate" instead of a second asset
    done        asset_id committed; only now is the original deleted from watch/
    undone      moved to watch/undone/<user>/ with a .error.json sidecar

Rows stay after done/undone: they are the "remembered files" the SFTP listings keep showing and
the SHA-1 index that recognises a photo delivered twice.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_MAX_CHAR = "\U0010ffff"  # sorts after every other character (SQLite compares UTF-8 bytes)

ACTIVE_STATES = ("received", "queued", "optimizing", "uploading")
FINAL_STATES = ("done", "undone")
OUTCOMES = ("uploaded", "kept", "duplicate", "undone")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS originals (
    id              INTEGER PRIMARY KEY,
    user            TEXT    NOT NULL,
    path            TEXT    NOT NULL,  -- the client's path below its root, POSIX, no leading /
    state           TEXT    NOT NULL,
    outcome         TEXT,              -- uploaded | kept | duplicate | undone (when final)
    sha1            TEXT    NOT NULL,  -- of the original, computed while the bytes arrived
    size            INTEGER NOT NULL,
    mtime           REAL    NOT NULL,  -- the client's mtime (setstat), else the arrival time
    inode           INTEGER,           -- of the file in watch/, so we never delete a newer file
    received_at     REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL DEFAULT 0,
    first_failure_at REAL,
    kind            TEXT,
    stage           TEXT,              -- where the last failure happened: receive|optimize|upload
    reason          TEXT,
    work_path       TEXT,              -- optimized bytes waiting for their upload (.work/)
    upload_name     TEXT,              -- the filename sent to Immich
    upload_sha1     TEXT,              -- SHA-1 of the bytes sent (x-immich-checksum)
    bytes_out       INTEGER,
    captured_at     TEXT,
    asset_id        TEXT,
    undone_path     TEXT,              -- where in watch/undone/ the original was kept
    forgotten       INTEGER NOT NULL DEFAULT 0  -- removed by the client over SFTP
);
CREATE INDEX IF NOT EXISTS originals_user_path ON originals(user, path);
CREATE INDEX IF NOT EXISTS originals_state ON originals(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS originals_user_sha1 ON originals(user, sha1);
"""


@dataclass
class Original:
    id: int
    user: str
    path: str
    state: str
    outcome: str | None
    sha1: str
    size: int
    mtime: float
    inode: int | None
    received_at: float
    updated_at: float
    attempts: int
    next_attempt_at: float
    first_failure_at: float | None
    kind: str | None
    stage: str | None
    reason: str | None
    work_path: str | None
    upload_name: str | None
    upload_sha1: str | None
    bytes_out: int | None
    captured_at: str | None
    asset_id: str | None
    undone_path: str | None
    forgotten: int


_COLUMNS = [f.name for f in fields(Original)]
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM originals"


def _marks(values: tuple[object, ...]) -> str:
    """`(?,?,…)`: one parameter per value, for `IN`."""
    return "(" + ",".join("?" * len(values)) + ")"


@dataclass(frozen=True)
class Remembered:
    """What the SFTP layer shows for a delivered file that is no longer on disk."""

    size: int
    mtime: float


class Ledger:
    """Synchronous access to the ledger. The service calls it from one dedicated thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the action it guards (deleting an original) happens,
        # even across a power cut, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        self._add_folder_column()

    def _add_folder_column(self) -> None:
        """`folder`: the path up to its last "/" ("DCIM/2024/" for "DCIM/2024/a.jpg", "" at the
        root), computed by SQLite and indexed, so a listing reads only its own folder's rows and
        finds subfolders by seeking (remembered_dirs). Added to ledgers made before it existed."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_xinfo(originals)")}
        if "folder" not in columns:
            self._db.execute(
                "ALTER TABLE originals ADD COLUMN folder TEXT"
                " GENERATED ALWAYS AS (rtrim(path, replace(path, '/', ''))) VIRTUAL"
            )
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS originals_user_folder ON originals(user, folder)"
        )

    def close(self) -> None:
        self._db.close()

    # -- reading -----------------------------------------------------------------------------

    def _rows(self, where: str, args: Iterable[object] = ()) -> list[Original]:
        return [Original(*r) for r in self._db.execute(f"{_SELECT} {where}", tuple(args))]

    def get(self, row_id: int) -> Original | None:
        rows = self._rows("WHERE id = ?", (row_id,))
        return rows[0] if rows else None

    def active_for_path(self, user: str, path: str) -> Original | None:
        rows = self._rows(
            f"WHERE user = ? AND path = ? AND state IN {ACTIVE_STATES} ORDER BY id DESC LIMIT 1",
            (user, path),
        )
        return rows[0] if rows else None

    def active_paths(self) -> set[tuple[str, str]]:
        """(user, path) of every original not finished yet: one query for a whole folder scan."""
        return set(
            self._db.execute(f"SELECT user, path FROM originals WHERE state IN {ACTIVE_STATES}")
        )

    def due(self, now: float, limit: int, exclude: Iterable[int] = ()) -> list[Original]:
        """Originals ready for work: queued and due, oldest first."""
        skip = tuple(exclude) or (-1,)
        return self._rows(
            f"WHERE state = 'queued' AND next_attempt_at <= ? AND id NOT IN {_marks(skip)}"
            " ORDER BY next_attempt_at, id LIMIT ?",
            (now, *skip, limit),
        )

    def next_due_time(self, exclude: Iterable[int] = ()) -> float | None:
        """When the next queued original (not one of `exclude`) is due; None when none is."""
        skip = tuple(exclude) or (-1,)
        row = self._db.execute(
            "SELECT MIN(next_attempt_at) FROM originals"
            f" WHERE state = 'queued' AND id NOT IN {_marks(skip)}",
            skip,
        ).fetchone()
        return row[0]

    def unfinished(self) -> list[Original]:
        """Rows a crash may have interrupted (everything not final)."""
        return self._rows(f"WHERE state IN {ACTIVE_STATES} ORDER BY id")

    def delivered_with_sha1(self, user: str, sha1: str) -> Original | None:
        """An earlier original of this user with the same bytes that reached Immich or is on its way."""
        rows = self._rows(
            "WHERE user = ? AND sha1 = ? AND state != 'undone' ORDER BY id LIMIT 1", (user, sha1)
        )
        return rows[0] if rows else None

    def remembered_in_dir(self, user: str, directory: str, since: float) -> dict[str, Remembered]:
        """Latest remembered entry per name directly inside `directory` ("" = the user's root)."""
        prefix = f"{directory}/" if directory else ""
        out: dict[str, Remembered] = {}
        for name_path, size, mtime in self._db.execute(
            "SELECT path, size, mtime FROM originals WHERE user = ? AND folder = ?"
            " AND forgotten = 0 AND received_at >= ? ORDER BY id",
            (user, prefix, since),
        ):
            out[name_path[len(prefix) :]] = Remembered(size, mtime)
        return out

    def remembered_dirs(self, user: str, directory: str, since: float) -> set[str]:
        """Folder names inside `directory` that only exist through remembered files: one index
        seek per subfolder (all of a subfolder's folders sort together), not a read of every
        row below `directory`."""
        prefix = f"{directory}/" if directory else ""
        out: set[str] = set()
        after = prefix  # folder == prefix: files directly inside, not a subfolder
        while True:
            row = self._db.execute(
                "SELECT folder FROM originals WHERE user = ? AND folder > ? AND folder < ?"
                " AND forgotten = 0 AND received_at >= ? ORDER BY folder LIMIT 1",
                (user, after, prefix + _MAX_CHAR, since),
            ).fetchone()
            if row is None:
                return out
            name = row[0][len(prefix) :].split("/", 1)[0]
            out.add(name)
            after = f"{prefix}{name}/{_MAX_CHAR}"

    def remembered(self, user: str, path: str, since: float) -> Remembered | None:
        row = self._db.execute(
            "SELECT size, mtime FROM originals WHERE user = ? AND path = ? AND forgotten = 0"
            " AND received_at >= ? ORDER BY id DESC LIMIT 1",
            (user, path, since),
        ).fetchone()
        return Remembered(row[0], row[1]) if row else None

    def count_by_state(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM originals GROUP BY state"))

    def count_unfinished(self) -> dict[str, int]:
        """Rows by state for every state but `done`: one index range per state, so it stays
        fast however many files were delivered (counting `done` too reads every remembered row:
        119 ms at 1,000,000, and the pipeline refreshes its gauges twice per file)."""
        states = (*ACTIVE_STATES, "undone")
        return dict(
            self._db.execute(
                f"SELECT state, COUNT(*) FROM originals WHERE state IN {states} GROUP BY state"
            )
        )

    def count_by_outcome(self) -> dict[str, int]:
        return dict(
            self._db.execute(
                "SELECT outcome, COUNT(*) FROM originals WHERE outcome IS NOT NULL GROUP BY outcome"
            )
        )

    def bytes_saved(self) -> tuple[int, int]:
        """(original bytes, bytes sent) over everything that reached Immich."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(bytes_out), 0) FROM originals"
            " WHERE state = 'done' AND outcome IN ('uploaded', 'kept')"
        ).fetchone()
        return int(row[0]), int(row[1])

    def abandoned_temporaries(self, before: float) -> list[Original]:
        """Uploads under a temporary name that were never renamed to a final one."""
        return self._rows("WHERE state = 'received' AND updated_at < ? ORDER BY id", (before,))

    def undone(self) -> list[Original]:
        return self._rows("WHERE state = 'undone' ORDER BY id")

    def iter_all(self) -> Iterator[Original]:
        yield from self._rows("ORDER BY id")

    # -- writing (each call is one committed transaction) -------------------------------------

    def insert(
        self,
        *,
        user: str,
        path: str,
        state: str,
        sha1: str,
        size: int,
        mtime: float,
        inode: int | None,
        outcome: str | None = None,
        asset_id: str | None = None,
        reason: str | None = None,
    ) -> int:
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO originals (user, path, state, outcome, sha1, size, mtime, inode,"
            " received_at, updated_at, asset_id, reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (user, path, state, outcome, sha1, size, mtime, inode, now, now, asset_id, reason),
        )
        return int(cur.lastrowid or 0)

    def update(self, row_id: int, **values: object) -> None:
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"unknown ledger columns: {sorted(unknown)}")
        values["updated_at"] = time.time()
        assignments = ", ".join(f"{k} = ?" for k in values)
        self._db.execute(
            f"UPDATE originals SET {assignments} WHERE id = ?", (*values.values(), row_id)
        )

    def delete(self, row_id: int) -> None:
        self._db.execute("DELETE FROM originals WHERE id = ?", (row_id,))

    def set_mtime(self, user: str, path: str, mtime: float) -> bool:
        """setstat on a remembered or waiting file: the latest row for that path takes the time."""
        cur = self._db.execute(
            "UPDATE originals SET mtime = ?, updated_at = ? WHERE id = (SELECT id FROM originals"
            " WHERE user = ? AND path = ? AND forgotten = 0 ORDER BY id DESC LIMIT 1)",
            (mtime, time.time(), user, path),
        )
        return cur.rowcount > 0

    def forget(self, user: str, path: str) -> bool:
        """The client removed a remembered file: hide it from listings (Immich is never touched)."""
        cur = self._db.execute(
            f"UPDATE originals SET forgotten = 1, updated_at = ? WHERE user = ? AND path = ?"
            f" AND forgotten = 0 AND state NOT IN {ACTIVE_STATES}",
            (time.time(), user, path),
        )
        return cur.rowcount > 0

    def rename_remembered(self, user: str, old: str, new: str) -> bool:
        cur = self._db.execute(
            f"UPDATE originals SET path = ?, updated_at = ? WHERE user = ? AND path = ?"
            f" AND forgotten = 0 AND state NOT IN {ACTIVE_STATES}",
            (new, time.time(), user, old),
        )
        return cur.rowcount > 0


class LedgerThread:
    """Runs ledger calls on one dedicated thread, so a commit's fsync never stalls the event loop."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")

    async def __call__(self, fn: Callable[[Ledger], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self.ledger)

    def close(self) -> None:
        self._executor.submit(self.ledger.close).result()
        self._executor.shutdown(wait=True)
