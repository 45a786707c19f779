"""The built-in default model: a small CSM + Mimi with seeded random weights and a byte-level tokenizer.

It is created deterministically in memory (same JAX version, same weights), so the server, the notebooks and the
tests run end to end with no download. It is untrained: it produces noise-like audio of the requested length
(it almost never emits the all-zero end frame), not speech. Real speech needs converted CSM-1B weights
(`python -m csm_jax.csm convert ...`, then `model.path=...`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from csm_jax.codec.codec import MimiCodec
from csm_jax.codec.config import MimiConfig
from csm_jax.csm.config import CsmConfig, LlamaConfig
from csm_jax.csm.generator import Generator
from csm_jax.csm.prompt import BOS, EOS
from csm_jax.csm.model import Csm

NAME = "csm-jax-default (random weights)"


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges (one token per UTF-8 byte, ids 0..255) plus BOS/EOS (256, 257)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return tok


def default_csm_config(text_vocab_size: int = 258) -> CsmConfig:
    """8 codebooks; backbone 4 x 256 wide, depth decoder 2 x 128 wide; 2048-position context as CSM-1B."""
    backbone = LlamaConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                           intermediate_size=512)
    decoder = LlamaConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                          intermediate_size=256, max_seq_len=8)
    return CsmConfig(backbone=backbone, decoder=decoder, text_vocab_size=text_vocab_size, num_codebooks=8)


def default_mimi_config() -> MimiConfig:
    """The official Mimi frame (80 ms at 24 kHz, 2048-entry codebooks), narrow and shallow, 8 quantizers."""
    return MimiConfig(hidden_size=64, num_filters=8, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                      intermediate_size=128, codebook_dim=32, num_quantizers=8, upsample_groups=64)


def default_generator(seed: int = 0) -> Generator:
    """The default model as a ready Generator (tokenizer, CSM, codec), deterministic in `seed`."""
    tokenizer = byte_tokenizer()
    cfg = default_csm_config(tokenizer.get_vocab_size())
    k = cfg.num_codebooks
    params = jax.jit(lambda key: Csm(cfg).init(key, jnp.zeros((1, 1, k + 1), jnp.int32),
                                               jnp.ones((1, 1, k + 1), bool))["params"])(jax.random.key(seed))
    params = nn.meta.unbox(params)
    codec = MimiCodec.random(default_mimi_config(), seed=seed + 1)
    return Generator(params, cfg, codec, tokenizer)
