"""The Mimi codec as one Flax module: RVQ encoder (audio -> codes), RVQ decoder (codes -> features) and
the SEANet vocoder (features -> waveform), each with an offline path and a one-frame streaming step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from csm_jax.codec.config import MimiConfig
from csm_jax.codec.layers import CausalConv1d, CausalConvTranspose1d, State
from csm_jax.codec.quantizer import SplitResidualVQ
from csm_jax.codec.seanet import SEANetDecoder, SEANetEncoder
from csm_jax.codec.transformer import Transformer


# The submodules (and quantizer parameters) that determine the codes; the rest (the quantizer's output projections,
# upsampling, decoder transformer, SEANet decoder) only turn codes into audio.
ENCODER_MODULES = ("encoder", "encoder_transformer", "downsample")
ENCODER_QUANTIZER_PARAMS = ("input_proj", "codebooks")


def determines_codes(keys: tuple[str, ...]) -> bool:
    """Whether the Mimi parameter at path `keys` (e.g. ("quantizer", "acoustic", "codebooks")) affects encoding."""
    return keys[0] in ENCODER_MODULES or (keys[0] == "quantizer" and any(k in ENCODER_QUANTIZER_PARAMS for k in keys))


class Mimi(nn.Module):
    cfg: MimiConfig

    def setup(self) -> None:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        s = cfg.latent_stride
        self.encoder = SEANetEncoder(cfg)
        self.encoder_transformer = Transformer(cfg)
        self.downsample = CausalConv1d(cfg.hidden_size, cfg.hidden_size, 2 * s, stride=s, use_bias=False, pad_mode="replicate", dtype=dt)
        self.quantizer = SplitResidualVQ(cfg)
        self.upsample = CausalConvTranspose1d(cfg.hidden_size, cfg.hidden_size, 2 * s, s, groups=cfg.upsample_groups, use_bias=False, dtype=dt)
        self.decoder_transformer = Transformer(cfg)
        self.decoder = SEANetDecoder(cfg)

    # offline ------------------------------------------------------------------------------------------
    def encode_latent(self, audio: jax.Array) -> jax.Array:
        """audio float32 [B, N] -> continuous latent [B, ceil(N / frame_size), hidden] (before quantization)."""
        h = self.encoder(audio[..., None])
        h = self.encoder_transformer(h)
        return self.downsample(h.astype(self.cfg.compute_dtype))

    def encode(self, audio: jax.Array, num_codebooks: int) -> jax.Array:
        """audio float32 [B, N] -> int32 codes [B, K, ceil(N / frame_size)]."""
        return jnp.swapaxes(self.quantizer.encode(self.encode_latent(audio), num_codebooks), 1, 2)

    def latent_features(self, latent: jax.Array) -> jax.Array:
        """Quantized latent [B, T, hidden] -> features float32 [B, latent_stride * T, hidden]."""
        return self.decoder_transformer(self.upsample(latent.astype(self.cfg.compute_dtype)))

    def decode_features(self, codes: jax.Array) -> jax.Array:
        """RVQ decoder: codes int32 [B, K, T] -> features float32 [B, latent_stride * T, hidden]."""
        return self.latent_features(self.quantizer.decode(jnp.swapaxes(codes, 1, 2)))

    def vocode(self, features: jax.Array) -> jax.Array:
        """Vocoder: features [B, T', hidden] -> waveform float32 [B, T' * hop_length]."""
        return self.decoder(features.astype(self.cfg.compute_dtype))[..., 0].astype(jnp.float32)

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes int32 [B, K, T] -> waveform float32 [B, T * frame_size]."""
        return self.vocode(self.decode_features(codes))

    # streaming ----------------------------------------------------------------------------------------
    def init_encoder_state(self, batch_size: int) -> State:
        return {
            "seanet": self.encoder.init_state(batch_size),
            "transformer": self.encoder_transformer.init_state(batch_size, self.cfg.latent_stride),
            "downsample": self.downsample.init_state(batch_size),
        }

    def encode_step(self, audio: jax.Array, state: State, num_codebooks: int) -> tuple[jax.Array, State]:
        """audio float32 [B, frame_size] -> (int32 codes [B, K], new state)."""
        h, s_enc = self.encoder.step(audio[..., None], state["seanet"])
        h, s_tr = self.encoder_transformer.step(h, state["transformer"])
        latent, s_down = self.downsample.step(h.astype(self.cfg.compute_dtype), state["downsample"])
        codes = self.quantizer.encode(latent, num_codebooks)[:, 0]
        return codes, {"seanet": s_enc, "transformer": s_tr, "downsample": s_down}

    def init_decoder_state(self, batch_size: int) -> State:
        return {
            "upsample": self.upsample.init_state(batch_size),
            "transformer": self.decoder_transformer.init_state(batch_size, self.cfg.latent_stride),
            "seanet": self.decoder.init_state(batch_size),
        }

    def decode_step(self, codes: jax.Array, state: State) -> tuple[jax.Array, State]:
        """codes int32 [B, K] -> (waveform float32 [B, frame_size], new state)."""
        latent = self.quantizer.decode(codes[:, None, :]).astype(self.cfg.compute_dtype)
        h, s_up = self.upsample.step(latent, state["upsample"])
        h, s_tr = self.decoder_transformer.step(h, state["transformer"])
        audio, s_dec = self.decoder.step(h.astype(self.cfg.compute_dtype), state["seanet"])
        return audio[..., 0].astype(jnp.float32), {"upsample": s_up, "transformer": s_tr, "seanet": s_dec}

    def __call__(self, audio: jax.Array) -> jax.Array:
        """Round trip used for parameter initialisation: audio [B, N] -> reconstruction [B, N']."""
        return self.decode(self.encode(audio, self.cfg.num_quantizers))
