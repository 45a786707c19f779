"""Evaluation beyond the loss: intelligibility of generated speech."""

from csm_jax.evaluation.intelligibility import Intelligibility, normalize

__all__ = ["Intelligibility", "normalize"]
