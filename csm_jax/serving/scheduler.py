"""Continuous batching: one engine thread advances every active request in one compiled step per frame.

Requests are admitted into free slots of a fixed-size batch (prefilled one at a time, so prefill compiles once per
length bucket), stepped together, decoded by one batched streaming Mimi decoder, and released on the all-zero
end frame, at their frame limit, or when cancelled; a freed slot is refilled at the next step. Frames and results
are handed to callbacks that must not block (the server forwards them to asyncio with `call_soon_threadsafe`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from csm_jax.csm.engine import PREFILL_BUCKETS
from csm_jax.csm.generator import Generator

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Result:
    """How a request ended: codes int32 [T, K'] of the emitted frames (the end frame excluded)."""

    codes: np.ndarray
    stop_reason: str  # "eos" | "max_length" | "cancelled" | "error"
    error: str | None = None
    started: float = 0.0  # time.perf_counter() at submit
    first_frame: float | None = None
    finished: float = 0.0

    @property
    def frames(self) -> int:
        return len(self.codes)


@dataclasses.dataclass
class Request:
    """A prompt (tokens int32 [S, K+1], mask bool [S, K+1]) and its sampling parameters and callbacks.
    `on_frame(pcm16 int16 [frame_size])` runs on the engine thread per frame; `on_done(Result)` once."""

    tokens: np.ndarray
    mask: np.ndarray
    max_frames: int
    temperature: float
    top_k: int
    seed: int
    on_frame: Callable[[np.ndarray], None]
    on_done: Callable[[Result], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclasses.dataclass
class _Slot:
    request: Request
    codes: list[np.ndarray]
    first_frame: float | None = None


class Scheduler:
    """Owns the engine's decode state and the batched stream decoder; `submit` is thread safe."""

    def __init__(self, generator: Generator, batch_size: int = 8):
        if generator.codec is None:
            raise ValueError("the scheduler needs a generator with a codec (audio output)")
        self.generator, self.batch_size = generator, batch_size
        self.engine = generator.engine(batch_size)
        self.decoder = generator.codec.stream_decoder(batch_size)
        self.code_limit = generator.codec.config.codebook_size
        self._state = self.engine.init_state()
        self._slots: list[_Slot | None] = [None] * batch_size
        self._pending: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0

    # lifecycle -------------------------------------------------------------------------------------------
    def warmup(self, max_prompt_rows: int | None = None) -> float:
        """Compile the frame step, every prefill bucket up to `max_prompt_rows` and the streaming codec; returns
        seconds taken."""
        t0 = time.perf_counter()
        limit = max_prompt_rows or self.engine.max_seq_len
        k1 = self.generator.cfg.num_codebooks + 1
        state = self.engine.init_state()
        for b in PREFILL_BUCKETS:
            length = min(b, self.engine.max_seq_len - 1)
            tokens, mask = np.zeros((length, k1), np.int32), np.zeros((length, k1), bool)
            mask[:, -1] = True
            state = self.engine.prefill(state, [0], [(tokens, mask)], [0], [1.0], [1], [self.code_limit])
            if b >= limit:
                break
        state, codes = self.engine.step(self.engine.release(state, [0]))
        self.decoder.step(np.asarray(codes))
        self.decoder.reset(mask=np.arange(self.batch_size) == 0)
        self.decoder.reset()
        codec = self.generator.codec  # user audio turns: one streaming encoder per turn
        codec.stream_encoder(1).step(np.zeros((1, codec.frame_size), np.float32))
        return time.perf_counter() - t0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> None:
        self._pending.put(request)
        self._wake.set()

    @property
    def queued(self) -> int:
        """Requests submitted and not yet in an engine slot."""
        return self._pending.qsize()

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    # engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if self.active == 0:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._step()
            except Exception as e:  # never let one bad step kill the service: fail the active requests
                log.exception("engine step failed")
                for i, slot in enumerate(self._slots):
                    if slot is not None:
                        self._finish(i, "error", error=f"{type(e).__name__}: {e}")
                self._state = self.engine.init_state()

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self._slots) if s is None]
        while free and not self._pending.empty():
            req = self._pending.get_nowait()
            if req.cancelled.is_set():
                req.on_done(Result(np.zeros((0, self.engine.num_codebooks), np.int32), "cancelled",
                                   started=req.submitted, finished=time.perf_counter()))
                continue
            row = free.pop(0)
            self._state = self.engine.prefill(self._state, [row], [(req.tokens, req.mask)], [req.seed],
                                              [req.temperature], [req.top_k], [self.code_limit])
            self.decoder.reset(mask=np.arange(self.batch_size) == row)
            self._slots[row] = _Slot(req, [])

    def _step(self) -> None:
        self._state, codes = self.engine.step(self._state)
        codes = np.asarray(codes)
        audio = np.asarray(self.decoder.step(codes))
        pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
        self.steps += 1
        now = time.perf_counter()
        for i, slot in enumerate(self._slots):
            if slot is None:
                continue
            req = slot.request
            if req.cancelled.is_set():
                self._finish(i, "cancelled")
            elif not codes[i].any():
                self._finish(i, "eos")
            else:
                slot.codes.append(codes[i])
                if slot.first_frame is None:
                    slot.first_frame = now
                req.on_frame(pcm[i])
                if len(slot.codes) >= req.max_frames:
                    self._finish(i, "max_length")

    def _finish(self, row: int, reason: str, error: str | None = None) -> None:
        slot = self._slots[row]
        assert slot is not None
        self._slots[row] = None
        if reason != "eos":  # the engine marks an end frame done itself
            self._state = self.engine.release(self._state, [row])
        codes = np.stack(slot.codes) if slot.codes else np.zeros((0, self.engine.num_codebooks), np.int32)
        slot.request.on_done(Result(codes.astype(np.int32), reason, error, slot.request.submitted,
                                    slot.first_frame, time.perf_counter()))
