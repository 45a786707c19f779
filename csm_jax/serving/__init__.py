"""Serving: the continuous-batching engine loop, user audio turns, the WebSocket protocol, OpenAI speech, metrics."""

from csm_jax.serving.config import ServeConfig
from csm_jax.serving.scheduler import Request, Result, Scheduler
from csm_jax.serving.server import build_service, serve_forever, start_server
from csm_jax.serving.service import Service

__all__ = ["Request", "Result", "Scheduler", "ServeConfig", "Service", "build_service", "serve_forever",
           "start_server"]
