"""Serving on a device mesh (`mesh:` in configs/serve.yaml): the default model served through the server's own path
(`build_generator` on `serving_mesh`, then the Scheduler's one compiled ServingFrame call per frame) gives the same
codes and PCM on data=2 x tensor=2 (weights and heads over tensor, requests over data) as on one device; the real
server starts on a mesh and answers; a mesh that does not fit stops the server at start with one line.

The 8 virtual CPU devices come from tests/conftest.py (XLA_FLAGS, set before jax is imported); server processes
get theirs from JAX_NUM_CPU_DEVICES, since `start_server_process` drops XLA_FLAGS.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from serve_fixtures import FRAME_BYTES, RANDOM_MODEL, ROOT, Client, run, start_server_process
from xla_env import subprocess_env

from csm_jax.serving.config import MeshConfig, ModelConfig, ServeConfig
from csm_jax.serving.scheduler import Request, Result, Scheduler
from csm_jax.serving.server import build_generator, serving_mesh

# (text, speaker, seed, max_frames): three requests admitted together into rows 0..2 of an 8-row batch, so each frame
# computes the 4-row bucket (the sliced-state path of ServingFrame) and rows stop at different frames
REQUESTS = [("Hello there.", 0, 11, 5), ("A somewhat longer sentence, to be said.", 1, 12, 7), ("Hi!", 0, 13, 6)]


def serve(mesh_config: MeshConfig) -> tuple[list[tuple[np.ndarray, np.ndarray]], Scheduler]:
    """REQUESTS through the server's generator and scheduler on `mesh_config` -> [(codes [T, K], pcm int16
    [T*1920])]."""
    config = ServeConfig(model=ModelConfig(random_seed=0), mesh=mesh_config)
    generator, _ = build_generator(config, serving_mesh(config.mesh))
    scheduler = Scheduler(generator, batch_size=8)
    results: list[Result | None] = [None] * len(REQUESTS)
    pcm: list[list[np.ndarray]] = [[] for _ in REQUESTS]
    done = [threading.Event() for _ in REQUESTS]

    def finish(i: int, result: Result) -> None:
        results[i] = result
        done[i].set()

    for i, (text, speaker, seed, frames) in enumerate(REQUESTS):
        tokens, mask = generator.text_rows(text, speaker)
        scheduler.submit(Request(tokens, mask, frames, 0.9, 50, seed, on_frame=lambda p, i=i: pcm[i].append(p.copy()),
                                 on_done=lambda r, i=i: finish(i, r)))
    scheduler.start()  # after the submits: all three are admitted together, in the same rows on every mesh
    try:
        for event in done:
            assert event.wait(600), "the scheduler did not finish the requests"
    finally:
        scheduler.stop()
    out = []
    for (_, _, _, frames), result, chunks in zip(REQUESTS, results, pcm):
        assert result is not None and result.stop_reason == "max_length" and result.error is None, result
        assert result.frames == frames == len(chunks)
        out.append((result.codes, np.concatenate(chunks)))
    return out, scheduler


def test_served_codes_and_pcm_on_a_mesh_equal_one_device() -> None:
    assert jax.device_count() == 8
    assert serving_mesh(MeshConfig()) is None  # the default 1 x 1: one device, unsharded, as before
    single, _ = serve(MeshConfig())
    for mesh_config in (MeshConfig(data=2, tensor=2),):  # tensor=2 alone: the server test below
        sharded, scheduler = serve(mesh_config)
        mesh = scheduler.frames.engine.mesh
        assert dict(mesh.shape) == {"data": mesh_config.data, "tensor": mesh_config.tensor}
        engine = scheduler.frames.engine
        kernel = engine.params["backbone"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("tensor", None)  # params really are split
        # after the served frames the decode state keeps the engine's layout (KV caches [batch, kv_heads, hd, seq]
        # rows over data, KV heads over tensor), so frames do not reshard the caches
        laid_out = engine.init_state()
        for a, b in zip(jax.tree_util.tree_leaves(scheduler.frames.state), jax.tree_util.tree_leaves(laid_out)):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
        assert tuple(laid_out.caches[0]["k"].sharding.spec)[:2] == ("data", "tensor")
        for (codes, pcm), (codes_s, pcm_s) in zip(single, sharded):
            np.testing.assert_array_equal(codes_s, codes)
            assert np.abs(pcm_s.astype(np.int32) - pcm.astype(np.int32)).max() <= 1  # within 1 LSB


def test_the_server_starts_on_a_mesh_and_answers(tmp_path: Path, xla_cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "8")  # the server process's devices (XLA_FLAGS is not passed on)
    server = start_server_process(tmp_path, xla_cache, "mesh.tensor=2")
    try:
        async def go() -> tuple[dict, dict, list[bytes]]:
            c = await Client.open(server.ws_url)
            await c.start()
            started, done, frames = await c.say("Hello there.", speaker=0, max_audio_ms=320, seed=11)
            await c.close()
            return started, done, frames

        _, done, frames = run(go())
    finally:
        server.stop()
    assert done["stop_reason"] == "max_length" and done["frames"] == 4 == len(frames)
    assert all(len(f) == FRAME_BYTES for f in frames)
    assert any("serving on a mesh of data=1 x tensor=2 (2 of 8 cpu devices)" in line for line in server.log)


@pytest.mark.parametrize("overrides, message", [
    (["mesh.tensor=16"], "csm-jax: mesh data=1 x tensor=16 needs 16 devices, have 8 (cpu on this host)"),
    (["mesh.data=-1", "mesh.tensor=3"], ("csm-jax: mesh data=-1 needs the device count (8) to be a multiple of "
                                         "tensor=3 (cpu on this host)")),
    (["mesh.tensor=8"], "csm-jax: mesh tensor=8 does not divide the model's 4 attention heads"),
])
def test_a_mesh_that_does_not_fit_stops_the_server_with_one_line(tmp_path: Path, overrides: list[str],
                                                                 message: str) -> None:
    env = subprocess_env(8)
    proc = subprocess.run([sys.executable, "-m", "serve", "server.port=0", f"storage.path={tmp_path / 'db'}",
                           "engine.warmup_rows=0", RANDOM_MODEL, f"hydra.run.dir={tmp_path}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in proc.stderr
