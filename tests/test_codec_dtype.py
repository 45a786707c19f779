"""The compute dtype is configurable: bf16 runs end to end, stays float32 at the API, and stays close to fp32
(and to transformers, the fp32 oracle)."""

from __future__ import annotations

import numpy as np
import torch
from mimi_fixtures import clip, frac_equal, tiny_ref, trim_to_frames  # noqa: F401  (fixtures)

import csm_jax


def test_bfloat16_codec_is_close_to_fp32_reference(tiny_ref):
    audio = trim_to_frames(clip("speech_3s"))
    codec = csm_jax.load_codec(tiny_ref.hf_dir, dtype="bfloat16")
    assert codec.config.dtype == "bfloat16"
    with torch.no_grad():
        ref_codes = tiny_ref.model.encode(torch.from_numpy(audio)[None, None]).audio_codes.numpy()
        ref_audio = tiny_ref.model.decode(torch.from_numpy(ref_codes)).audio_values[:, 0].numpy()

    codes = np.asarray(codec.encode(audio[None]))
    assert codes.dtype == np.int32 and codes.shape == ref_codes.shape
    assert frac_equal(codes[:, 0], ref_codes[:, 0]) >= 0.9  # the semantic codebook survives bf16 rounding

    decoded = np.asarray(codec.decode(ref_codes))
    assert decoded.dtype == np.float32
    assert np.abs(decoded - ref_audio).max() <= 0.05 * np.abs(ref_audio).max()

    dec = codec.stream_decoder(1)
    streamed = np.concatenate([np.asarray(dec.step(ref_codes[:, :, i])) for i in range(ref_codes.shape[-1])], -1)
    assert np.abs(streamed - decoded).max() <= 0.02 * np.abs(ref_audio).max()
