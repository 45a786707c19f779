"""A real server process on the default model, for the server, client and web-page tests.

`live_server` (session scoped) is shared; `start_server_process` starts a private one (e.g. to `kill -9` it).
All processes share one persistent XLA compilation cache, so only the first start pays for compilation.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"websocket: (ws://\S+)")
START_TIMEOUT_S = 600


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
    """`python -m serve` on a free port with its database in `workdir`; returns once it is accepting."""
    db_path = db_path or workdir / "conversations.db"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as in production
    cmd = [sys.executable, "-m", "serve", "server.port=0", f"storage.path={db_path}",
           f"engine.compile_cache_dir={cache_dir}", "engine.warmup_rows=128", "engine.batch_size=4",
           f"hydra.run.dir={workdir / 'hydra'}", *overrides]
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
def xla_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xla-cache")


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory, xla_cache: Path) -> Iterator[LiveServer]:
    server = start_server_process(tmp_path_factory.mktemp("live-server"), xla_cache)
    yield server
    server.stop()
