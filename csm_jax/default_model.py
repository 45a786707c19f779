"""The built-in models.

- The default voice (`default_generator`): a ~11 M-parameter CSM and its ~7.6 M-parameter Mimi codec, trained here
  with the project's own recipes on a synthetic multi-speaker corpus and shipped as package data
  (`csm_jax/assets/voice`, a transformers CSM directory with the codec inside; its `MODEL_CARD.md` says how it was
  trained and how well it speaks). The server, the CLI and the notebooks use it when no checkpoint is given.
- A tiny seeded random model (`random_generator`): built in memory in a second, deterministic in its seed, for
  tests and for trying the machinery at full speed. It produces noise-like audio, not speech.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from csm_jax import backend
from csm_jax.codec.codec import MimiCodec
from csm_jax.codec.config import MimiConfig
from csm_jax.csm.config import CsmConfig, LlamaConfig
from csm_jax.csm.generator import Generator, load_csm
from csm_jax.csm.model import Csm
from csm_jax.csm.prompt import BOS, EOS

VOICE_DIR = Path(__file__).resolve().parent / "assets" / "voice"
NAME = "csm-jax-voice"
RANDOM_NAME = "csm-jax-random (untrained)"


def default_generator(**options: Any) -> Generator:
    """The default voice as a ready Generator (tokenizer, eSpeak NG phoneme front end, CSM, codec).
    `options` go to `load_csm` (dtype, quantize, num_codebooks, mesh, rules, backend)."""
    return load_csm(VOICE_DIR, **options)


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges (one token per UTF-8 byte, ids 0..255) plus BOS/EOS (256, 257)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return tok


def tiny_csm_config(text_vocab_size: int = 258) -> CsmConfig:
    """The random model's CSM: 8 codebooks; backbone 4 x 256 wide, depth decoder 2 x 128 wide; 2048 positions."""
    backbone = LlamaConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                           intermediate_size=512)
    decoder = LlamaConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                          intermediate_size=256, max_seq_len=8)
    return CsmConfig(backbone=backbone, decoder=decoder, text_vocab_size=text_vocab_size, num_codebooks=8)


def tiny_mimi_config() -> MimiConfig:
    """The random model's codec: the official Mimi frame (80 ms at 24 kHz, 2048-entry codebooks), narrow and
    shallow, 8 quantizers."""
    return MimiConfig(hidden_size=64, num_filters=8, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                      intermediate_size=128, codebook_dim=32, num_quantizers=8, upsample_groups=64)


def random_generator(seed: int = 0) -> Generator:
    """The tiny random model as a ready Generator (byte tokenizer, CSM, codec), deterministic in `seed`."""
    tokenizer = byte_tokenizer()
    cfg = tiny_csm_config(tokenizer.get_vocab_size())
    k = cfg.num_codebooks
    params = backend.jit_init(lambda key: Csm(cfg).init(key, jnp.zeros((1, 1, k + 1), jnp.int32),
                                                        jnp.ones((1, 1, k + 1), bool))["params"])(jax.random.key(seed))
    params = nn.meta.unbox(params)
    codec = MimiCodec.random(tiny_mimi_config(), seed=seed + 1)
    return Generator(params, cfg, codec, tokenizer)
