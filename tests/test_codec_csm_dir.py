"""`load_codec` reads the Mimi weights that a transformers CSM checkpoint stores under `codec_model.`."""

from __future__ import annotations

import numpy as np
import torch
from mimi_fixtures import clip
from transformers import CsmConfig, CsmDepthDecoderConfig, CsmForConditionalGeneration, MimiConfig

import csm_jax

ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_codec_from_csm_directory(tmp_path):
    torch.manual_seed(0)
    depth = CsmDepthDecoderConfig(num_codebooks=4, backbone_hidden_size=64, vocab_size=17, hidden_size=32,
                                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=5, rope_parameters=ROPE)
    mimi = MimiConfig(hidden_size=16, num_filters=4, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=8, codebook_dim=8, vector_quantization_hidden_dimension=8,
                      num_quantizers=4, codebook_size=16, upsample_groups=16, sliding_window=6)
    cfg = CsmConfig(num_codebooks=4, vocab_size=17, text_vocab_size=50, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rope_parameters=ROPE, pad_token_id=None, bos_token_id=None, audio_token_id=None,
                    audio_eos_token_id=None, depth_decoder_config=depth, codec_config=mimi)
    model = CsmForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, buf in model.codec_model.named_buffers():
            if name.endswith("embed_sum"):
                buf.normal_()
    model.save_pretrained(tmp_path)

    codec = csm_jax.load_codec(tmp_path)
    audio = clip("speech_1s")
    with torch.no_grad():
        ref = model.codec_model.encode(torch.from_numpy(audio)[None, None]).audio_codes.numpy()
        ref_audio = model.codec_model.decode(torch.from_numpy(ref)).audio_values[:, 0].numpy()
    assert codec.config.num_quantizers == 4
    assert np.mean(np.asarray(codec.encode(audio[None])) == ref) >= 0.999
    assert np.abs(np.asarray(codec.decode(ref)) - ref_audio).max() <= 1e-4 * max(1.0, np.abs(ref_audio).max())
