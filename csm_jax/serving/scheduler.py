"""Continuous batching: one engine thread advances every active request with one compiled call per frame.

Requests waiting when slots are free are admitted together (one batched prefill) into the lowest free slots of a
fixed-size batch; each frame (`ServingFrame`: CSM step + Mimi stream decode -> PCM) computes only the smallest row
bucket holding the active slots, so one client costs one row. Frames are pipelined: frame N+1 is dispatched before
frame N is read, so host work (delivery, admission) overlaps device work. A request ends on its all-zero end frame,
at its frame limit, or when cancelled; a freed slot is refilled at the next frame. Frames and results go to
callbacks that must not block (the server forwards them to asyncio with `call_soon_threadsafe`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from csm_jax.csm.generator import Generator
from csm_jax.serving.frame import ServingFrame

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
    depth_temperature: float | None = None  # codebooks 1..K-1 (None: `temperature`)
    depth_top_k: int | None = None  # codebooks 1..K-1 (None: `top_k`)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.depth_temperature is None:
            self.depth_temperature = self.temperature
        if self.depth_top_k is None:
            self.depth_top_k = self.top_k

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
        self.frames = ServingFrame(generator.engine(batch_size), generator.codec)
        self.num_codebooks = self.frames.engine.num_codebooks
        self._slots: list[_Slot | None] = [None] * batch_size
        self._pending: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.prefills = 0  # batched prefill calls
        self.rows_computed = 0  # rows of every frame computed (the buckets), for metrics and benchmarks

    # lifecycle -------------------------------------------------------------------------------------------
    def warmup(self, max_prompt_rows: int | None = None, max_batched_rows: int = 256) -> float:
        """Compile every row bucket's frame, prefills up to `max_prompt_rows` prompt rows (batched ones up to
        `max_batched_rows`) and the streaming encoder of user audio turns; returns seconds taken."""
        t0 = time.perf_counter()
        self.frames.warmup(max_prompt_rows or self.frames.engine.max_seq_len, max_batched_rows)
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

    def counts(self) -> dict[str, int]:
        """Engine counters since start: frames (compiled calls), rows (computed rows), prefills (calls)."""
        return {"frames": self.steps, "rows": self.rows_computed, "prefills": self.prefills}

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    # engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        inflight: tuple[np.ndarray, np.ndarray, list[_Slot | None]] | None = None
        while not self._stop.is_set():
            try:
                self._admit()
                dispatched = None
                if self.active:
                    rows = max(i for i, s in enumerate(self._slots) if s is not None) + 1
                    codes, pcm = self.frames.step(rows)
                    dispatched = (codes, pcm, list(self._slots[:codes.shape[0]]))
                    self.steps += 1
                    self.rows_computed += codes.shape[0]
                if inflight is not None:  # frame N is read while frame N+1 runs
                    self._deliver(*inflight)
                inflight = dispatched
                if inflight is None and self.active == 0:
                    self._wake.wait(0.5)
                    self._wake.clear()
            except Exception as e:  # never let one bad frame kill the service: fail the active requests
                log.exception("engine step failed")
                inflight = None
                for i, slot in enumerate(self._slots):
                    if slot is not None:
                        self._finish(i, "error", error=f"{type(e).__name__}: {e}")
                self.frames.reset()

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self._slots) if s is None]
        admitted: list[tuple[int, Request]] = []
        while len(admitted) < len(free) and not self._pending.empty():
            req = self._pending.get_nowait()
            if req.cancelled.is_set():
                req.on_done(Result(np.zeros((0, self.num_codebooks), np.int32), "cancelled",
                                   started=req.submitted, finished=time.perf_counter()))
                continue
            admitted.append((free[len(admitted)], req))
        if not admitted:
            return
        rows = [row for row, _ in admitted]
        reqs = [req for _, req in admitted]
        self.frames.prefill(rows, [(r.tokens, r.mask) for r in reqs], [r.seed for r in reqs],
                            [r.temperature for r in reqs], [r.top_k for r in reqs],
                            depth_temperature=[r.depth_temperature for r in reqs],
                            depth_top_k=[r.depth_top_k for r in reqs])
        self.prefills += 1
        for row, req in admitted:
            self._slots[row] = _Slot(req, [])

    def _deliver(self, codes: Any, pcm: Any, owners: list[_Slot | None]) -> None:
        """Hand one frame's rows to the requests that owned the rows when it was dispatched and still do."""
        codes, pcm = np.asarray(codes), np.asarray(pcm)
        now = time.perf_counter()
        for i, slot in enumerate(owners):
            if slot is None or self._slots[i] is not slot:
                continue  # idle, or finished while this frame ran (its row output is not the request's)
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
            self.frames.release([row])
        codes = np.stack(slot.codes) if slot.codes else np.zeros((0, self.num_codebooks), np.int32)
        slot.request.on_done(Result(codes.astype(np.int32), reason, error, slot.request.submitted,
                                    slot.first_frame, time.perf_counter()))
