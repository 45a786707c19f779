"""Sesame CSM in Flax: Llama-style backbone (codebook 0) and depth decoder (codebooks 1..K-1)."""

from csm_jax.csm.config import CsmConfig, LlamaConfig, csm_1b
from csm_jax.csm.generator import Generator, Segment, load_csm
from csm_jax.csm.model import Csm
from csm_jax.csm.weights import load_csm_params, save_converted

__all__ = ["Csm", "CsmConfig", "Generator", "LlamaConfig", "Segment", "csm_1b", "load_csm", "load_csm_params",
           "save_converted"]
