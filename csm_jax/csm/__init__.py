"""Sesame CSM in Flax: Llama-style backbone (codebook 0) and depth decoder (codebooks 1..K-1)."""

from csm_jax.csm.config import CsmConfig, LlamaConfig, csm_1b
from csm_jax.csm.model import Csm
from csm_jax.csm.weights import load_csm_params, save_converted

__all__ = ["Csm", "CsmConfig", "LlamaConfig", "csm_1b", "load_csm_params", "save_converted"]
