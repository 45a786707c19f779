"""The codec training step: Mimi encoder -> EMA split RVQ -> decoder, reconstruction + commitment (+ distillation)
losses, then (from `adversarial_start`) the MS-STFT discriminator's hinge update and the generator's adversarial
and feature-matching terms; from `freeze_codes_at` only the decoder side trains (the codes stay fixed). Jitted on a
(data, fsdp, tensor) mesh: the batch is split over data x fsdp, the codec and discriminator (a few million
parameters) are replicated. One compiled variant per stage keeps the step free of conditionals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from csm_jax import backend
from csm_jax.codec.codec import MimiCodec
from csm_jax.codec.config import MimiConfig
from csm_jax.codec.mimi import Mimi, determines_codes
from csm_jax.training.codec import losses as L
from csm_jax.training.codec.config import CodecTrainConfig
from csm_jax.training.codec.discriminator import CodecDiscriminator
from csm_jax.training.codec.rvq import HALVES, ema_from_codebooks, init_ema, quantize, update_ema, with_codebooks


@flax.struct.dataclass
class CodecState:
    step: jax.Array  # int32 []: generator updates done
    params: Any  # {"mimi": Mimi params without codebooks, "distill": projection or {}}
    ema: Any  # rvq.init_ema layout
    opt_state: Any
    disc_params: Any
    disc_opt_state: Any
    rng: jax.Array  # uint32 key data; the step's key is fold_in(rng, step)


def strip_codebooks(mimi_params: dict[str, Any]) -> dict[str, Any]:
    """Mimi params without `quantizer/{semantic,acoustic}/codebooks` (those come from the EMA)."""
    q = {half: {k: v for k, v in mimi_params["quantizer"][half].items() if k != "codebooks"} for half in HALVES}
    return dict(mimi_params) | {"quantizer": q}


def _frozen(path: tuple[Any, ...]) -> bool:
    """Whether the param at `path` (into {"mimi": ..., "distill": ...}) determines the codes (the codebooks
    themselves are EMA state, frozen by skipping the EMA step)."""
    keys = tuple(p.key for p in path)
    return keys[0] == "mimi" and determines_codes(keys[1:])


def _optimizer(lr: float, cfg: CodecTrainConfig, clip: float) -> optax.GradientTransformation:
    o = cfg.optim
    schedule = optax.join_schedules([optax.linear_schedule(lr / max(o.warmup_steps, 1), lr, o.warmup_steps),
                                     optax.constant_schedule(lr)], [o.warmup_steps])
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


class CodecProgram:
    """Compiled init / train step / offline round trip for one codec and training config on a mesh."""

    def __init__(self, codec_cfg: MimiConfig, cfg: CodecTrainConfig, mesh: Mesh) -> None:
        self.codec_cfg, self.cfg, self.mesh = codec_cfg, cfg, mesh
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if cfg.batch_size % shards:
            raise ValueError(f"batch_size {cfg.batch_size} does not split over the mesh's data x fsdp = {shards}")
        self.model = Mimi(codec_cfg)
        self.disc = CodecDiscriminator(cfg.discriminator)
        self.tx = _optimizer(cfg.optim.learning_rate, cfg, cfg.optim.clip)
        self.disc_tx = _optimizer(cfg.optim.disc_learning_rate, cfg, cfg.optim.disc_clip)
        self.segment = cfg.segment_frames * codec_cfg.frame_size
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        self.weights = cfg.weights
        self._init = backend.jit_init(self._make_state, out_shardings=self.replicated)
        self._steps: dict[tuple[bool, bool], Callable[..., Any]] = {}
        self.abstract_state = jax.eval_shape(self._make_state, jax.random.key(0))

    # state ----------------------------------------------------------------------------------------------------
    def _make_state(self, key: jax.Array) -> CodecState:
        k_model, k_disc, k_distill, k_rng = jax.random.split(key, 4)
        audio = jnp.zeros((1, self.codec_cfg.frame_size), jnp.float32)
        mimi = strip_codebooks(self.model.init(k_model, audio)["params"])
        distill = {}
        if self.cfg.distill.teacher:
            distill = {"kernel": jax.random.normal(k_distill, (self.codec_cfg.hidden_size, self.cfg.distill.dim))
                       * self.codec_cfg.hidden_size**-0.5}
        params = {"mimi": mimi, "distill": distill}
        disc_params = self.disc.init(k_disc, jnp.zeros((1, self.segment), jnp.float32))["params"]
        return CodecState(step=jnp.zeros((), jnp.int32), params=params, ema=init_ema(self.codec_cfg),
                          opt_state=self.tx.init(params), disc_params=disc_params,
                          disc_opt_state=self.disc_tx.init(disc_params), rng=jax.random.key_data(k_rng))

    def abstract_state_sharded(self) -> CodecState:
        """The state's ShapeDtypeStructs, replicated on the mesh (what a checkpoint restores into)."""
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                            self.abstract_state)

    def init_state(self, seed: int) -> CodecState:
        return self._init(jax.random.key(seed))

    def start_from(self, state: CodecState, codec: MimiCodec) -> CodecState:
        """`state` with the weights and codebooks of `codec` (same architecture) and a fresh optimiser state."""
        mine, theirs = self.codec_cfg.replace(dtype="float32"), codec.config.replace(dtype="float32")
        if mine != theirs:
            diff = sorted(k for k, v in mine.to_dict().items() if theirs.to_dict().get(k) != v)
            raise ValueError(f"codec_train.init: its architecture differs from codec.config in {diff}")
        mimi = jax.tree.map(jnp.array, strip_codebooks(codec.params))  # copies: train steps donate the state
        params = dict(state.params) | {"mimi": mimi}
        new = state.replace(params=params, ema=ema_from_codebooks(codec.params, self.codec_cfg),
                            opt_state=self.tx.init(params))
        return jax.device_put(new, self.replicated)  # laid out as the steps return it: one compile, not two

    def continue_from(self, state: CodecState, saved: CodecState) -> CodecState:
        """`state` with the weights, codebooks and discriminator of `saved` (another run's state with this codec,
        discriminator and distillation layout) and fresh optimiser states: a new run (other losses, learning
        rate, crops) that goes on from where that one stood, without a discriminator that starts from scratch."""
        new = state.replace(params=saved.params, ema=saved.ema, opt_state=self.tx.init(saved.params),
                            disc_params=saved.disc_params, disc_opt_state=self.disc_tx.init(saved.disc_params))
        return jax.device_put(new, self.replicated)

    def codec(self, state: CodecState, num_codebooks: int | None = None) -> MimiCodec:
        """The inference codec of `state` (codebooks = EMA centroids)."""
        params = jax.device_get(with_codebooks(state.params["mimi"], state.ema))
        return MimiCodec(params, self.codec_cfg, num_codebooks)

    # step -----------------------------------------------------------------------------------------------------
    def _forward(self, params: Any, ema: Any, audio: jax.Array, key: jax.Array, teacher: jax.Array | None,
                 f0: jax.Array | None, frozen: bool = False) -> tuple[jax.Array, dict[str, Any], dict[str, jax.Array]]:
        """-> (reconstruction [B, N], rvq aux, reconstruction/commit/distill/pitch loss terms)."""
        mimi = with_codebooks(params["mimi"], ema)
        latent = self.model.apply({"params": mimi}, audio, method=Mimi.encode_latent)
        if frozen:
            latent = jax.lax.stop_gradient(latent)
        quantized, aux = quantize(mimi["quantizer"], ema, latent, self.codec_cfg, self.cfg.rvq, key)
        feats = self.model.apply({"params": mimi}, quantized, method=Mimi.latent_features)
        recon = self.model.apply({"params": mimi}, feats, method=Mimi.vocode)[:, : audio.shape[1]]
        terms = {"commit": aux["commit"]}
        w = self.weights
        if w["mel"]:
            terms["mel"] = L.mel_loss(audio, recon, self.codec_cfg.sample_rate)
        if w["stft"]:
            terms["stft"] = L.stft_loss(audio, recon)
        if w["waveform"]:
            terms["waveform"] = L.waveform_l1(audio, recon)
        if w["pitch"]:
            terms["pitch"] = L.periodicity_loss(audio, recon, f0, self.codec_cfg.sample_rate)
        if teacher is not None:
            pred = aux["semantic"] @ params["distill"]["kernel"]
            t = min(pred.shape[1], teacher.shape[1])
            cos = jnp.sum(pred[:, :t] * teacher[:, :t], -1) / jnp.maximum(
                jnp.linalg.norm(pred[:, :t], axis=-1) * jnp.linalg.norm(teacher[:, :t], axis=-1), 1e-6)
            terms["distill"] = jnp.mean(1.0 - cos)
        return recon, aux, terms

    def _step_fn(self, adversarial: bool, frozen: bool) -> Callable[..., tuple[CodecState, dict[str, Any]]]:
        w = self.weights

        def step(state: CodecState, audio: jax.Array, teacher: jax.Array | None, f0: jax.Array | None
                 ) -> tuple[CodecState, dict[str, Any]]:
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            n_adv = self.cfg.discriminator.batch or audio.shape[0]

            def gen_loss(params: Any) -> tuple[jax.Array, Any]:
                recon, aux, terms = self._forward(params, state.ema, audio, key, teacher, f0, frozen)
                if adversarial:
                    fake_logits, fake_feats = self.disc.apply({"params": state.disc_params}, recon[:n_adv])
                    _, real_feats = self.disc.apply({"params": state.disc_params}, audio[:n_adv])
                    terms["adversarial"] = L.hinge_generator(fake_logits)
                    terms["feature"] = L.feature_matching(real_feats, fake_feats)
                total = sum(w[name] * value for name, value in terms.items())
                return total, (recon, aux, terms)

            (total, (recon, aux, terms)), grads = jax.value_and_grad(gen_loss, has_aux=True)(state.params)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            if frozen:
                updates = jax.tree_util.tree_map_with_path(
                    lambda path, u: jnp.zeros_like(u) if _frozen(path) else u, updates)
            params = optax.apply_updates(state.params, updates)
            ema, rvq_metrics = update_ema(state.ema, aux, self.cfg.rvq)
            if frozen:
                ema = state.ema
            metrics = {"loss": total, "grad_norm": optax.global_norm(grads), **terms, **rvq_metrics}
            disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
            if adversarial:
                fake = jax.lax.stop_gradient(recon[:n_adv])

                def disc_loss(dp: Any) -> jax.Array:
                    real_logits, _ = self.disc.apply({"params": dp}, audio[:n_adv])
                    fake_logits, _ = self.disc.apply({"params": dp}, fake)
                    return L.hinge_discriminator(real_logits, fake_logits)

                d_loss, d_grads = jax.value_and_grad(disc_loss)(state.disc_params)
                d_updates, disc_opt_state = self.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
                disc_params = optax.apply_updates(state.disc_params, d_updates)
                metrics["disc_loss"] = d_loss
            new = CodecState(step=state.step + 1, params=params, ema=ema, opt_state=opt_state,
                             disc_params=disc_params, disc_opt_state=disc_opt_state, rng=state.rng)
            return new, metrics

        return step

    def train_step(self, state: CodecState, step: int, audio: np.ndarray, teacher: np.ndarray | None = None,
                   f0: np.ndarray | None = None) -> tuple[CodecState, dict[str, Any]]:
        """Update `step` (= state.step, passed so the host never waits for the device) on audio float32
        [B, segment] (teacher features [B, frames, dim] with distillation; the audio's F0 float32 [B, T] in Hz,
        `csm_jax.evaluation.pitch.f0_batch`, with the pitch loss)."""
        if self.weights["pitch"] and f0 is None:
            raise ValueError("the pitch loss needs the batch's F0 (f0_batch)")
        stage = self.cfg.stage(step)
        if stage not in self._steps:
            self._steps[stage] = jax.jit(self._step_fn(*stage), donate_argnums=0)
        audio = jax.device_put(audio, self.batch_sharding)
        if teacher is not None:
            teacher = jax.device_put(teacher, self.batch_sharding)
        if f0 is not None:
            f0 = jax.device_put(f0, self.batch_sharding)
        return self._steps[stage](state, audio, teacher, f0 if self.weights["pitch"] else None)
