"""One compiled call per serving frame: the CSM frame step (backbone, sampling, every depth-decoder step) and the
Mimi stream decode, returning codes and 16-bit PCM, over the first `rows` rows of the batch.

    frames = ServingFrame(generator.engine(16), generator.codec)
    frames.prefill([0, 1], prompts, seeds, temperature, top_k)   # one batched prefill for the admitted requests
    codes, pcm = frames.step(rows=2)   # int32 [2, K'], int16 [2, frame_size], on device (not yet read)

Row buckets. `step(rows)` computes only `rows` rows (a power of two <= batch_size, or batch_size), so one request
costs what one row costs; every bucket compiles once (`warmup`). Callers keep active requests in the lowest rows.
Prefill batches are padded to a power of two with copies of their first prompt (a copy writes the same row with
the same values, so padding changes nothing).

Both states (the engine's `DecodeState` and the Mimi decoder state) stay on device between calls and are donated,
so a frame never synchronises with the host: frame N+1 can be dispatched before frame N is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from csm_jax.codec.codec import MimiCodec, restart_rows
from csm_jax.codec.mimi import Mimi
from csm_jax.csm.engine import PREFILL_BUCKETS, DecodeState, Engine, bucket


def row_buckets(batch_size: int) -> tuple[int, ...]:
    """Powers of two below batch_size, then batch_size: (1, 2, 4, 8, 16) for 16, (1, 2, 4, 6) for 6."""
    out, b = [], 1
    while b < batch_size:
        out.append(b)
        b *= 2
    return (*out, batch_size)


def _rows_of(tree: Any, rows: int) -> Any:
    return jax.tree_util.tree_map(lambda x: x[:rows], tree)


def _state_rows(state: DecodeState, rows: int) -> DecodeState:
    """The first `rows` rows of every per-row field; the KV caches stay whole (the step writes and reads their
    first rows in place: slicing them would copy every layer's cache twice per frame)."""
    return dataclasses.replace(_rows_of(dataclasses.replace(state, caches=[]), rows), caches=state.caches)


def _put_state_rows(state: DecodeState, part: DecodeState) -> DecodeState:
    small = _put_rows(dataclasses.replace(state, caches=[]), dataclasses.replace(part, caches=[]))
    return dataclasses.replace(small, caches=part.caches)


def _put_rows(tree: Any, part: Any) -> Any:
    return jax.tree_util.tree_map(lambda full, p: jax.lax.dynamic_update_slice_in_dim(full, p, 0, axis=0), tree, part)


class ServingFrame:
    """The engine's decode state plus a batched Mimi stream decoder, advanced by one compiled call per frame."""

    def __init__(self, engine: Engine, codec: MimiCodec):
        self.engine, self.codec = engine, codec
        self.batch_size = engine.batch_size
        self.buckets = row_buckets(self.batch_size)
        module = Mimi(codec.config)
        b = self.batch_size
        self.state: DecodeState = engine.init_state()
        self.codec_params = codec.params
        self._state_sharding = self._decoder_sharding = None
        placed: dict[str, Any] = {}
        if engine.mesh is not None:
            # on a mesh, frames keep the engine's decode-state layout and the decoder state's rows go over the same
            # axis as the requests' (left to itself, XLA picks other output layouts, and the next frame, seeing new
            # input shardings, compiles again and reshards the KV caches); the codec is replicated once, here
            self._state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, self.state)
            self._decoder_sharding = NamedSharding(engine.mesh, PartitionSpec(*self._state_sharding.done.spec))
            self.codec_params = jax.device_put(codec.params, NamedSharding(engine.mesh, PartitionSpec()))
            placed = {"out_shardings": self._decoder_sharding}
        self._decoder_init = jax.jit(lambda p: module.apply({"params": p}, b, method=Mimi.init_decoder_state),
                                     **placed)
        self._decode_step = lambda p, codes, s: module.apply({"params": p}, codes, s, method=Mimi.decode_step)
        self._frame = jax.jit(self._frame_impl, static_argnums=4, donate_argnums=(2, 3))
        self._fresh_decoder = self._decoder_init(self.codec_params)  # restarted rows copy from it (never donated)
        self.decoder_state: Any = self._decoder_init(self.codec_params)

    # compiled bodies -----------------------------------------------------------------------------------
    def _frame_impl(self, params: Any, codec_params: Any, state: DecodeState, decoder_state: Any,
                    rows: int) -> tuple[DecodeState, Any, jax.Array, jax.Array]:
        whole = rows == self.batch_size
        sub, dsub = (state, decoder_state) if whole else (_state_rows(state, rows), _rows_of(decoder_state, rows))
        sub, codes = self.engine.traced_step(params, sub)
        audio, dsub = self._decode_step(codec_params, codes, dsub)
        pcm = (jnp.clip(audio, -1.0, 1.0) * 32767.0).astype(jnp.int16)  # truncation, as numpy's astype
        if not whole:
            sub, dsub = _put_state_rows(state, sub), _put_rows(decoder_state, dsub)
        if self._state_sharding is not None:
            sub = jax.lax.with_sharding_constraint(sub, self._state_sharding)
            dsub = jax.lax.with_sharding_constraint(dsub, self._decoder_sharding)
        return sub, dsub, codes, pcm

    # host API ------------------------------------------------------------------------------------------
    def bucket(self, rows: int) -> int:
        """The smallest row bucket holding `rows` rows."""
        return next(b for b in self.buckets if b >= rows)

    def step(self, rows: int) -> tuple[jax.Array, jax.Array]:
        """Advance rows 0..bucket(rows)-1 one frame -> (codes int32 [R, K'], pcm int16 [R, frame_size]), R the
        bucket; rows past `rows` are idle and emit zeros and silence."""
        r = self.bucket(rows)
        self.state, self.decoder_state, codes, pcm = self._frame(self.engine.params, self.codec_params, self.state,
                                                                 self.decoder_state, r)
        return codes, pcm

    def prefill(self, rows: list[int], prompts: list[tuple[np.ndarray, np.ndarray]], seeds: list[int],
                temperature: list[float], top_k: list[int], code_limit: list[int] | None = None,
                depth_temperature: list[float] | None = None, depth_top_k: list[int] | None = None) -> None:
        """Start requests in `rows` (prompts tokens int [S_i, K+1], mask bool [S_i, K+1]) with one batched prefill,
        their Mimi streams restarted. Sampling as `Engine.prefill` (depth settings default to codebook 0's)."""
        n = len(rows)
        if not n or len(prompts) != n:
            raise ValueError(f"need one prompt per row, got {len(prompts)} prompts for {n} rows")
        pad = self.bucket(n) - n
        limit = code_limit or [self.codec.config.codebook_size] * n
        pick = lambda xs: None if xs is None else list(xs) + [xs[0]] * pad
        self.state = self.engine.prefill(self.state, pick(rows), pick(prompts), pick(seeds), pick(temperature),
                                         pick(top_k), pick(limit), pick(depth_temperature), pick(depth_top_k))
        fresh = np.zeros((self.batch_size,), bool)
        fresh[rows] = True
        self.decoder_state = restart_rows(self._fresh_decoder, self.decoder_state,
                                           jnp.asarray(fresh))
        if self._decoder_sharding is not None:  # a no-op unless the eager merge picked another layout
            self.decoder_state = jax.device_put(self.decoder_state, self._decoder_sharding)

    def release(self, rows: list[int]) -> None:
        """Stop `rows` (cancelled or at their frame limit): they emit zeros until refilled."""
        self.state = self.engine.release(self.state, rows)

    def reset(self) -> None:
        """Every row idle, every stream restarted (after an engine failure)."""
        self.state = self.engine.init_state()
        self.decoder_state = self._decoder_init(self.codec_params)

    def warmup(self, max_prompt_rows: int, max_batched_rows: int) -> None:
        """Compile every row bucket's frame, single prefills up to `max_prompt_rows` prompt rows, and batched
        prefills (every row bucket) up to `max_batched_rows`; leaves every row idle."""
        k1 = self.engine.cfg.num_codebooks + 1
        limit = self.engine.max_seq_len - 1
        for s in PREFILL_BUCKETS:
            length = min(s, limit)
            tokens, mask = np.zeros((length, k1), np.int32), np.zeros((length, k1), bool)
            mask[:, -1] = True
            for n in self.buckets:
                if n > 1 and s > max_batched_rows:
                    break
                self.prefill(list(range(n)), [(tokens, mask)] * n, [0] * n, [1.0] * n, [1] * n)
            if bucket(length, self.engine.max_seq_len) >= max_prompt_rows:
                break
        self.release(list(range(self.batch_size)))
        for r in self.buckets:
            jax.block_until_ready(self.step(r))
        self.reset()

    def compiled_text(self, rows: int) -> str:
        """The optimised HLO of the `rows`-row frame (one executable), for inspection."""
        r = self.bucket(rows)
        return self._frame.lower(self.engine.params, self.codec_params, self.state, self.decoder_state,
                                 r).compile().as_text()

