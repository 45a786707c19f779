"""scripts/dev.sh, the bootstrap of the README's two commands: it installs csm-jax into the venv on first use, when
pyproject.toml changes, and when the venv was last installed from another checkout (a shared CSM_JAX_VENV), and
otherwise leaves the venv alone. The venv here is a stub whose python records how it was called."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _venv(tmp_path: Path) -> tuple[Path, Path]:
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    py.chmod(0o755)
    return venv, log


def _bootstrap(venv: Path, which: str = "runtime") -> subprocess.CompletedProcess:
    env = {**os.environ, "CSM_JAX_VENV": str(venv)}
    return subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/dev.sh" {which} && echo "PY=$PY"'],
                          env=env, capture_output=True, text=True, timeout=60)


def test_installs_once_then_again_for_another_checkout(tmp_path):
    venv, log = _venv(tmp_path)
    first = _bootstrap(venv)
    assert first.returncode == 0, first.stderr
    assert "first run only" in first.stderr and f"-e {ROOT}" in log.read_text()
    assert (venv / ".csm-jax-runtime").read_text().strip() == str(ROOT)
    assert f"PY={venv}/bin/python" in first.stdout

    log.unlink()
    again = _bootstrap(venv)
    assert again.returncode == 0 and "installing" not in again.stderr and not log.exists()

    (venv / ".csm-jax-runtime").write_text("/elsewhere/csm-jax\n")  # the venv served another clone last
    moved = _bootstrap(venv)
    assert moved.returncode == 0, moved.stderr
    assert "installed from another checkout" in moved.stderr and f"-e {ROOT}" in log.read_text()
    assert (venv / ".csm-jax-runtime").read_text().strip() == str(ROOT)


def test_a_failed_install_stops_with_one_line(tmp_path):
    venv, _ = _venv(tmp_path)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 3\n")
    out = _bootstrap(venv)
    assert out.returncode == 1 and "installing runtime dependencies failed" in out.stderr
    assert not (venv / ".csm-jax-runtime").exists()
