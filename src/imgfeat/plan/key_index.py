"""The key index: every key planned so far, in SQLite beside the plan files, so that planning
finds a duplicate key in bounded memory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from imgfeat.store import faults


class KeyIndex:
    """Every key planned so far, on disk, so that a duplicate is found in bounded memory."""

    def __init__(self, path: Path):
        self._root = Path(path).parent.parent
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY) WITHOUT ROWID")

    def add_new(self, keys: list[str]) -> list[bool]:
        """Record keys; True for each one not seen before (in this batch or earlier)."""
        fresh = []
        for key in keys:
            cursor = self._db.execute("INSERT OR IGNORE INTO keys VALUES (?)", (key,))
            fresh.append(cursor.rowcount == 1)
        return fresh

    def contains(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM keys WHERE key = ?", (key,)).fetchone() \
            is not None

    def empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is None

    def commit(self) -> None:
        self._db.commit()
        faults.point("keys", self._root)

    def close(self) -> None:
        """Close, dropping keys not committed: those of a shard whose plan file was never
        written (a full disk, a walk that disagrees), which must not count as planned."""
        self._db.close()
