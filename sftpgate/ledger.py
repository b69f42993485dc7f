"""The ledger: one SQLite row per original, the single owner of its state and of every step that
moves it on.

Each arrow of the state diagram is one method below, one committed transaction, guarded by the
state it leaves (`UPDATE … WHERE id = ? AND state IN (…)`): a step taken from the wrong state raises
`TransitionError` instead of silently rewriting a row. A state is committed *before* the action it
guards, so a crash at any instant leaves a row that says what to do next (docs/ledger.md has the
whole table, one row per step, and what start-up does after a crash on either side of it):

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
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from .killpoints import kill_point

T = TypeVar("T")

_MAX_CHAR = "\U0010ffff"  # sorts after every other character (SQLite compares UTF-8 bytes)


class State(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    OPTIMIZING = "optimizing"
    UPLOADING = "uploading"
    DONE = "done"
    UNDONE = "undone"


class Outcome(StrEnum):
    """How a finished original ended (the `outcome` column of done and undone rows)."""

    UPLOADED = "uploaded"  # converted, and the converted file is in Immich
    KEPT = "kept"  # sent as it was
    DUPLICATE = "duplicate"  # the same bytes were already delivered: not sent again
    UNDONE = "undone"


ACTIVE_STATES = (State.RECEIVED, State.QUEUED, State.OPTIMIZING, State.UPLOADING)
FINAL_STATES = (State.DONE, State.UNDONE)
# Complete originals on their way to Immich (what the queue gauge counts).
WAITING_STATES = (State.QUEUED, State.OPTIMIZING, State.UPLOADING)


class TransitionError(RuntimeError):
    """A step was asked of a row that is not in a state it may leave from: a bug, said loudly."""


def _sql(values: tuple[str, ...]) -> str:
    """`('a','b')` for `IN`: state names are this module's own constants, never user input."""
    return "(" + ",".join(f"'{v}'" for v in values) + ")"


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
    forgotten       INTEGER NOT NULL DEFAULT 0, -- removed by the client over SFTP
    -- the video half of a Live Photo: Immich links it to its photo and hides it, so it is
    -- never added to an album (it would show twice in the apps)
    live_photo_video INTEGER NOT NULL DEFAULT 0,
    -- the camera's burst id (Apple BurstUUID, Google BurstID) and whether the camera picked
    -- this frame: the burst becomes one Immich stack
    burst_id        TEXT,
    burst_primary   INTEGER NOT NULL DEFAULT 0,
    -- of a converted video: the bytes of the copy Immich's own conversion job stored beside it
    -- (0: none), measured after delivery; NULL until then
    immich_copy_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS originals_user_path ON originals(user, path);
CREATE INDEX IF NOT EXISTS originals_state ON originals(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS originals_user_sha1 ON originals(user, sha1);
-- Immich stacks made of delivered originals: for a RAW and its JPEG the group is a folder and
-- the name its members share; for a burst the folder is "" and the name "burst <id>".
-- asset_ids (JSON, primary first) is what the stack holds.
CREATE TABLE IF NOT EXISTS stacks (
    user            TEXT    NOT NULL,
    folder          TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    stack_id        TEXT    NOT NULL,
    asset_ids       TEXT    NOT NULL,
    PRIMARY KEY (user, folder, name)
);
"""


@dataclass
class Original:
    id: int
    user: str
    path: str
    state: State
    outcome: Outcome | None
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
    live_photo_video: int
    burst_id: str | None
    burst_primary: int
    immich_copy_bytes: int | None


_COLUMNS = [f.name for f in fields(Original)]
# Columns added since the first release: their declaration, and the value they read as in a
# ledger made before them.
_ADDED_COLUMNS = {
    "live_photo_video": ("INTEGER NOT NULL DEFAULT 0", "0"),
    "burst_id": ("TEXT", "NULL"),
    "burst_primary": ("INTEGER NOT NULL DEFAULT 0", "0"),
    "immich_copy_bytes": ("INTEGER", "NULL"),
}


def _original(values: tuple[object, ...]) -> Original:
    row = Original(*values)  # type: ignore[arg-type]
    row.state = State(row.state)
    row.outcome = Outcome(row.outcome) if row.outcome else None
    return row


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

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """`readonly`: for a reader beside the running service (`sftpgate status`, tests). It
        changes nothing, not even the schema, so it can never take a write lock the service
        is waiting for; WAL mode lets it read while the service commits."""
        self.path = path
        self._select = _SELECT
        self._columns = set(_COLUMNS)  # a reader of an older ledger finds fewer
        if readonly:
            self._db = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA busy_timeout=10000")
            self._select = self._select_for_older_ledger()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the action it guards (deleting an original) happens,
        # even across a power cut, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        self._add_folder_column()
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Columns added since the first release, to ledgers made before them."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_xinfo(originals)")}
        for name, (declaration, _) in _ADDED_COLUMNS.items():
            if name not in columns:
                self._db.execute(f"ALTER TABLE originals ADD COLUMN {name} {declaration}")
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS originals_burst ON originals(user, burst_id)"
            " WHERE burst_id IS NOT NULL"
        )

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

    def _select_for_older_ledger(self) -> str:
        """A reader does not add columns, so on a ledger the service has not opened since an
        upgrade, a column added since then reads as its default."""
        present = {row[1] for row in self._db.execute("PRAGMA table_xinfo(originals)")}
        if not present:  # not created yet: nothing to adapt
            return _SELECT
        self._columns = present
        columns = [c if c in present else f"{_ADDED_COLUMNS[c][1]} AS {c}" for c in _COLUMNS]
        return f"SELECT {', '.join(columns)} FROM originals"

    def _rows(self, where: str, args: Iterable[object] = ()) -> list[Original]:
        return [_original(r) for r in self._db.execute(f"{self._select} {where}", tuple(args))]

    def get(self, row_id: int) -> Original | None:
        rows = self._rows("WHERE id = ?", (row_id,))
        return rows[0] if rows else None

    def active_for_path(self, user: str, path: str) -> Original | None:
        rows = self._rows(
            f"WHERE user = ? AND path = ? AND state IN {_sql(ACTIVE_STATES)} ORDER BY id DESC LIMIT 1",
            (user, path),
        )
        return rows[0] if rows else None

    def active_paths(self) -> set[tuple[str, str]]:
        """(user, path) of every original not finished yet: one query for a whole folder scan."""
        return set(
            self._db.execute(
                f"SELECT user, path FROM originals WHERE state IN {_sql(ACTIVE_STATES)}"
            )
        )

    def due(self, now: float, limit: int, exclude: Iterable[int] = ()) -> list[Original]:
        """Originals ready for work: queued and due, oldest first."""
        skip = tuple(exclude) or (-1,)
        return self._rows(
            f"WHERE state = '{State.QUEUED}' AND next_attempt_at <= ? AND id NOT IN {_marks(skip)}"
            " ORDER BY next_attempt_at, id LIMIT ?",
            (now, *skip, limit),
        )

    def next_due_time(self, exclude: Iterable[int] = ()) -> float | None:
        """When the next queued original (not one of `exclude`) is due; None when none is."""
        skip = tuple(exclude) or (-1,)
        row = self._db.execute(
            "SELECT MIN(next_attempt_at) FROM originals"
            f" WHERE state = '{State.QUEUED}' AND id NOT IN {_marks(skip)}",
            skip,
        ).fetchone()
        return row[0]

    def unfinished(self) -> list[Original]:
        """Rows a crash may have interrupted (everything not final)."""
        return self._rows(f"WHERE state IN {_sql(ACTIVE_STATES)} ORDER BY id")

    def delivered_with_sha1(self, user: str, sha1: str) -> Original | None:
        """An earlier original of this user with the same bytes that reached Immich or is on its
        way (queued or further: a temporary upload may yet be abandoned, and is not one)."""
        states = (State.QUEUED, State.OPTIMIZING, State.UPLOADING, State.DONE)
        rows = self._rows(
            f"WHERE user = ? AND sha1 = ? AND state IN {_sql(states)} ORDER BY id LIMIT 1",
            (user, sha1),
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
        states = (*ACTIVE_STATES, State.UNDONE)
        return dict(
            self._db.execute(
                f"SELECT state, COUNT(*) FROM originals WHERE state IN {_sql(states)} GROUP BY state"
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
            f" WHERE state = '{State.DONE}' AND outcome IN {_sql((Outcome.UPLOADED, Outcome.KEPT))}"
        ).fetchone()
        return int(row[0]), int(row[1])

    def abandoned_temporaries(self, before: float) -> list[Original]:
        """Uploads under a temporary name that were never renamed to a final one."""
        return self._rows(
            f"WHERE state = '{State.RECEIVED}' AND updated_at < ? ORDER BY id", (before,)
        )

    def undone(self) -> list[Original]:
        return self._rows(f"WHERE state = '{State.UNDONE}' ORDER BY id")

    def immich_copies(self) -> tuple[int, int, int]:
        """Of the converted videos in Immich: (how many have Immich's own copy, its bytes in
        all, how many are not measured yet)."""
        measured = "immich_copy_bytes" if "immich_copy_bytes" in self._columns else "NULL"
        row = self._db.execute(
            f"SELECT COALESCE(SUM({measured} > 0), 0), COALESCE(SUM({measured}), 0),"
            f" COALESCE(SUM({measured} IS NULL), 0) FROM originals"
            " WHERE kind = 'video' AND outcome = ?",
            (Outcome.UPLOADED,),
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def videos_to_measure(self, delivered_before: float) -> list[Original]:
        """Converted videos delivered before then whose Immich copy is not measured yet."""
        return self._rows(
            "WHERE kind = 'video' AND outcome = ? AND immich_copy_bytes IS NULL"
            " AND asset_id IS NOT NULL AND updated_at < ? ORDER BY id",
            (Outcome.UPLOADED, delivered_before),
        )

    def record_immich_copy(self, row_id: int, copy_bytes: int) -> None:
        """What Immich stores beside a delivered video; a measurement, never a state."""
        with self._transaction():
            self._db.execute(
                "UPDATE originals SET immich_copy_bytes = ? WHERE id = ?", (copy_bytes, row_id)
            )

    def delivered_in_folder(self, user: str, folder: str) -> list[Original]:
        """Originals directly in `folder` ("DCIM/" or "" for the root) that reached Immich."""
        return self._rows(
            f"WHERE user = ? AND folder = ? AND state = '{State.DONE}' AND asset_id IS NOT NULL"
            " ORDER BY path",
            (user, folder),
        )

    def delivered_in_burst(self, user: str, burst_id: str) -> list[Original]:
        """The frames of one burst that reached Immich."""
        return self._rows(
            f"WHERE user = ? AND burst_id = ? AND state = '{State.DONE}' AND asset_id IS NOT NULL"
            " ORDER BY path",
            (user, burst_id),
        )

    def delivered_bursts(self) -> list[Original]:
        """One delivered frame of every burst (at start, the stacks not made yet are made)."""
        return self._rows(
            f"WHERE burst_id IS NOT NULL AND state = '{State.DONE}' AND asset_id IS NOT NULL"
            " GROUP BY user, burst_id ORDER BY id",
            (),
        )

    def delivered_of_kind(self, kind: str) -> list[Original]:
        return self._rows(
            f"WHERE kind = ? AND state = '{State.DONE}' AND asset_id IS NOT NULL ORDER BY id",
            (kind,),
        )

    def stack_assets(self, user: str, folder: str, name: str) -> list[str] | None:
        """The assets of the stack recorded for this group, primary first; None if none."""
        row = self._db.execute(
            "SELECT asset_ids FROM stacks WHERE user = ? AND folder = ? AND name = ?",
            (user, folder, name),
        ).fetchone()
        return [str(a) for a in json.loads(row[0])] if row else None

    def record_stack(
        self, user: str, folder: str, name: str, stack_id: str, asset_ids: list[str]
    ) -> None:
        """Immich made (or merged into) this stack: not asked again for these assets."""
        kill_point("record_stack:before")
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO stacks (user, folder, name, stack_id, asset_ids)"
                " VALUES (?, ?, ?, ?, ?)",
                (user, folder, name, stack_id, json.dumps(asset_ids)),
            )
        kill_point("record_stack:after")

    def iter_all(self) -> Iterator[Original]:
        yield from self._rows("ORDER BY id")

    # -- the state machine: one method per arrow, each one committed transaction -------------
    #
    # `_step` runs one guarded UPDATE; `_insert` and `_remove` the same for a row that begins or
    # ends. Each names its step, and a kill point surrounds every commit (killpoints.py), so the
    # crash tests can stop the process right before and right after any of them.

    def _step(self, step: str, row_id: int, leaves: tuple[State, ...], **values: object) -> None:
        kill_point(f"{step}:before")
        self._update(step, row_id, leaves, **values)
        kill_point(f"{step}:after")

    def _refuse(self, step: str, row_id: int, leaves: tuple[State, ...]) -> None:
        found = self._db.execute("SELECT state FROM originals WHERE id = ?", (row_id,)).fetchone()
        now = f"is {found[0]}" if found else "does not exist"
        raise TransitionError(
            f"{step}: row {row_id} {now}; this step leaves only {', '.join(leaves)}"
        )

    def _insert(self, step: str, state: State, overwrites: bool, **values: object) -> int:
        """A new row; with `overwrites`, in the same transaction, the end of the rows still
        waiting at its path (their file was just replaced by this one's)."""
        now = time.time()
        values |= {"state": state, "received_at": now, "updated_at": now}
        kill_point(f"{step}:before")
        with self._transaction():
            if overwrites:
                self._drop_waiting_at(str(values["user"]), str(values["path"]), keep=None)
            cur = self._db.execute(
                f"INSERT INTO originals ({', '.join(values)}) VALUES {_marks(tuple(values))}",
                tuple(values.values()),
            )
        kill_point(f"{step}:after")
        return int(cur.lastrowid or 0)

    def _remove(self, step: str, row_id: int, leaves: tuple[State, ...]) -> None:
        kill_point(f"{step}:before")
        self._delete(step, row_id, leaves)
        kill_point(f"{step}:after")

    def _update(self, step: str, row_id: int, leaves: tuple[State, ...], **values: object) -> None:
        values["updated_at"] = time.time()
        assignments = ", ".join(f"{k} = ?" for k in values)
        cur = self._db.execute(
            f"UPDATE originals SET {assignments} WHERE id = ? AND state IN {_sql(leaves)}",
            (*values.values(), row_id),
        )
        if cur.rowcount != 1:
            self._refuse(step, row_id, leaves)

    def _delete(self, step: str, row_id: int, leaves: tuple[State, ...]) -> None:
        cur = self._db.execute(
            f"DELETE FROM originals WHERE id = ? AND state IN {_sql(leaves)}", (row_id,)
        )
        if cur.rowcount != 1:
            self._refuse(step, row_id, leaves)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _drop_waiting_at(self, user: str, path: str, keep: int | None) -> None:
        """Rows at `path` that no work has started on: the file they named was overwritten, and
        the newer bytes are the ones to deliver. Work already under way goes on with its own
        file's inode check, which keeps it from ever deleting the newer file."""
        self._db.execute(
            "DELETE FROM originals WHERE user = ? AND path = ? AND id != ?"
            f" AND state IN {_sql((State.RECEIVED, State.QUEUED))}",
            (user, path, -1 if keep is None else keep),
        )

    # Arrivals (intake). An arrival under a name that a waiting row holds overwrote that row's
    # file: both happen in one transaction, so no instant has both rows or neither.

    def record_received(
        self, *, user: str, path: str, sha1: str, size: int, mtime: float, inode: int,
    ) -> int:  # fmt: skip
        """An upload closed under a temporary name: it waits for the rename to a final one."""
        return self._insert(
            "record_received", State.RECEIVED, True,
            user=user, path=path, sha1=sha1, size=size, mtime=mtime, inode=inode,
        )  # fmt: skip

    def record_queued(
        self, *, user: str, path: str, sha1: str, size: int, mtime: float, inode: int | None,
    ) -> int:  # fmt: skip
        """A complete original in watch/, to be delivered."""
        return self._insert(
            "record_queued", State.QUEUED, True,
            user=user, path=path, sha1=sha1, size=size, mtime=mtime, inode=inode,
        )  # fmt: skip

    def record_duplicate(
        self, *, user: str, path: str, sha1: str, size: int, mtime: float, same_as: Original
    ) -> int:
        """Bytes this user already delivered: remembered for listings, never sent again."""
        return self._insert(
            "record_duplicate", State.DONE, False,
            user=user, path=path, sha1=sha1, size=size, mtime=mtime, outcome=Outcome.DUPLICATE,
            asset_id=same_as.asset_id, reason=f"same bytes as {same_as.path}, already delivered",
        )  # fmt: skip

    def rename_to_final(self, row_id: int, user: str, path: str) -> None:
        """received → queued: the temporary upload was renamed to a final name."""
        kill_point("rename_to_final:before")
        with self._transaction():
            self._drop_waiting_at(user, path, keep=row_id)
            self._update(
                "rename_to_final", row_id, (State.RECEIVED,), state=State.QUEUED, path=path
            )
        kill_point("rename_to_final:after")

    def rename_to_duplicate(self, row_id: int, user: str, path: str, same_as: Original) -> None:
        """received → done (duplicate): renamed to a final name, and its bytes were delivered or
        are on their way. The copy was deleted instead of renamed, so a row at `path` keeps its
        file and stays."""
        kill_point("rename_to_duplicate:before")
        with self._transaction():
            self._update(
                "rename_to_duplicate", row_id, (State.RECEIVED,),
                state=State.DONE, outcome=Outcome.DUPLICATE, path=path, inode=None,
                asset_id=same_as.asset_id,
                reason=f"same bytes as {same_as.path}, already delivered",
            )  # fmt: skip
        kill_point("rename_to_duplicate:after")

    def follow_rename(self, row_id: int, user: str, path: str) -> None:
        """The client renamed a file still on its way (same state, new path)."""
        kill_point("follow_rename:before")
        with self._transaction():
            self._drop_waiting_at(user, path, keep=row_id)
            self._update("follow_rename", row_id, ACTIVE_STATES, path=path)
        kill_point("follow_rename:after")

    def remove_waiting(self, row_id: int) -> None:
        """The client removed a file before any work started: nothing left to deliver."""
        self._remove("remove_waiting", row_id, (State.RECEIVED, State.QUEUED))

    def drop_abandoned(self, row_id: int) -> None:
        """A temporary upload never renamed within a day (its file is removed after this)."""
        self._remove("drop_abandoned", row_id, (State.RECEIVED,))

    def drop_lost(self, row_id: int) -> None:
        """Start-up found neither the original nor bytes to send: nothing is left to deliver."""
        self._remove("drop_lost", row_id, ACTIVE_STATES)

    # Delivery (pipeline).

    def start_optimizing(self, row_id: int) -> None:
        """queued → optimizing: a worker converts it (again, after a crash or a retry)."""
        self._step(
            "start_optimizing", row_id, (State.QUEUED,),
            state=State.OPTIMIZING, upload_sha1=None, work_path=None,
        )  # fmt: skip

    def fix_bytes(
        self, row_id: int, *, kind: str, reason: str, work_path: str | None, upload_name: str,
        upload_sha1: str, bytes_out: int, captured_at: str | None, live_photo_video: bool = False,
        burst_id: str | None = None, burst_primary: bool = False,
    ) -> None:  # fmt: skip
        """optimizing → uploading: from now on the bytes sent for this row never change."""
        self._step(
            "fix_bytes", row_id, (State.OPTIMIZING,),
            state=State.UPLOADING, kind=kind, reason=reason, work_path=work_path,
            upload_name=upload_name, upload_sha1=upload_sha1, bytes_out=bytes_out,
            captured_at=captured_at, live_photo_video=int(live_photo_video),
            burst_id=burst_id, burst_primary=int(burst_primary),
        )  # fmt: skip

    def resume_upload(self, row_id: int) -> None:
        """queued → uploading: the bytes were fixed before a crash or a retry; send them again."""
        self._step("resume_upload", row_id, (State.QUEUED,), state=State.UPLOADING)

    def confirm_asset(self, row_id: int, asset_id: str) -> None:
        """Immich answered with an asset id (still uploading): only now may the original go."""
        self._step("confirm_asset", row_id, (State.UPLOADING,), asset_id=asset_id)

    def finish(self, row_id: int, outcome: Outcome) -> None:
        """uploading → done, once the original and the converted file are deleted."""
        self._step(
            "finish", row_id, (State.UPLOADING,), state=State.DONE, outcome=outcome, work_path=None
        )

    def retry_later(
        self, row_id: int, *, attempts: int, first_failure_at: float, next_attempt_at: float,
        stage: str, reason: str,
    ) -> None:  # fmt: skip
        """→ queued with back-off: a transient failure (Immich away, a full disk, a bug)."""
        self._step(
            "retry_later", row_id, WAITING_STATES,
            state=State.QUEUED, attempts=attempts, first_failure_at=first_failure_at,
            next_attempt_at=next_attempt_at, stage=stage, reason=reason,
        )  # fmt: skip

    def park(self, row_id: int) -> None:
        """Shutdown: work in flight goes back to the queue. A row whose asset id is committed
        stays uploading (start-up only finishes its cleanup); a queued one is left as it is, and
        so is one that finished or was dropped while the shutdown reached it."""
        found = self._db.execute("SELECT state FROM originals WHERE id = ?", (row_id,)).fetchone()
        if found is None or found[0] not in WAITING_STATES:
            return
        self._step(
            "park", row_id, WAITING_STATES,
            state=State.QUEUED if self._lacks_asset(row_id) else State.UPLOADING,
        )  # fmt: skip

    def _lacks_asset(self, row_id: int) -> bool:
        row = self._db.execute("SELECT asset_id FROM originals WHERE id = ?", (row_id,)).fetchone()
        return row is None or row[0] is None

    def choose_undone_path(
        self, row_id: int, undone_path: str, stage: str, reason: str, kind: str | None,
        attempts: int,
    ) -> None:  # fmt: skip
        """Failed for good: where in undone/ the original goes, and why, before it moves there.
        From this commit on the move is decided: start-up completes it, never retries the row."""
        self._step(
            "choose_undone_path", row_id, WAITING_STATES,
            undone_path=undone_path, stage=stage, reason=reason, kind=kind, attempts=attempts,
        )  # fmt: skip

    def mark_undone(self, row_id: int) -> None:
        """→ undone: the original is in undone/ at `undone_path`, beside its sidecar."""
        self._step(
            "mark_undone", row_id, WAITING_STATES,
            state=State.UNDONE, outcome=Outcome.UNDONE, work_path=None,
        )  # fmt: skip

    def requeue_undone(self, row_id: int, inode: int) -> None:
        """undone → queued (`sftpgate retry`): the original is back in watch/, tried afresh."""
        self._step(
            "requeue_undone", row_id, (State.UNDONE,),
            state=State.QUEUED, outcome=None, attempts=0, first_failure_at=None,
            next_attempt_at=time.time(), stage=None, reason=None, work_path=None,
            upload_sha1=None, inode=inode, undone_path=None,
        )  # fmt: skip

    # -- what the client does to remembered files (no state changes) -------------------------

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
            f" AND forgotten = 0 AND state NOT IN {_sql(ACTIVE_STATES)}",
            (time.time(), user, path),
        )
        return cur.rowcount > 0

    def rename_remembered(self, user: str, old: str, new: str) -> bool:
        cur = self._db.execute(
            f"UPDATE originals SET path = ?, updated_at = ? WHERE user = ? AND path = ?"
            f" AND forgotten = 0 AND state NOT IN {_sql(ACTIVE_STATES)}",
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
