"""PostgresStore: the conversation Store on a PostgreSQL server, for several server processes sharing one history.

    store = open_store("postgresql://user:password@db.example:5432/csm")   # or PostgresStore(url, max_size=8)

psycopg 3 with a connection pool (psycopg_pool). The schema is created and migrated at open
(a version table, one transaction per migration, serialised between processes by an advisory lock), and the open
fails at once with a StoreError when the server cannot be reached, refuses the login or cannot take a write. Every
call is one transaction: `add_turn` returns only after COMMIT, and a turn whose transaction did not commit leaves
nothing behind. Turn indexes are assigned under a row lock on the conversation, so several processes can append to
one conversation. A lost server makes each call raise StoreError (after at most `timeout` seconds); the pool
reconnects by itself when the server is back.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from csm_jax.conversation.store import (
    SOURCES,
    StoreError,
    Turn,
    UnknownConversation,
    _check_codes,
    _check_count,
    _check_id,
    _now,
)

# Schema migrations, applied in order; csm_jax_schema.version counts how many a database has. Same tables and
# meaning as SQLite's MIGRATIONS; `seq` orders conversations updated in the same microsecond (SQLite's rowid).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL,
            metadata JSON NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX conversations_updated ON conversations (updated_at, seq)",
        """CREATE TABLE turns (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            idx BIGINT NOT NULL CHECK (idx >= 0),
            speaker BIGINT NOT NULL CHECK (speaker >= 0),
            text TEXT NOT NULL,
            codes BYTEA,
            num_frames INTEGER NOT NULL DEFAULT 0 CHECK (num_frames >= 0),
            num_codebooks INTEGER NOT NULL DEFAULT 0 CHECK (num_codebooks >= 0),
            source TEXT NOT NULL CHECK (source IN ('generated', 'user')),
            created_at TIMESTAMPTZ NOT NULL,
            UNIQUE (conversation_id, idx),
            CHECK (codes IS NULL OR octet_length(codes) = 2 * num_frames * num_codebooks)
        )""",
    ),
)
SCHEMA_TABLE = "csm_jax_schema"
_MIGRATION_LOCK = 0x63736D6A6178  # pg_advisory_xact_lock key ("csmjax"): one migrating process at a time
_BIGINT_MAX = 2**63 - 1


def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split())


def _redact(text: str) -> str:
    """`text` with the password of any postgresql:// URL in it replaced by ***."""
    return re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def _describe(params: dict[str, Any]) -> str:
    """postgresql://user@host:port/dbname of a parsed conninfo: for messages, never with the password."""
    user = f"{params['user']}@" if params.get("user") else ""
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


class PostgresStore:
    """Store on PostgreSQL (psycopg 3 and psycopg_pool). Safe from many threads and many processes at once.

    `url`: a libpq URL (postgresql://user:password@host:port/dbname?sslmode=...; libpq's PG* environment variables
    and ~/.pgpass apply). `min_size`/`max_size`: pooled connections. `connect_timeout`: seconds to open one
    connection. `timeout`: seconds a call waits for a working connection before it raises StoreError.
    `statement_timeout`: seconds any one statement may run (lock waits included). `reconnect_timeout`: seconds the
    pool keeps retrying a lost connection in the background before it lets the next call start over."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, connect_timeout: float = 5.0,
                 timeout: float = 5.0, statement_timeout: float = 30.0, reconnect_timeout: float = 10.0):
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as e:
            raise StoreError(f"bad PostgreSQL store URL {_redact(url)!r}: {_redact(_oneline(e))}") from None
        self.url = _describe(params)  # without the password
        self._password = params.get("password") or None
        defaults = {"connect_timeout": max(2, round(connect_timeout)), "application_name": "csm-jax",
                    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
        if psycopg.pq.version() >= 120000:  # libpq 12+: a send to a vanished server fails instead of hanging
            defaults["tcp_user_timeout"] = int(1000 * max(timeout, statement_timeout))
        for key, value in defaults.items():
            params.setdefault(key, value)
        self._conninfo = make_conninfo("", **params)
        self.timeout = float(timeout)
        self._settings = {"statement_timeout": int(1000 * statement_timeout),
                          "idle_in_transaction_session_timeout": int(2000 * statement_timeout)}
        self._lock = threading.Lock()
        self._last_connect_error: str | None = None
        self._pool: ConnectionPool | None = None

        try:  # one plain connection first: its error says why the server cannot be used
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to the conversation store {self.url}: {self._clean(e)}") from None
        try:
            with conn:
                self._configure(conn)
                self._migrate(conn)  # StoreError for a schema newer than this code
        except psycopg.Error as e:
            raise StoreError(f"cannot open the conversation store {self.url}: {self._clean(e)}") from None

        store = self

        class _Connection(psycopg.Connection):  # remembers why the pool last failed to connect, for messages
            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
                try:
                    conn = super().connect(conninfo, **kwargs)
                except psycopg.Error as e:
                    store._last_connect_error = store._clean(e)
                    raise
                store._last_connect_error = None
                return conn

        pool = ConnectionPool(self._conninfo, min_size=min_size, max_size=max_size, timeout=timeout,
                              kwargs={"autocommit": True}, configure=self._configure,
                              check=ConnectionPool.check_connection, reconnect_timeout=reconnect_timeout,
                              connection_class=_Connection, name=f"csm-jax-store {self.url}", open=False)
        try:
            pool.open(wait=True, timeout=max(2 * connect_timeout, timeout))
        except PoolTimeout:
            pool.close()
            raise StoreError(f"cannot connect to the conversation store {self.url}: the connection pool did not "
                             f"start{self._why()}") from None
        self._pool = pool

    def _clean(self, e: BaseException) -> str:
        text = _redact(_oneline(e))
        return text.replace(self._password, "***") if self._password else text

    def _why(self) -> str:
        return f" (last connection attempt: {self._last_connect_error})" if self._last_connect_error else ""

    def _configure(self, conn: psycopg.Connection) -> None:
        """Per-connection settings: no statement, lock wait or abandoned transaction holds anything for long."""
        for name, ms in self._settings.items():
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(ms)))

    def _migrate(self, conn: psycopg.Connection) -> None:
        """Create or upgrade the schema in one transaction, then prove the database takes writes."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (one BOOLEAN PRIMARY KEY DEFAULT TRUE "
                         "CHECK (one), version INTEGER NOT NULL CHECK (version >= 0))")
            conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (0) ON CONFLICT DO NOTHING")
            (version,) = conn.execute(f"SELECT version FROM {SCHEMA_TABLE}").fetchone()
            if version > len(MIGRATIONS):
                raise StoreError(f"{self.url} has schema version {version}, newer than this csm_jax supports "
                                 f"({len(MIGRATIONS)}); upgrade csm_jax to open it")
            for v in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[v]:
                    conn.execute(statement)
            # Always a real write (a read-only server or role fails here, at open, not on the first turn).
            conn.execute(f"UPDATE {SCHEMA_TABLE} SET version = %s", (len(MIGRATIONS),))

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection: committed when the block ends, rolled back on any exception;
        database failures become StoreError."""
        pool = self._pool
        if pool is None:
            raise StoreError("the conversation store is closed")
        try:
            with pool.connection() as conn, conn.transaction():
                yield conn
        except PoolClosed:
            raise StoreError("the conversation store is closed") from None
        except PoolTimeout:
            raise StoreError(f"the conversation store {self.url} is unavailable: no working database connection "
                             f"within {self.timeout:g} s{self._why()}") from None
        except psycopg.OperationalError as e:
            raise StoreError(f"the conversation store {self.url} is unavailable: {self._clean(e)}") from None
        except psycopg.Error as e:
            raise StoreError(f"the conversation store {self.url} failed: {self._clean(e)}") from None

    def create_conversation(self, metadata: dict | None = None) -> str:
        """A new empty conversation -> its id (uuid4 hex). `metadata`: a JSON-serialisable dict."""
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        try:
            meta = json.dumps(metadata or {}, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
        cid, now = uuid.uuid4().hex, datetime.fromisoformat(_now())
        with self._tx() as c:
            c.execute("INSERT INTO conversations (id, created_at, updated_at, metadata) VALUES (%s, %s, %s, %s::json)",
                      (cid, now, now, meta))
        return cid

    @staticmethod
    def _storable(conversation_id: Any) -> bool:
        """False for an id no conversation can have (PostgreSQL text cannot hold NUL)."""
        return "\x00" not in _check_id(conversation_id)

    def has_conversation(self, conversation_id: str) -> bool:
        if not self._storable(conversation_id):
            return False
        with self._tx() as c:
            return c.execute("SELECT 1 FROM conversations WHERE id = %s", (conversation_id,)).fetchone() is not None

    def _exists(self, c: psycopg.Connection, conversation_id: str) -> None:
        if c.execute("SELECT 1 FROM conversations WHERE id = %s", (conversation_id,)).fetchone() is None:
            raise UnknownConversation(conversation_id)

    def add_turn(self, conversation_id: str, speaker: int, text: str, codes: np.ndarray | None,
                 source: str) -> Turn:
        """Append a turn (its index is the next in the conversation); committed when this returns.
        `codes`: None or integer [T, K'] in [0, 65535]; `text` may be "" only when codes are given."""
        if not self._storable(conversation_id):
            raise UnknownConversation(conversation_id)
        cid = conversation_id
        speaker = _check_count("speaker", speaker)
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if "\x00" in text:
            raise ValueError("text must not contain NUL characters (PostgreSQL text cannot hold them)")
        arr = _check_codes(codes)
        if arr is None and not text.strip():
            raise ValueError("a turn needs non-empty text or audio codes")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if speaker > _BIGINT_MAX:
            raise ValueError(f"speaker must be at most {_BIGINT_MAX}, got {speaker}")
        blob = None if arr is None else arr.astype("<u2").tobytes()
        frames, books = (0, 0) if arr is None else arr.shape
        now = _now()
        with self._tx() as c:
            # The row lock orders appends to one conversation across threads and processes; the next index is
            # read after it is taken (READ COMMITTED: each statement sees every commit made before it started).
            if c.execute("UPDATE conversations SET updated_at = %s WHERE id = %s RETURNING id",
                         (datetime.fromisoformat(now), cid)).fetchone() is None:
                raise UnknownConversation(cid)
            (index,) = c.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM turns WHERE conversation_id = %s",
                                 (cid,)).fetchone()
            (turn_id,) = c.execute(
                "INSERT INTO turns (conversation_id, idx, speaker, text, codes, num_frames, num_codebooks, source,"
                " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (cid, index, speaker, text, blob, frames, books, source, datetime.fromisoformat(now))).fetchone()
        return Turn(turn_id, cid, index, speaker, text, arr, source, now)

    def turns(self, conversation_id: str, limit: int | None = None) -> list[Turn]:
        """The conversation's turns, oldest first; `limit`: only the most recent N."""
        if not self._storable(conversation_id):
            raise UnknownConversation(conversation_id)
        n = None if limit is None else min(_check_count("limit", limit), _BIGINT_MAX)  # LIMIT NULL: no limit
        with self._tx() as c:
            self._exists(c, conversation_id)
            rows = c.execute("SELECT id, idx, speaker, text, codes, num_frames, num_codebooks, source, created_at"
                             " FROM turns WHERE conversation_id = %s ORDER BY idx DESC LIMIT %s",
                             (conversation_id, n)).fetchall()
        return [self._turn(conversation_id, *row) for row in reversed(rows)]

    @staticmethod
    def _turn(cid: str, turn_id: int, index: int, speaker: int, text: str, blob: bytes | None, frames: int,
              books: int, source: str, created_at: datetime) -> Turn:
        codes = None
        if blob is not None:
            codes = np.frombuffer(bytes(blob), "<u2").reshape(frames, books).astype(np.int32)
            codes.flags.writeable = False
        return Turn(turn_id, cid, index, speaker, text, codes, source, _iso(created_at))

    def count_turns(self, conversation_id: str) -> int:
        if not self._storable(conversation_id):
            raise UnknownConversation(conversation_id)
        with self._tx() as c:
            self._exists(c, conversation_id)
            (n,) = c.execute("SELECT COUNT(*) FROM turns WHERE conversation_id = %s", (conversation_id,)).fetchone()
        return n

    def conversations(self, limit: int = 100) -> list[dict]:
        """Up to `limit` conversations, most recently updated first: {"id", "created_at", "updated_at", "turns",
        "metadata"}."""
        n = min(_check_count("limit", limit), _BIGINT_MAX)
        with self._tx() as c:
            rows = c.execute("SELECT c.id, c.created_at, c.updated_at,"
                             " (SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id), c.metadata"
                             " FROM conversations c ORDER BY c.updated_at DESC, c.seq DESC LIMIT %s",
                             (n,)).fetchall()
        return [{"id": i, "created_at": _iso(ca), "updated_at": _iso(ua), "turns": t, "metadata": m}
                for i, ca, ua, t, m in rows]

    def close(self) -> None:
        """Close the pool (idempotent); later calls raise StoreError."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
