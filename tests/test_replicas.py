"""Scale out: several real server processes (`python -m serve`) on one real PostgreSQL history.

One conversation is served alternately by two replicas and survives `kill -9` of one of them; the database is
lost (crashed) and restored under a running server. The module shares one private PostgreSQL cluster (it is
crashed and restarted here, so not the session's) and one replica (`server_b`).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres_fixture import PostgresCluster
from serve_fixtures import Client, LiveServer, run, start_server_process

CHEAP = ("transcriber.backend=none",)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """This module's PostgreSQL server (test_the_database_lost_mid_run crashes and restarts it)."""
    cluster = PostgresCluster()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def database(cluster: PostgresCluster) -> str:
    return cluster.create_database()


def replica(workdir: Path, xla_cache: Path, database: str) -> LiveServer:
    return start_server_process(workdir, xla_cache, f"storage.url={database}", *CHEAP)


@pytest.fixture(scope="module")
def server_b(tmp_path_factory: pytest.TempPathFactory, xla_cache: Path, database: str) -> Iterator[LiveServer]:
    server = replica(tmp_path_factory.mktemp("replica-b"), xla_cache, database)
    yield server
    server.stop()


def history(turns: dict[str, Any]) -> list[tuple[Any, ...]]:
    """(turn_id, index, text, speaker, frames, source) of each turn of a `history` event."""
    assert turns["type"] == "history", turns
    return [(t["turn_id"], t["index"], t["text"], t["speaker"], t["frames"], t["source"]) for t in turns["turns"]]


def test_two_replicas_serve_one_conversation_and_survive_a_kill_9(
        tmp_path: Path, xla_cache: Path, database: str, server_b: LiveServer) -> None:
    """A -> B -> A on one conversation (each resume sees every turn the other replica stored), both list the same
    history; A is SIGKILLed right after an acknowledgement with the next response in flight, and B still has every
    acknowledged turn, in order, and carries the conversation on."""
    server_a = replica(tmp_path, xla_cache, database)
    acked: list[tuple[Any, ...]] = []  # what the clients were told is stored: (turn_id, index, text, speaker, frames)

    async def say(c: Client, text: str, speaker: int, ms: int) -> dict[str, Any]:
        started, done, frames = await c.say(text, speaker=speaker, max_audio_ms=ms, seed=len(acked))
        assert started["context_turns"] == len(acked) and done["frames"] == len(frames) > 0, (started, done)
        assert isinstance(done["turn_id"], int), done
        acked.append((done["turn_id"], len(acked), text, speaker, done["frames"], "generated"))
        return started

    async def go() -> tuple[Any, ...]:
        a1 = await Client.open(server_a.ws_url)
        cid = (await a1.start())["conversation_id"]
        await say(a1, "One on A.", 0, 160)
        await a1.close()
        b = await Client.open(server_b.ws_url)
        on_b = await b.start(cid)
        await say(b, "Two on B.", 1, 240)
        a2 = await Client.open(server_a.ws_url)
        again_on_a = await a2.start(cid)
        await say(a2, "Three on A.", 0, 160)
        both = history(await a2.request({"type": "history"})), history(await b.request({"type": "history"}))
        await say(a2, "Four on A.", 1, 160)
        # the next response is in flight (started, far from done) when A dies right after acknowledging "Four"
        assert (await a2.request({"type": "say", "text": "Never stored.", "speaker": 0, "max_audio_ms": 4000}))[
            "type"] == "response.started"
        server_a.stop(kill=True)
        after_kill = history(await b.request({"type": "history"}))
        await say(b, "Five on B.", 0, 160)
        final = history(await b.request({"type": "history"}))
        again_on_b = await b.start(cid)
        await b.close()
        return on_b, again_on_a, both, after_kill, final, again_on_b

    try:
        on_b, again_on_a, both, after_kill, final, again_on_b = run(go())
    finally:
        server_a.stop(kill=True)
    assert server_a.process.returncode == -9
    assert on_b["resumed"] and on_b["turns"] == 1 and again_on_a["resumed"] and again_on_a["turns"] == 2
    assert both[0] == both[1] == acked[:3]  # either replica: every turn, in order, with its id and frame count
    assert after_kill == acked[:4]  # every acknowledged turn survived A's SIGKILL; the one in flight left nothing
    assert final == acked and [t[1] for t in final] == [0, 1, 2, 3, 4]
    assert again_on_b["resumed"] and again_on_b["turns"] == 5


def test_the_database_lost_mid_run(cluster: PostgresCluster, database: str, server_b: LiveServer) -> None:
    """PostgreSQL crashes (`pg_ctl stop -m immediate`) while a response waits to store its turn, and stays down a
    while: the response ends with `storage_failed`, requests that need the database get `storage_unavailable`
    at once (no hang, no crash), connections stay usable, new ones open and /health answers. Once the database is
    back the server reconnects by itself, and the history holds exactly the acknowledged turns."""

    def waiting_writers() -> int:
        with psycopg.connect(database, autocommit=True, connect_timeout=10) as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'csm-jax' AND "
                                "wait_event_type = 'Lock'").fetchone()[0]

    def health() -> dict[str, Any]:
        with urllib.request.urlopen(server_b.http_url + "health", timeout=30) as r:
            return json.loads(r.read())

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        c = await Client.open(server_b.ws_url)
        cid = (await c.start())["conversation_id"]
        other = await Client.open(server_b.ws_url)
        other_cid = (await other.start())["conversation_id"]
        _, before, _ = await c.say("Before.", max_audio_ms=160)
        # Hold the conversation's row lock, so the next response's add_turn waits inside its transaction; then crash
        # the database under that open transaction.
        lock = psycopg.connect(database, connect_timeout=10)
        lock.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (cid,))
        try:
            out["lost_started"] = await c.request({"type": "say", "text": "Lost.", "speaker": 0,
                                                   "max_audio_ms": 160, "id": "lost"})
            deadline = time.monotonic() + 120
            while not await asyncio.to_thread(waiting_writers):
                assert time.monotonic() < deadline, "the response never tried to store its turn"
                await asyncio.sleep(0.1)
            await asyncio.to_thread(cluster.stop, "immediate")
        finally:
            lock.close()
        frames, message = 0, None
        while isinstance(message := await asyncio.wait_for(c.ws.recv(), 120), bytes):
            frames += 1
        out["lost_frames"], out["lost"] = frames, json.loads(message)

        # the database is down
        t0 = time.monotonic()
        out["down_say"] = await c.request({"type": "say", "text": "Down.", "speaker": 0, "max_audio_ms": 160,
                                           "id": "down"})
        out["down_s"] = time.monotonic() - t0
        out["down_history"] = await c.request({"type": "history", "id": "h"})
        fresh = await Client.open(server_b.ws_url)  # new connections still open (and get clear errors)
        out["other_say"], out["fresh_start"] = await asyncio.gather(  # other connections, side by side
            other.request({"type": "say", "text": "Other down.", "speaker": 0, "max_audio_ms": 160}),
            fresh.request({"type": "session.start"}))
        out["fresh_cancel"] = await fresh.request({"type": "cancel"})  # a request without the database
        out["health"] = await asyncio.to_thread(health)
        out["alive"] = server_b.process.poll() is None
        await fresh.close()

        await asyncio.to_thread(cluster.start)  # the database is back: the pool reconnects by itself
        t0 = time.monotonic()
        _, after, _ = await c.say("After.", max_audio_ms=160)
        out["recover_s"] = time.monotonic() - t0
        _, other_after, _ = await other.say("Other after.", max_audio_ms=160)
        out["history"] = history(await c.request({"type": "history"}))
        out["other_history"] = history(await other.request({"type": "history"}))
        out["acked"] = [before["turn_id"], after["turn_id"]], [other_after["turn_id"]]
        await c.close()
        await other.close()
        with psycopg.connect(database, autocommit=True, connect_timeout=10) as conn:
            out["rows"] = conn.execute("SELECT conversation_id, idx, text FROM turns WHERE conversation_id IN "
                                       "(%s, %s) ORDER BY conversation_id = %s DESC, idx",
                                       (cid, other_cid, cid)).fetchall()
        out["cids"] = cid, other_cid
        return out

    out = run(go())
    cid, other_cid = out["cids"]
    assert out["lost_started"]["type"] == "response.started" and out["lost_frames"] == 2
    assert out["lost"]["type"] == "error" and out["lost"]["code"] == "storage_failed", out["lost"]
    assert out["lost"]["id"] == "lost"
    for key, reply in (("down_say", "down"), ("down_history", "h"), ("other_say", None), ("fresh_start", None)):
        event = out[key]
        assert event["type"] == "error" and event["code"] == "storage_unavailable", (key, event)
        assert "nothing was stored" in event["message"] and event.get("id") == reply, (key, event)
        assert "postgresql://" not in event["message"]  # the database's address stays in the server log
    assert out["down_s"] < 30, "a request while the database is down must fail within the pool timeout"
    assert out["fresh_cancel"]["code"] == "no_response" and out["health"]["status"] == "ok" and out["alive"]
    acked, other_acked = out["acked"]
    assert [(t[0], t[1], t[2]) for t in out["history"]] == [(acked[0], 0, "Before."), (acked[1], 1, "After.")]
    assert [(t[0], t[1], t[2]) for t in out["other_history"]] == [(other_acked[0], 0, "Other after.")]
    assert out["rows"] == [(cid, 0, "Before."), (cid, 1, "After."), (other_cid, 0, "Other after.")]
    assert server_b.process.poll() is None
    print(f"request while the database was down: {out['down_s']:.1f} s; first say after it was back: "
          f"{out['recover_s']:.1f} s")
