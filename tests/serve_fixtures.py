"""A real server process on the tiny random model, for the server, client and web-page tests, and a thin WebSocket
protocol driver (`Client`).

`live_server` (session scoped) is shared; `start_server_process` starts a private one (e.g. to `kill -9` it).
All processes share one persistent XLA compilation cache, so only the first start pays for compilation. They start
without warmup (`engine.warmup_rows=0`): the few shapes the tests' short turns use compile on first use, into that
cache, instead of every prefill bucket at every start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chat_server import ChatServer
from websockets.asyncio.client import ClientConnection, connect
from xla_env import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"websocket: (ws://\S+)")
START_TIMEOUT_S = 600
FRAME_BYTES = 1920 * 2
RANDOM_MODEL = "model.random_seed=0"  # the tiny random model (csm_jax.default_model.random_generator(0))


@dataclasses.dataclass
class LiveServer:
    process: subprocess.Popen
    http_url: str  # "http://127.0.0.1:PORT/"
    ws_url: str  # "ws://127.0.0.1:PORT/ws"
    db_path: Path
    log: list[str]

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
        self.process.wait(timeout=60)


def start_server_process(workdir: Path, cache_dir: Path, *overrides: str, db_path: Path | None = None) -> LiveServer:
    """`python -m serve` on a free port with its database in `workdir`; returns once it is accepting. It serves the
    tiny random model (RANDOM_MODEL: these tests are about the server) unless `overrides` name a model."""
    db_path = db_path or workdir / "conversations.db"
    env = subprocess_env()  # one CPU device, as in production
    model = [] if any(o.startswith(("model.random_seed=", "model.path=")) for o in overrides) else [RANDOM_MODEL]
    cmd = [sys.executable, "-m", "serve", "server.port=0", f"storage.path={db_path}",
           f"engine.compile_cache_dir={cache_dir}", "engine.warmup_rows=0", "engine.batch_size=4",
           f"hydra.run.dir={workdir / 'hydra'}", *model, *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    found: list[str] = []

    def pump() -> None:  # keep draining output so the server never blocks on a full pipe
        for line in proc.stdout:
            log.append(line)
            if not found and (m := READY.search(line)):
                found.append(m.group(1))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(log[-40:]))
        time.sleep(0.1)
    ws_url = found[0]
    return LiveServer(proc, ws_url.replace("ws://", "http://").removesuffix("ws"), ws_url, db_path, log)


@pytest.fixture(scope="session")
def xla_cache() -> Path:
    """The run's persistent compilation cache (tests/conftest.py), shared by both xdist workers' servers."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(scope="session")
def chat() -> Iterator[ChatServer]:
    """A scripted OpenAI-compatible chat server (tests/chat_server.py) for talk-mode replies."""
    yield from ChatServer().serve()


@pytest.fixture(scope="session")
def talk_server(tmp_path_factory: pytest.TempPathFactory, xla_cache: Path, chat: ChatServer) -> Iterator[LiveServer]:
    """A server whose talk-mode replies come from `chat` (shared: tests set `chat.script` before each turn)."""
    server = start_server_process(tmp_path_factory.mktemp("talk-server"), xla_cache, "responder.backend=openai",
                                  f"responder.base_url={chat.url}", "responder.first_token_timeout_s=5",
                                  "turn_taking.end_silence_ms=500")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory, xla_cache: Path) -> Iterator[LiveServer]:
    server = start_server_process(tmp_path_factory.mktemp("live-server"), xla_cache)
    yield server
    server.stop()


class Client:
    """A thin protocol driver over a real websockets connection."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.ready: dict[str, Any] = {}

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Client:
        c = cls(await connect(url, **kwargs))
        c.ready = await c.event()
        assert c.ready["type"] == "ready"
        return c

    async def send(self, event: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(json.dumps(event) if isinstance(event, dict) else event)

    async def event(self) -> dict[str, Any]:
        message = await asyncio.wait_for(self.ws.recv(), 120)
        assert isinstance(message, str), "expected a JSON event, got binary audio"
        return json.loads(message)

    async def request(self, event: dict[str, Any] | str | bytes) -> dict[str, Any]:
        await self.send(event)
        return await self.event()

    async def start(self, conversation_id: str | None = None) -> dict[str, Any]:
        reply = await self.request({"type": "session.start", "conversation_id": conversation_id})
        assert reply["type"] == "session.started", reply
        return reply

    async def say(self, text: str, **fields: Any) -> tuple[dict[str, Any], dict[str, Any], list[bytes]]:
        """-> (response.started, response.done, binary frames)."""
        started = await self.request({"type": "say", "text": text, "speaker": fields.pop("speaker", 0), **fields})
        assert started["type"] == "response.started", started
        frames = []
        while True:
            message = await asyncio.wait_for(self.ws.recv(), 120)
            if isinstance(message, bytes):
                frames.append(message)
                continue
            done = json.loads(message)
            assert done["type"] == "response.done", done
            return started, done, frames

    async def send_audio(self, pcm: bytes, chunk: int, **fields: Any) -> dict[str, Any]:
        """An audio turn; -> the answer to audio.end, or the first error raised while streaming the chunks."""
        assert (await self.request({"type": "audio.start", **fields}))["type"] == "audio.started"
        for i in range(0, len(pcm), chunk):
            await self.send(pcm[i:i + chunk])
        await self.send({"type": "audio.end", "id": "end"})
        events = [await self.event()]
        while events[-1].get("id") != "end":
            events.append(await self.event())
        return events[0]

    async def close(self) -> None:
        await self.ws.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)
