"""The Store suite, run on both backends (SQLite and a throwaway PostgreSQL server, tests/postgres_fixture.py):
round trips, ordering, persistence, validation, threads and crash durability; then SQLite's own (files, WAL,
migrations, damage) and PostgreSQL's own (schema migrations, several server processes on one conversation, an
unreachable server at open, the server lost mid-run)."""

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from csm_jax.conversation import SQLiteStore, StoreError, Turn, UnknownConversation, open_store
from csm_jax.conversation.store import MIGRATIONS


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_url(backend, tmp_path, request) -> str:
    """Where a new, empty store lives: a SQLite file, or an emptied database on the session's PostgreSQL server."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_cluster").empty_database()


@pytest.fixture
def store(backend, request):
    """An empty store: SQLite in memory, or PostgreSQL (a new database)."""
    s = open_store("sqlite://:memory:" if backend == "sqlite" else request.getfixturevalue("store_url"))
    yield s
    s.close()


def codes(frames: int, books: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (frames, books)).astype(np.int64)


def same(x: Turn, y: Turn) -> bool:
    """Field-by-field equality (Turn compares by identity: it holds an array)."""
    arrays = (x.codes is None and y.codes is None) or (
        x.codes is not None and y.codes is not None and np.array_equal(x.codes, y.codes))
    return arrays and x.summary() == y.summary() and x.conversation_id == y.conversation_id


def test_round_trip_codes_and_text(store):
    cid = store.create_conversation({"title": "t"})
    c = codes(13, 8)
    c[0, 0], c[0, 1] = 0, 65535
    a = store.add_turn(cid, 1, "Hi!", c, "user")
    b = store.add_turn(cid, 0, "Text only.", None, "generated")
    e = store.add_turn(cid, 2, "", codes(3, 5, seed=1), "user")  # audio without transcript
    got = store.turns(cid)
    assert [same(x, y) for x, y in zip(got, [a, b, e])] == [True] * 3 and len(got) == 3
    assert [t.index for t in got] == [0, 1, 2]
    assert got[0].codes.dtype == np.int32 and np.array_equal(got[0].codes, c)
    assert got[1].codes is None and got[1].frames == 0 and got[1].text == "Text only."
    assert got[2].text == "" and got[2].codes.shape == (3, 5)
    assert np.array_equal(got[2].codes, codes(3, 5, seed=1))
    for t in (a, e, got[0], got[2]):
        with pytest.raises(ValueError):  # read-only
            t.codes[0, 0] = 1
    s = got[0].summary()
    assert s == {"turn_id": a.turn_id, "index": 0, "speaker": 1, "text": "Hi!", "frames": 13, "source": "user",
                 "created_at": a.created_at}
    assert json.loads(json.dumps(s)) == s and s["created_at"].endswith("+00:00")


def test_ordering_limit_counts_and_listing(store):
    c1, c2 = store.create_conversation(), store.create_conversation({"k": [1, 2]})
    for i in range(5):
        store.add_turn(c1, i % 2, f"turn {i}", None, "user")
    store.add_turn(c2, 0, "other", None, "generated")
    assert [t.text for t in store.turns(c1, limit=2)] == ["turn 3", "turn 4"]
    assert [t.index for t in store.turns(c1, limit=10)] == list(range(5))
    assert store.turns(c1, limit=0) == [] and store.turns(store.create_conversation()) == []
    assert store.count_turns(c1) == 5 and store.count_turns(c2) == 1
    listing = store.conversations()
    assert [d["id"] for d in listing[1:]] == [c2, c1]  # most recently updated first (listing[0]: the empty one)
    assert listing[1]["metadata"] == {"k": [1, 2]} and listing[1]["turns"] == 1 and listing[2]["turns"] == 5
    assert set(listing[2]) == {"id", "created_at", "updated_at", "turns", "metadata"}
    assert listing[2]["updated_at"] > listing[2]["created_at"]
    assert len(store.conversations(limit=1)) == 1
    assert store.has_conversation(c1) and not store.has_conversation("nope")


def test_close_and_reopen_keeps_history(store_url):
    s = open_store(store_url)
    cid = s.create_conversation({"title": "kept"})
    t = s.add_turn(cid, 0, "kept", codes(4), "generated")
    s.close()
    s.close()  # idempotent
    for call in (lambda: s.turns(cid), lambda: s.add_turn(cid, 0, "x", None, "user"), s.create_conversation,
                 lambda: s.has_conversation(cid), lambda: s.count_turns(cid), s.conversations):
        with pytest.raises(StoreError, match="closed"):
            call()
    s2 = open_store(store_url)  # the schema is already there: nothing migrates twice
    (back,) = s2.turns(cid)
    assert same(back, t) and np.array_equal(back.codes, codes(4))
    assert s2.add_turn(cid, 1, "next", None, "user").index == 1
    assert [(d["id"], d["turns"], d["metadata"]) for d in s2.conversations()] == [(cid, 2, {"title": "kept"})]
    s2.close()


def test_file_persistence_wal_and_reopen(tmp_path):
    path = tmp_path / "sub" / "dir" / "conv.db"
    s = open_store(f"sqlite:///{path}")  # absolute path: four slashes
    assert s.path == str(path)
    cid = s.create_conversation()
    t = s.add_turn(cid, 0, "kept", codes(4), "generated")
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.turns(cid)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    con.close()
    s2 = open_store(str(path))
    (back,) = s2.turns(cid)
    assert same(back, t) and np.array_equal(back.codes, codes(4))
    assert s2.add_turn(cid, 1, "next", None, "user").index == 1
    assert s2._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert s2._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    s2.close()


def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("sqlite://:memory:", "sqlite://", ":memory:"):
        s = open_store(url)
        assert s.path == ":memory:" and s.has_conversation(s.create_conversation())
        s.close()
    s = open_store("sqlite:///rel/conv.db")
    s.close()
    assert (tmp_path / "rel" / "conv.db").is_file()
    with pytest.raises(ValueError, match="supported: sqlite:///path.db.*postgresql://") as e:
        open_store("mysql://user:pw@db/x")
    assert "pw" not in str(e.value)
    with pytest.raises(ValueError, match="bad sqlite store URL"):
        open_store("sqlite://host/x.db")


def test_migration_from_empty_file_and_too_new_version(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    s = SQLiteStore(path)
    tables = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversations", "turns"} <= tables
    s.close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    con.close()
    with pytest.raises(StoreError, match=f"schema version {len(MIGRATIONS) + 1}, newer"):
        SQLiteStore(path)
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        SQLiteStore(tmp_path / "junk.db")
    with pytest.raises(StoreError, match="cannot open"):  # a directory
        SQLiteStore(tmp_path)


def test_unknown_conversation(store):
    for call in (lambda: store.add_turn("missing", 0, "x", None, "user"), lambda: store.turns("missing"),
                 lambda: store.count_turns("missing")):
        with pytest.raises(UnknownConversation, match="unknown conversation 'missing'") as e:
            call()
        assert isinstance(e.value, KeyError) and e.value.conversation_id == "missing"


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(speaker=-1), ValueError, "speaker must be a non-negative int"),
    (dict(speaker=True), TypeError, "speaker"),
    (dict(speaker=1.0), TypeError, "speaker"),
    (dict(text=None), TypeError, "text must be a str"),
    (dict(text=" ", codes=None), ValueError, "needs non-empty text or audio codes"),
    (dict(codes=np.zeros((3, 2), np.float32)), TypeError, "integer array"),
    (dict(codes=np.zeros((3, 2), bool)), TypeError, "integer array"),
    (dict(codes=np.zeros(3, np.int32)), ValueError, "2-D"),
    (dict(codes=np.zeros((3, 0), np.int32)), ValueError, "2-D"),
    (dict(codes=np.full((2, 2), 65536)), ValueError, r"in \[0, 65535\]"),
    (dict(codes=np.full((2, 2), -1)), ValueError, r"in \[0, 65535\]"),
    (dict(source="bot"), ValueError, "source must be one of"),
    (dict(conversation_id=5), TypeError, "conversation_id must be a str"),
])
def test_bad_arguments(store, kwargs, err, match):
    args = dict(conversation_id=store.create_conversation(), speaker=0, text="ok", codes=None, source="user")
    args.update(kwargs)
    with pytest.raises(err, match=match):
        store.add_turn(**args)
    if isinstance(args["conversation_id"], str):
        assert store.count_turns(args["conversation_id"]) == 0


def test_bad_listing_and_metadata_arguments(store):
    with pytest.raises(ValueError, match="limit"):
        store.turns(store.create_conversation(), limit=-1)
    with pytest.raises(TypeError, match="limit"):
        store.conversations(limit="3")
    with pytest.raises(TypeError, match="metadata must be a dict"):
        store.create_conversation(["x"])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        store.create_conversation({"x": object()})


def _writers(stores, cid, per_thread=20):
    errors = []

    def work(s, w):
        try:
            for i in range(per_thread):
                s.add_turn(cid, w, f"w{w} t{i}", codes(2, seed=i), "user")
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s, w)) for w, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_concurrent_writers(store_url, shared):
    stores = [open_store(store_url)] * 8 if shared else [open_store(store_url) for _ in range(8)]
    cid = stores[0].create_conversation()
    _writers(stores, cid)
    turns = stores[0].turns(cid)
    assert [t.index for t in turns] == list(range(160))
    assert len({t.turn_id for t in turns}) == 160
    for w in range(8):  # each writer's turns are in its own order
        assert [t.text for t in turns if t.speaker == w] == [f"w{w} t{i}" for i in range(20)]
    for s in set(stores):
        s.close()


# PostgreSQL: the SIGKILL case only (the commit is the server's; how the client dies makes no difference to it).
@pytest.mark.parametrize("backend, how", [("sqlite", "os._exit"), ("sqlite", "SIGKILL"), ("postgres", "SIGKILL")])
def test_turn_survives_crash_after_add_turn(store_url, how):
    s = open_store(store_url)
    cid = s.create_conversation()
    s.close()
    end = "os._exit(0)" if how == "os._exit" else "os.kill(os.getpid(), signal.SIGKILL)"
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from csm_jax.conversation.store import open_store
        s = open_store({store_url!r})
        s.add_turn({cid!r}, 3, "last words", np.arange(24).reshape(3, 8), "generated")
        {end}
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == (0 if how == "os._exit" else -signal.SIGKILL), proc.stderr
    s = open_store(store_url)
    (t,) = s.turns(cid)
    assert (t.speaker, t.text, t.index) == (3, "last words", 0)
    assert np.array_equal(t.codes, np.arange(24).reshape(3, 8))
    s.close()


def test_damaged_or_unusable_files_fail_at_open(tmp_path):
    path = tmp_path / "history.db"
    store = SQLiteStore(path)
    cid = store.create_conversation()
    for i in range(200):  # several pages of turns
        store.add_turn(cid, i % 2, "x" * 400, codes(20, 8, seed=i), "user")
    store.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page: 5 * page] = b"\xa5" * (2 * page)  # two b-tree pages overwritten: the header still looks fine
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged|cannot open"):
        SQLiteStore(path)
    for empty in ("", "   "):
        with pytest.raises(StoreError, match="path is empty"):
            SQLiteStore(empty)
    sqlite3.connect(tmp_path / "ok.db").close()
    SQLiteStore(tmp_path / "ok.db").close()  # a healthy file opens (and takes the write probe)


# PostgreSQL's own: schema migrations, several server processes, an unreachable server, the server lost mid-run.


def _admin(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def test_postgres_open_store_and_schema_migrations(postgres_cluster):
    from csm_jax.conversation import PostgresStore
    from csm_jax.conversation.postgres import MIGRATIONS as PG_MIGRATIONS

    url = postgres_cluster.create_database()
    results: list = []

    def open_one():  # four processes starting at once on an empty database: one migrates, the others wait
        try:
            results.append(open_store(url))
        except Exception as e:  # noqa: BLE001 (surfaced by the assertion below)
            results.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(s, PostgresStore) for s in results), results
    cid = results[0].create_conversation()
    assert results[3].has_conversation(cid)
    for s in results:
        s.close()
    with _admin(url) as con:
        assert con.execute("SELECT version FROM csm_jax_schema").fetchall() == [(len(PG_MIGRATIONS),)]
        tables = {r[0] for r in con.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert tables == {"conversations", "turns", "csm_jax_schema"}
    s = open_store(url.replace("postgresql://", "postgres://"))  # both schemes; reopening migrates nothing
    assert isinstance(s, PostgresStore) and s.has_conversation(cid) and s.url == url
    s.close()
    with _admin(url) as con:
        con.execute("UPDATE csm_jax_schema SET version = %s", (len(PG_MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match=f"schema version {len(PG_MIGRATIONS) + 1}, newer"):
        open_store(url)
    ro = postgres_cluster.create_database()  # a database that takes no writes fails at open, not on a turn
    with _admin(ro) as con:
        con.execute(f"ALTER DATABASE {ro.rsplit('/', 1)[1]} SET default_transaction_read_only = on")
    with pytest.raises(StoreError, match=r"cannot open the conversation store .*read-only transaction"):
        open_store(ro)


def test_postgres_rejects_what_it_cannot_store(postgres_cluster):
    s = open_store(postgres_cluster.create_database())
    cid = s.create_conversation()
    with pytest.raises(ValueError, match="NUL"):
        s.add_turn(cid, 0, "a\x00b", None, "user")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        s.create_conversation({"x": float("nan")})
    assert not s.has_conversation("a\x00")
    with pytest.raises(UnknownConversation):
        s.turns("a\x00")
    assert s.count_turns(cid) == 0 and len(s.conversations()) == 1
    s.close()


def test_postgres_two_servers_append_to_one_conversation(postgres_cluster):
    url = postgres_cluster.create_database()
    a, b = open_store(url), open_store(url)  # two pools: as two server processes
    cid = a.create_conversation()
    for i in range(6):  # alternately: each sees the other's turns and continues the numbering
        s = (a, b)[i % 2]
        assert s.add_turn(cid, i % 2, f"alt {i}", codes(2, seed=i), "user").index == i
    assert [t.text for t in b.turns(cid)] == [t.text for t in a.turns(cid)] == [f"alt {i}" for i in range(6)]
    _writers([a, b] * 4, cid, per_thread=10)  # and at the same time: 8 threads, 4 on each store
    turns = b.turns(cid)
    assert [t.index for t in turns] == list(range(86)) and len({t.turn_id for t in turns}) == 86
    for w in range(8):  # none lost or duplicated, each writer's turns in its own order
        assert [t.text for t in turns[6:] if t.speaker == w] == [f"w{w} t{i}" for i in range(10)]
    assert a.count_turns(cid) == 86 and a.conversations()[0]["turns"] == 86
    a.close()
    b.close()


def test_postgres_unreachable_at_open_fails_fast_and_clearly(postgres_cluster):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = set(threading.enumerate())
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        open_store(f"postgresql://csm:s3cret@127.0.0.1:{port}/history")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert f"postgresql://csm@127.0.0.1:{port}/history" in msg and "Connection refused" in msg, msg
    assert "s3cret" not in msg and "\n" not in msg
    with pytest.raises(StoreError, match='database "missing" does not exist'):
        open_store(postgres_cluster.url("missing"))
    with pytest.raises(StoreError, match="bad PostgreSQL store URL") as e:
        open_store("postgresql://csm:s3cret@[::1/history")
    assert "s3cret" not in str(e.value)
    assert set(threading.enumerate()) <= threads  # no pool left behind, retrying in the background


def test_postgres_server_lost_mid_run(new_postgres_cluster):
    from csm_jax.conversation import PostgresStore

    cluster = new_postgres_cluster
    url = cluster.create_database()
    s = PostgresStore(url, timeout=0.5)  # how long a call waits for a connection before it gives up
    cid = s.create_conversation()
    first = s.add_turn(cid, 0, "first", codes(3), "user")
    with _admin(url) as con:  # a commit that stalls, so the server can die between the INSERT and the COMMIT
        con.execute("CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$")
        con.execute("CREATE CONSTRAINT TRIGGER stall AFTER INSERT ON turns DEFERRABLE INITIALLY DEFERRED "
                    "FOR EACH ROW EXECUTE FUNCTION stall()")
    failed: list = []

    def half_written():
        try:
            s.add_turn(cid, 1, "half", codes(3, seed=1), "generated")
        except Exception as e:  # noqa: BLE001 (checked below)
            failed.append(e)
        else:
            failed.append(None)

    writer = threading.Thread(target=half_written)
    writer.start()
    deadline = time.monotonic() + 20
    with _admin(url) as con:
        while not con.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'").fetchone():
            assert time.monotonic() < deadline, "the stalled commit never started"
            time.sleep(0.05)
    cluster.stop("immediate")  # the server crashes mid-commit
    writer.join(30)
    assert len(failed) == 1 and isinstance(failed[0], StoreError), failed
    assert "is unavailable" in str(failed[0]) and s.url in str(failed[0])
    for call in (lambda: s.add_turn(cid, 1, "while down", None, "user"), lambda: s.turns(cid),
                 lambda: s.count_turns(cid), lambda: s.has_conversation(cid), s.create_conversation,
                 s.conversations):
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="is unavailable") as e:
            call()
        assert time.monotonic() - t0 < 3, call
        assert s.url in str(e.value)
    assert "Connection refused" in str(e.value)  # the reason of the pool's last attempt
    cluster.start()
    deadline = time.monotonic() + 30
    while True:  # the pool reconnects by itself
        try:
            n = s.count_turns(cid)
            break
        except StoreError:
            assert time.monotonic() < deadline, "the store did not recover after the server came back"
            time.sleep(0.2)
    with _admin(url) as con:
        con.execute("DROP TRIGGER stall ON turns")
        assert con.execute("SELECT count(*) FROM turns").fetchone() == (1,)  # nothing half-written
    assert n == 1 and [t.text for t in s.turns(cid)] == ["first"]
    assert s.conversations()[0]["updated_at"] == first.created_at  # the lost turn's UPDATE was rolled back too
    assert s.add_turn(cid, 1, "after", None, "generated").index == 1
    s.close()
