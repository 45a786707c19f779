"""Throwaway PostgreSQL clusters for the store tests: `postgres_cluster` (one per test session) and
`new_postgres_cluster` (a private one a test may stop and restart).

Each cluster is a fresh `initdb` in a temporary directory, served on a free 127.0.0.1 port with trust
authentication, and stopped and deleted at the end; no system service is used. The binaries come from
`pg_config --bindir`, then /usr/lib/postgresql/*/bin (Debian's `postgresql` package; scripts/test.sh installs it),
then PATH. PostgreSQL refuses to run as root, so under root the server runs as the `postgres` system user (made by
the Debian package), else `nobody`. If no cluster can be started the tests FAIL: they never skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bindir() -> Path:
    candidates = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], check=False, capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(out.stdout.strip())
    # Debian: one directory per major version; the newest first. Then whatever initdb is on PATH.
    versions = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p).parent.name.isdigit()]
    candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    for d in candidates:
        if all(os.access(Path(d) / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found via `pg_config --bindir`, "
                "/usr/lib/postgresql/*/bin or PATH: install the Debian package `postgresql` (scripts/test.sh does)",
                pytrace=False)


def _run_as() -> str | None:
    """The unprivileged user to run the server as when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    pytest.fail("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as",
                pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One private PostgreSQL server: `url(db)`, `create_database()`, `stop(mode)`, `start()`, `destroy()`."""

    def __init__(self) -> None:
        self.bindir, self.user = _bindir(), _run_as()
        # Directly under /tmp (not pytest's tmp_path, whose root-only parent the server user cannot enter); the
        # socket directory must also stay short (sun_path holds ~107 bytes).
        self.base = Path(tempfile.mkdtemp(prefix="csm-pg-"))
        self.data, self.log = self.base / "data", self.base / "server.log"
        self.port = 0
        if self.user is not None:
            info = pwd.getpwnam(self.user)
            os.chown(self.base, info.pw_uid, info.pw_gid)
        try:
            self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "--locale=C",
                     "--encoding=UTF8")
            self.start()
        except BaseException:
            self.destroy()
            raise

    def _pg(self, binary: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / binary), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if check and proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            pytest.fail(f"PostgreSQL: `{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                        f"\nserver log:\n{log}", pytrace=False)
        return proc

    def start(self) -> None:
        """Start the server: on its previous port after a stop, on a free port the first time."""
        for attempt in range(3):  # a free port can be taken between probing and binding it
            port = self.port or _free_port()
            opts = (f"-k {self.base} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100 "
                    "-c shared_buffers=16MB")
            proc = self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                            "start", check=self.port != 0 or attempt == 2)
            if proc.returncode == 0:
                self.port = port
                return

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode "immediate" is a crash (no checkpoint; connections cut)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return self._pg("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database -> its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def empty_database(self, name: str = "store_suite") -> str:
        """The URL of database `name`, empty: created the first time, its public schema dropped and made again
        after (much faster than a new database; every store of the previous user must be closed)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f"CREATE DATABASE {name}")
                return self.url(name)
        with psycopg.connect(self.url(name), autocommit=True, connect_timeout=10) as conn:
            conn.execute("SET lock_timeout = '10s'")  # a store left open by a failed test: an error, not a hang
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
        return self.url(name)

    def destroy(self) -> None:
        if self.data.exists() and self.running():
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL server; tests take a new database with `create_database()`, or the emptied
    shared one with `empty_database()`."""
    cluster = PostgresCluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def new_postgres_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL server for one test (which may stop, crash and restart it)."""
    cluster = PostgresCluster()
    yield cluster
    cluster.destroy()
