"""The CSM generation engine: static-shape KV caches, bucketed prefill, and one jit-compiled call per frame.

A frame step runs the backbone on each row's previous frame, samples codebook 0, then runs all K-1 depth-decoder
steps (fresh decoder cache per frame) inside the same compiled call. B rows advance together, each with its own
position, sampling parameters, PRNG stream and stop state; `insert` refills one row with a new request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from csm_jax import backend, sharding
from csm_jax.backend import BackendPolicy
from csm_jax.csm import quantize
from csm_jax.csm.config import CsmConfig
from csm_jax.csm.llama import init_cache
from csm_jax.csm.model import Csm
from csm_jax.csm.sampling import sample_rows

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-row generation state (B rows). Caches are indexed by absolute position."""

    caches: list[dict[str, jax.Array]]  # backbone k/v [B, Hkv, hd, max_seq_len] per layer
    tokens: jax.Array  # int32 [B, K+1]: the row to feed at `positions`
    mask: jax.Array  # bool [B, K+1]
    positions: jax.Array  # int32 [B]
    keys: jax.Array  # PRNG key data uint32 [B, 2]
    temperature: jax.Array  # float32 [B]: codebook 0
    top_k: jax.Array  # int32 [B]: codebook 0
    depth_temperature: jax.Array  # float32 [B]: codebooks 1..K-1
    depth_top_k: jax.Array  # int32 [B]: codebooks 1..K-1
    code_limit: jax.Array  # int32 [B]: audio codes are sampled from [0, code_limit) (the codec's range)
    done: jax.Array  # bool [B]


def _state_kinds(num_layers: int) -> DecodeState:
    """A DecodeState-shaped tree naming each field's STATE_AXES entry."""
    return DecodeState(caches=[{"k": "cache", "v": "cache"} for _ in range(num_layers)], tokens="row", mask="row",
                       positions="vector", keys="row", temperature="vector", top_k="vector",
                       depth_temperature="vector", depth_top_k="vector", code_limit="vector", done="vector")


def bucket(length: int, max_len: int) -> int:
    """Smallest prefill bucket >= length (static shapes: one compilation per bucket)."""
    for b in PREFILL_BUCKETS:
        if b >= length:
            return min(b, max_len)
    return max_len


STATE_AXES = {  # logical axes of each DecodeState field (caches: per layer k and v)
    "cache": ("batch", "kv_heads", "head_dim", "cache_seq"),
    "row": ("batch", "frame"),
    "vector": ("batch",),
}


class Engine:
    """Compiled prefill / step over a fixed batch of rows. All arrays live on device between calls.

    With a `mesh`, parameters and decode state are placed by logical-axis `rules` (default: rows over `data`,
    heads and MLP over `tensor`) and every call keeps that layout.
    """

    def __init__(self, params: Any, cfg: CsmConfig, batch_size: int, num_codebooks: int | None = None,
                 mesh: Mesh | None = None, rules: sharding.Rules = sharding.DEFAULT_RULES,
                 policy: BackendPolicy | None = None):
        self.cfg, self.batch_size = cfg, batch_size
        # the backend policy this engine's calls are traced with (default: the one in force now)
        self.policy = backend.current() if policy is None else policy
        self.num_codebooks = cfg.num_codebooks if num_codebooks is None else num_codebooks
        if not 2 <= self.num_codebooks <= cfg.num_codebooks:
            raise ValueError(f"num_codebooks must be in 2..{cfg.num_codebooks}, got {self.num_codebooks}")
        self.model = Csm(cfg)
        self.mesh = mesh
        if mesh is None:
            self.params = jax.device_put(params)  # once: host arrays would be re-transferred on every call
            self._state_sharding = None
            self._prefill = jax.jit(self._with_policy(self._prefill_impl), donate_argnums=1)
            self._step = jax.jit(self._with_policy(self._step_impl), donate_argnums=1)
            return
        k = cfg.num_codebooks
        boxed = jax.eval_shape(lambda: self.model.init(jax.random.key(0), jnp.zeros((1, 1, k + 1), jnp.int32),
                                                        jnp.ones((1, 1, k + 1), bool)))["params"]
        boxed = quantize.boxed_like(boxed, params)  # int8 params: scales laid out as their kernels' outputs
        self.params = jax.device_put(params, sharding.tree_shardings(mesh, rules, boxed))
        abstract = jax.eval_shape(self._zero_state)
        self._state_sharding = jax.tree_util.tree_map(
            lambda leaf, kind: sharding.logical_sharding(mesh, rules, STATE_AXES[kind], leaf.shape),
            abstract, _state_kinds(cfg.backbone.num_layers),
        )
        codes = sharding.logical_sharding(mesh, rules, STATE_AXES["row"], (batch_size, self.num_codebooks))
        self._prefill = jax.jit(self._with_policy(self._prefill_impl), donate_argnums=1,
                                out_shardings=self._state_sharding)
        self._step = jax.jit(self._with_policy(self._step_impl), donate_argnums=1,
                             out_shardings=(self._state_sharding, codes))

    def _with_policy(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def traced(*args: Any) -> Any:
            with backend.use(self.policy):
                return fn(*args)

        return traced

    @property
    def max_seq_len(self) -> int:
        return self.cfg.backbone.max_seq_len

    def init_state(self) -> DecodeState:
        """All rows idle (done); `prefill` activates rows."""
        state = self._zero_state()
        return state if self.mesh is None else jax.device_put(state, self._state_sharding)

    def _zero_state(self) -> DecodeState:
        b, k = self.batch_size, self.cfg.num_codebooks
        return DecodeState(
            caches=init_cache(self.cfg.backbone, b, self.max_seq_len, self.cfg.compute_dtype),
            tokens=jnp.zeros((b, k + 1), jnp.int32),
            mask=jnp.zeros((b, k + 1), bool),
            positions=jnp.zeros((b,), jnp.int32),
            keys=jnp.zeros((b, 2), jnp.uint32),
            temperature=jnp.ones((b,), jnp.float32),
            top_k=jnp.ones((b,), jnp.int32),
            depth_temperature=jnp.ones((b,), jnp.float32),
            depth_top_k=jnp.ones((b,), jnp.int32),
            code_limit=jnp.full((b,), self.cfg.audio_vocab_size, jnp.int32),
            done=jnp.ones((b,), bool),
        )

    # compiled bodies -----------------------------------------------------------------------------------
    def _apply(self, params: Any, method: Any, *args: Any) -> Any:
        return self.model.apply({"params": params}, *args, method=method)

    def _prefill_impl(self, params: Any, state: DecodeState, tokens: jax.Array, mask: jax.Array,
                      lengths: jax.Array, rows: jax.Array, seeds: jax.Array, temperature: jax.Array,
                      top_k: jax.Array, depth_temperature: jax.Array, depth_top_k: jax.Array,
                      code_limit: jax.Array) -> DecodeState:
        """Write prompts tokens/mask [R, S, K+1] (lengths [R]) into rows `rows` [R] of the state.
        Positions 0..len-2 are cached; the last prompt row becomes the first frame step's input."""
        r, s = tokens.shape[:2]
        sub = [{name: c[name][rows] for name in c} for c in state.caches]
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (r, s))
        _, _, sub = self._apply(params, Csm.backbone_step, tokens, mask, positions, sub)
        last = lengths - 1
        idx = jnp.arange(r)
        return DecodeState(
            caches=[{name: c[name].at[rows].set(n[name]) for name in c} for c, n in zip(state.caches, sub)],
            tokens=state.tokens.at[rows].set(tokens[idx, last]),
            mask=state.mask.at[rows].set(mask[idx, last]),
            positions=state.positions.at[rows].set(last),
            keys=state.keys.at[rows].set(jax.vmap(lambda s: jax.random.key_data(jax.random.key(s)))(seeds)),
            temperature=state.temperature.at[rows].set(temperature),
            top_k=state.top_k.at[rows].set(top_k),
            depth_temperature=state.depth_temperature.at[rows].set(depth_temperature),
            depth_top_k=state.depth_top_k.at[rows].set(depth_top_k),
            code_limit=state.code_limit.at[rows].set(code_limit),
            done=state.done.at[rows].set(False),
        )

    def _step_impl(self, params: Any, state: DecodeState) -> tuple[DecodeState, jax.Array]:
        """One frame for every row -> (new state, codes int32 [B, num_codebooks]); done rows emit zeros."""
        cfg, k_gen = self.cfg, self.num_codebooks
        b = state.tokens.shape[0]
        keys = jax.vmap(lambda kd: jax.random.split(jax.random.wrap_key_data(kd), k_gen + 1))(state.keys)
        # keys: [B, k_gen + 1]; the last one carries the row's stream to the next frame
        c0_logits, hidden, caches = self._apply(params, Csm.backbone_step, state.tokens[:, None], state.mask[:, None],
                                                state.positions[:, None], state.caches)
        vocab = jnp.arange(cfg.audio_vocab_size)

        def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array) -> jax.Array:
            logits = jnp.where(vocab < state.code_limit[:, None], logits, -jnp.inf)
            return sample_rows(logits, keys, temperature, top_k)

        c0 = sample(c0_logits[:, 0], keys[:, 0], state.temperature, state.top_k)
        h_last = hidden[:, 0]

        dcache = init_cache(cfg.decoder, b, k_gen, cfg.compute_dtype)
        first = jnp.stack([h_last, self._apply(params, Csm.audio_embed, c0, 0).astype(jnp.float32)], axis=1)
        dpos = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (b, 2))
        dh, dcache = self._apply(params, Csm.decoder_step, first, dpos, dcache)
        codes = jnp.zeros((b, k_gen), jnp.int32).at[:, 0].set(c0)
        c1 = sample(self._apply(params, Csm.audio_logits, dh[:, -1], 1), keys[:, 1], state.depth_temperature,
                    state.depth_top_k)
        codes = codes.at[:, 1].set(c1)

        def body(i: jax.Array, carry: tuple[Any, jax.Array]) -> tuple[Any, jax.Array]:
            dcache, codes = carry
            prev = codes[:, i - 1]
            x = self._apply(params, Csm.audio_embed, prev, i - 1)[:, None]
            pos = jnp.full((b, 1), i, jnp.int32)
            dh, dcache = self._apply(params, Csm.decoder_step, x, pos, dcache)
            logits = self._apply(params, Csm.audio_logits, dh[:, 0], i)
            ci = sample(logits, jax.vmap(lambda ks: ks[i])(keys), state.depth_temperature, state.depth_top_k)
            return dcache, codes.at[:, i].set(ci)

        _, codes = jax.lax.fori_loop(2, k_gen, body, (dcache, codes))
        codes = jnp.where(state.done[:, None], 0, codes)
        eos = jnp.all(codes == 0, axis=-1)
        full = jnp.zeros((b, cfg.num_codebooks), jnp.int32).at[:, :k_gen].set(codes)
        next_tokens = jnp.concatenate([full, jnp.zeros((b, 1), jnp.int32)], axis=-1)
        # a frame fed back is spoken: the backbone reads its first backbone_codebooks (csm.model.spoken_mask)
        next_mask = jnp.arange(cfg.num_codebooks + 1) < min(k_gen, cfg.backbone_codebooks)
        advance = ~state.done
        new_state = DecodeState(
            caches=caches,
            tokens=next_tokens,
            mask=jnp.broadcast_to(next_mask, state.mask.shape),
            positions=state.positions + advance.astype(jnp.int32),
            keys=jax.vmap(lambda ks: jax.random.key_data(ks[-1]))(keys),
            temperature=state.temperature,
            top_k=state.top_k,
            depth_temperature=state.depth_temperature,
            depth_top_k=state.depth_top_k,
            code_limit=state.code_limit,
            done=state.done | eos,
        )
        return new_state, codes

    # host API ------------------------------------------------------------------------------------------
    def prefill(self, state: DecodeState, rows: list[int], prompts: list[tuple[np.ndarray, np.ndarray]],
                seeds: list[int], temperature: list[float], top_k: list[int],
                code_limit: list[int] | None = None, depth_temperature: list[float] | None = None,
                depth_top_k: list[int] | None = None) -> DecodeState:
        """Insert prompts (tokens int [S_i, K+1], mask bool [S_i, K+1]) into `rows` of `state`. `temperature`,
        `top_k`: codebook 0's sampling per row; `depth_temperature`, `depth_top_k`: codebooks 1..K-1's (default:
        the same). `code_limit` restricts sampled audio codes to [0, limit) per row (default: the whole audio
        vocab)."""
        code_limit = code_limit or [self.cfg.audio_vocab_size] * len(rows)
        depth_temperature = temperature if depth_temperature is None else depth_temperature
        depth_top_k = top_k if depth_top_k is None else depth_top_k
        lengths = [len(t) for t, _ in prompts]
        s = bucket(max(lengths), self.max_seq_len)
        k1 = self.cfg.num_codebooks + 1
        tokens = np.zeros((len(prompts), s, k1), np.int32)
        mask = np.zeros((len(prompts), s, k1), bool)
        for i, (t, m) in enumerate(prompts):
            tokens[i, : len(t)], mask[i, : len(m)] = t, m
        return self._prefill(
            self.params, state, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths, jnp.int32),
            jnp.asarray(rows, jnp.int32), jnp.asarray(seeds, jnp.uint32), jnp.asarray(temperature, jnp.float32),
            jnp.asarray(top_k, jnp.int32), jnp.asarray(depth_temperature, jnp.float32),
            jnp.asarray(depth_top_k, jnp.int32), jnp.asarray(code_limit, jnp.int32),
        )

    def traced_step(self, params: Any, state: DecodeState) -> tuple[DecodeState, jax.Array]:
        """`step`'s body under this engine's backend policy, not compiled on its own: to compose into a larger
        compiled call (the serving frame)."""
        with backend.use(self.policy):
            return self._step_impl(params, state)

    def step(self, state: DecodeState) -> tuple[DecodeState, jax.Array]:
        """One frame for every row -> (new state, codes int32 [B, num_codebooks]); finished rows emit zeros."""
        return self._step(self.params, state)

    def release(self, state: DecodeState, rows: list[int]) -> DecodeState:
        """Mark `rows` finished (cancelled or ended early); they emit zeros until `prefill` refills them."""
        return dataclasses.replace(state, done=state.done.at[jnp.asarray(rows, jnp.int32)].set(True))

