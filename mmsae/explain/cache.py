"""On-disk cache of endpoint answers, keyed by a hash of (model, messages, sampling parameters).

SQLite in WAL mode: each answer is committed as its own transaction, so killing a job at any moment
loses no answered request and never leaves a corrupt cache; several processes (chunk jobs) may
share one file. Only successful answers are stored, so a rerun retries what failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential


def request_key(model: str, messages: list[dict], params: dict) -> str:
    """SHA-256 over the canonical JSON of (model, messages, sampling parameters)."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


class ResponseCache:
    """A key -> JSON answer store in one SQLite file.

    Args:
        path: the database file (created with its directory if missing).

    Raises:
        sqlite3.OperationalError: the file stayed locked by other processes for 60 s.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self._set_up()

    @retry(retry=retry_if_exception(_locked), wait=wait_random_exponential(0.01, 1), stop=stop_after_delay(60),
           reraise=True)
    def _set_up(self) -> None:
        # Switching a new file to WAL needs an exclusive lock, and SQLite answers "database is locked"
        # at once (without its busy handler) when another process is creating the same file, so
        # several chunk jobs starting together retry here instead of failing.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, response TEXT NOT NULL, created REAL)"
        )

    def get(self, key: str) -> dict | None:
        """The stored answer for ``key``, or None."""
        row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, response: dict) -> None:
        """Store ``response`` for ``key`` (committed immediately)."""
        self._db.execute(
            "INSERT OR REPLACE INTO responses (key, model, response, created) VALUES (?, ?, ?, ?)",
            (key, model, json.dumps(response), time.time()),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()
