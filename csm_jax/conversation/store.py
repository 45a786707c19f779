"""Persistent conversation history: turns (speaker, transcript, Mimi codes) in an append-only store.

    store = open_store("sqlite:///outputs/conversations.db")     # or "sqlite://:memory:", or a bare path
    store = open_store("postgresql://user:pw@host/db")           # PostgresStore (csm_jax/conversation/postgres.py)
    cid = store.create_conversation({"title": "demo"})
    turn = store.add_turn(cid, speaker=0, text="Hello.", codes=codes, source="user")  # committed on return
    store.turns(cid, limit=8)                                    # the 8 most recent, oldest first
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

SOURCES = ("generated", "user")
CODE_MAX = 65535  # codes are stored as uint16

# Schema migrations, applied in order; PRAGMA user_version counts how many a database has.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata))
        )""",
        "CREATE INDEX conversations_updated ON conversations (updated_at)",
        """CREATE TABLE turns (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            idx INTEGER NOT NULL CHECK (idx >= 0),
            speaker INTEGER NOT NULL CHECK (speaker >= 0),
            text TEXT NOT NULL,
            codes BLOB,
            num_frames INTEGER NOT NULL DEFAULT 0,
            num_codebooks INTEGER NOT NULL DEFAULT 0,
            source TEXT NOT NULL CHECK (source IN ('generated', 'user')),
            created_at TEXT NOT NULL,
            UNIQUE (conversation_id, idx)
        )""",
    ),
)


class UnknownConversation(KeyError):
    """No conversation with this id."""

    def __init__(self, conversation_id: Any):
        super().__init__(conversation_id)
        self.conversation_id = conversation_id

    def __str__(self) -> str:
        return f"unknown conversation {self.conversation_id!r}"


class StoreError(RuntimeError):
    """The database cannot be used: unreadable, a schema newer than this code, or the store is closed."""


@dataclass(frozen=True, eq=False)
class Turn:
    """One stored turn. `codes`: Mimi codes int32 [T, K'] (read-only), or None for a text-only turn.
    Compared and hashed by identity (it holds an array); `turn_id` is unique within a store."""

    turn_id: int
    conversation_id: str
    index: int
    speaker: int
    text: str
    codes: np.ndarray | None
    source: str
    created_at: str

    @property
    def frames(self) -> int:
        return 0 if self.codes is None else int(self.codes.shape[0])

    def summary(self) -> dict:
        """The JSON-serialisable view of the turn (no codes), as in the protocol's `history` event."""
        return {"turn_id": self.turn_id, "index": self.index, "speaker": self.speaker, "text": self.text,
                "frames": self.frames, "source": self.source, "created_at": self.created_at}


class Store(Protocol):
    """Storage interface for conversation history; every method is safe to call from several threads."""

    def create_conversation(self, metadata: dict | None = None) -> str: ...
    def has_conversation(self, conversation_id: str) -> bool: ...
    def add_turn(self, conversation_id: str, speaker: int, text: str, codes: np.ndarray | None,
                 source: str) -> Turn: ...
    def turns(self, conversation_id: str, limit: int | None = None) -> list[Turn]: ...
    def count_turns(self, conversation_id: str) -> int: ...
    def conversations(self, limit: int = 100) -> list[dict]: ...
    def close(self) -> None: ...


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _check_id(conversation_id: Any) -> str:
    if not isinstance(conversation_id, str):
        raise TypeError(f"conversation_id must be a str, got {type(conversation_id).__name__}")
    return conversation_id


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_codes(codes: Any) -> np.ndarray | None:
    """None, or an integer array [T, K'] (K' >= 1) with values in [0, 65535] -> int32 copy, read-only."""
    if codes is None:
        return None
    arr = np.asarray(codes)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"codes must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"codes must be 2-D [frames, codebooks] with >= 1 codebook, got shape {list(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() > CODE_MAX):
        raise ValueError(f"codes must be in [0, {CODE_MAX}], got [{arr.min()}, {arr.max()}]")
    arr = arr.astype(np.int32)
    arr.flags.writeable = False
    return arr


class SQLiteStore:
    """Store on stdlib sqlite3: a file (WAL journal, synchronous=FULL) or ":memory:". One connection shared by
    all threads behind a lock; writes use BEGIN IMMEDIATE, so other processes on the same file are safe too."""

    def __init__(self, path: str | os.PathLike = ":memory:", busy_timeout_s: float = 10.0):
        self.path = str(path)
        if not self.path.strip():
            raise StoreError("the conversation store path is empty (sqlite would keep the history in a temporary "
                             "file that is gone at restart); give a file path or ':memory:'")
        memory = self.path == ":memory:"
        if not memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        try:
            c = self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                             check_same_thread=False)
            c.execute("PRAGMA foreign_keys = ON")
            c.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            c.execute("PRAGMA synchronous = FULL")
            self._check_version(c.execute("PRAGMA user_version").fetchone()[0])
            if not memory:
                c.execute("PRAGMA journal_mode = WAL")
            self._migrate()
            if not memory:
                self._check_usable()
        except sqlite3.Error as e:
            self.close()
            raise StoreError(f"cannot open conversation store {self.path}: {e}") from e
        except StoreError:
            self.close()
            raise

    def _check_usable(self) -> None:
        """Fail at open, not on the first request: the file must pass SQLite's quick check and take a write."""
        with self._lock:
            assert self._conn is not None
            problem = self._conn.execute("PRAGMA quick_check").fetchone()[0]
        if problem != "ok":
            raise StoreError(f"conversation store {self.path} is damaged (quick_check: {problem})")
        with self._tx(immediate=True) as c:  # a real write (the header's schema version, unchanged)
            c.execute(f"PRAGMA user_version = {c.execute('PRAGMA user_version').fetchone()[0]}")

    def _check_version(self, version: int) -> None:
        if version > len(MIGRATIONS):
            raise StoreError(f"{self.path} has schema version {version}, newer than this csm_jax supports "
                             f"({len(MIGRATIONS)}); upgrade csm_jax to open it")

    def _migrate(self) -> None:
        with self._tx(immediate=True) as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            self._check_version(version)
            for v in range(version, len(MIGRATIONS)):
                for sql in MIGRATIONS[v]:
                    c.execute(sql)
                c.execute(f"PRAGMA user_version = {v + 1}")

    @contextlib.contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: committed on success, rolled back on any exception."""
        with self._lock:
            if self._conn is None:
                raise StoreError("the conversation store is closed")
            c = self._conn
            c.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

    @staticmethod
    def _exists(c: sqlite3.Connection, conversation_id: str) -> None:
        if c.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
            raise UnknownConversation(conversation_id)

    def create_conversation(self, metadata: dict | None = None) -> str:
        """A new empty conversation -> its id (uuid4 hex). `metadata`: a JSON-serialisable dict."""
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        try:
            meta = json.dumps(metadata or {})
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
        cid, now = uuid.uuid4().hex, _now()
        with self._tx(immediate=True) as c:
            c.execute("INSERT INTO conversations (id, created_at, updated_at, metadata) VALUES (?, ?, ?, ?)",
                      (cid, now, now, meta))
        return cid

    def has_conversation(self, conversation_id: str) -> bool:
        with self._tx() as c:
            row = c.execute("SELECT 1 FROM conversations WHERE id = ?", (_check_id(conversation_id),))
            return row.fetchone() is not None

    def add_turn(self, conversation_id: str, speaker: int, text: str, codes: np.ndarray | None,
                 source: str) -> Turn:
        """Append a turn (its index is the next in the conversation); durably committed when this returns.
        `codes`: None or integer [T, K'] in [0, 65535]; `text` may be "" only when codes are given."""
        cid = _check_id(conversation_id)
        speaker = _check_count("speaker", speaker)
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        arr = _check_codes(codes)
        if arr is None and not text.strip():
            raise ValueError("a turn needs non-empty text or audio codes")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        blob = None if arr is None else arr.astype("<u2").tobytes()
        frames, books = (0, 0) if arr is None else arr.shape
        now = _now()
        with self._tx(immediate=True) as c:
            self._exists(c, cid)
            index = c.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM turns WHERE conversation_id = ?",
                              (cid,)).fetchone()[0]
            cur = c.execute("INSERT INTO turns (conversation_id, idx, speaker, text, codes, num_frames, num_codebooks,"
                            " source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (cid, index, speaker, text, blob, frames, books, source, now))
            c.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid))
        return Turn(cur.lastrowid, cid, index, speaker, text, arr, source, now)

    def turns(self, conversation_id: str, limit: int | None = None) -> list[Turn]:
        """The conversation's turns, oldest first; `limit`: only the most recent N."""
        cid = _check_id(conversation_id)
        n = -1 if limit is None else _check_count("limit", limit)  # LIMIT -1: no limit
        with self._tx() as c:
            self._exists(c, cid)
            rows = c.execute("SELECT id, idx, speaker, text, codes, num_frames, num_codebooks, source, created_at"
                             " FROM turns WHERE conversation_id = ? ORDER BY idx DESC LIMIT ?", (cid, n)).fetchall()
        return [self._turn(cid, *row) for row in reversed(rows)]

    @staticmethod
    def _turn(cid: str, turn_id: int, index: int, speaker: int, text: str, blob: bytes | None, frames: int,
              books: int, source: str, created_at: str) -> Turn:
        codes = None
        if blob is not None:
            codes = np.frombuffer(blob, "<u2").reshape(frames, books).astype(np.int32)
            codes.flags.writeable = False
        return Turn(turn_id, cid, index, speaker, text, codes, source, created_at)

    def count_turns(self, conversation_id: str) -> int:
        cid = _check_id(conversation_id)
        with self._tx() as c:
            self._exists(c, cid)
            return c.execute("SELECT COUNT(*) FROM turns WHERE conversation_id = ?", (cid,)).fetchone()[0]

    def conversations(self, limit: int = 100) -> list[dict]:
        """Up to `limit` conversations, most recently updated first: {"id", "created_at", "updated_at", "turns",
        "metadata"}."""
        n = _check_count("limit", limit)
        with self._tx() as c:
            rows = c.execute("SELECT c.id, c.created_at, c.updated_at,"
                             " (SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id), c.metadata"
                             " FROM conversations c ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?",
                             (n,)).fetchall()
        return [{"id": i, "created_at": ca, "updated_at": ua, "turns": t, "metadata": json.loads(m)}
                for i, ca, ua, t, m in rows]

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise StoreError."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def open_store(url: str | os.PathLike) -> Store:
    """A Store from a URL: "sqlite:///relative/path.db", "sqlite:////absolute/path.db" (SQLAlchemy style),
    "sqlite://:memory:", or a bare file path -> SQLiteStore (embedded, the default); "postgresql://user:password@host:
    port/dbname?..." (or postgres://) -> PostgresStore (psycopg 3, imported only then)."""
    url = os.fspath(url)
    if "://" not in url:
        return SQLiteStore(url)
    scheme, rest = url.split("://", 1)
    if scheme == "sqlite":
        if rest in ("", ":memory:", "/:memory:"):
            return SQLiteStore(":memory:")
        if rest.startswith("/") and len(rest) > 1:
            return SQLiteStore(rest[1:])
        raise ValueError(f"bad sqlite store URL {url!r}: use sqlite:///path.db or sqlite://:memory:")
    if scheme in ("postgresql", "postgres"):
        try:
            from csm_jax.conversation.postgres import PostgresStore
        except ImportError as e:
            if not (e.name or "").startswith("psycopg"):
                raise
            raise StoreError(f"a {scheme}:// conversation store needs psycopg 3 and psycopg_pool, dependencies of "
                             f"csm-jax missing from this environment ({e}): pip install 'psycopg[binary]>=3.2' "
                             "'psycopg-pool>=3.2'") from None
        return PostgresStore(url)
    shown = url.replace(rest, "...") if "@" in rest else url  # never echo a password
    raise ValueError(f"unsupported store URL scheme {scheme + '://'!r} in {shown!r}; supported: "
                     "sqlite:///path.db, sqlite://:memory:, a bare file path, or postgresql://user@host/dbname")
