"""The serving frame (`csm_jax.serving.frame`) and the scheduler built on it: one compiled call per frame holding
the CSM step and the Mimi decode with no conditional and no host callback, row buckets, batched prefill, and
outputs identical to the library's generator (fp32)."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from csm_jax.default_model import random_generator
from csm_jax.serving.frame import ServingFrame, row_buckets
from csm_jax.serving.scheduler import Request, Scheduler

TEXTS = ["Hello there.", "How are you today?", "Yes.", "It is a fine day for a walk in the park, is it not?",
         "Good.", "See you soon."]


@pytest.fixture(scope="module")
def gen():
    return random_generator(0)


def _expected(gen, text: str, seed: int, max_frames: int, top_k: int = 50):
    tokens, mask = gen.prompt(text, 0)
    codes = gen.generate_codes(tokens, mask, max_frames=max_frames, temperature=0.9, top_k=top_k, seed=seed,
                               code_limit=gen.codec.config.codebook_size)
    chunks = list(gen.stream(text, 0, max_audio_ms=max_frames * 80, temperature=0.9, top_k=top_k, seed=seed))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return codes, (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


def test_row_buckets():
    assert row_buckets(16) == (1, 2, 4, 8, 16)
    assert row_buckets(6) == (1, 2, 4, 6)
    assert row_buckets(1) == (1,)


def test_one_executable_per_frame_without_branches_or_host_calls(gen):
    frames = ServingFrame(gen.engine(4), gen.codec)
    for rows in (1, 4):
        hlo = frames.compiled_text(rows)
        assert len(re.findall(r"^HloModule ", hlo, re.MULTILINE)) == 1
        ops = set(re.findall(r"=\s*[^\s]+\s+([a-z][a-z0-9-]*)\(", hlo))
        assert "conditional" not in ops, "a branch in the frame: XLA:GPU would synchronise with the host"
        for host in ("outfeed", "infeed", "send", "recv", "host-compute"):
            assert host not in ops
        assert "callback" not in hlo.lower()
        assert "convolution" in ops  # the Mimi vocoder is in this executable ...
        assert "dot" in ops or "multiply" in ops  # ... with the CSM transformer
        assert re.search(rf"s16\[{rows},{gen.codec.frame_size}\]", hlo)  # and PCM comes out of it


def test_scheduler_equals_the_generator_with_batched_prefill_and_row_buckets(gen):
    """Requests waiting together are prefilled by one call; each gets exactly the codes and PCM the generator
    gives it alone; a lone request computes one row per frame."""
    sched = Scheduler(gen, batch_size=4)
    results, frames, done = {}, {i: [] for i in range(len(TEXTS))}, threading.Event()
    max_frames = [6, 9, 4, 12, 5, 7]

    def submit(i: int) -> None:
        tokens, mask = gen.prompt(TEXTS[i], 0)
        sched.submit(Request(tokens, mask, max_frames[i], 0.9, 50, 100 + i, frames[i].append,
                             lambda r, i=i: (results.__setitem__(i, r), len(results) == len(TEXTS) and done.set())))

    sizes, prefill = [], sched.frames.prefill
    sched.frames.prefill = lambda rows, *a, **k: (sizes.append(len(rows)), prefill(rows, *a, **k))[1]
    for i in range(len(TEXTS)):  # queued before the engine thread starts: admitted together
        submit(i)
    sched.start()
    try:
        assert done.wait(300)
    finally:
        sched.stop()
    assert sizes[0] == 4 and sum(sizes) == len(TEXTS) and len(sizes) == sched.prefills  # 4 slots: 4 in one call
    for i in range(len(TEXTS)):
        want_codes, want_pcm = _expected(gen, TEXTS[i], 100 + i, max_frames[i])
        np.testing.assert_array_equal(results[i].codes, want_codes)
        got = np.concatenate(frames[i]) if frames[i] else np.zeros(0, np.int16)
        assert got.dtype == np.int16
        assert got.shape == want_pcm.shape  # PCM within one step of 16-bit rounding (the scaling is fused on device)
        assert np.abs(got.astype(np.int32) - want_pcm).max() <= 1
        assert results[i].stop_reason == ("eos" if len(want_codes) < max_frames[i] else "max_length")

    lone = Scheduler(gen, batch_size=4)
    finished = threading.Event()
    tokens, mask = gen.prompt(TEXTS[1], 0)
    lone.submit(Request(tokens, mask, 8, 0.9, 50, 7, lambda pcm: None, lambda r: finished.set()))
    lone.start()
    try:
        assert finished.wait(300)
    finally:
        lone.stop()
    assert lone.steps >= 1 and lone.rows_computed == lone.steps  # one row per frame, not four
