"""The control plane's state: one SQLite file under $LORASERVE_HOME/control/, shared by its modules.

Each module declares its own tables (`ensure`); every statement runs under one lock, so the event
loop, the job runner's threads and the batch runner can share the connection. Rows come back as
dicts. Weights never live here: `adapters_dir` stays the source of truth for adapter versions.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional


class ControlDB:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.RLock()

    def ensure(self, schema: str) -> None:
        """Create a module's tables if they are missing (`CREATE TABLE IF NOT EXISTS ...`)."""
        with self._lock:
            self._conn.executescript(schema)

    def execute(self, sql: str, args: tuple = ()) -> int:
        """Run one statement; the number of rows it changed."""
        with self._lock:
            return self._conn.execute(sql, args).rowcount

    def all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._conn.execute(sql, args).fetchall()]

    def one(self, sql: str, args: tuple = ()) -> Optional[dict[str, Any]]:
        rows = self.all(sql, args)
        return rows[0] if rows else None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements that succeed or fail together (BEGIN IMMEDIATE: writers queue up)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
