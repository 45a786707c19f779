"""Serving: the continuous-batching engine loop, user audio turns, and the WebSocket server (docs/protocol.md)."""

from csm_jax.serving.config import ServeConfig
from csm_jax.serving.scheduler import Request, Result, Scheduler
from csm_jax.serving.server import Service, build_service, serve_forever, start_server

__all__ = ["Request", "Result", "Scheduler", "ServeConfig", "Service", "build_service", "serve_forever",
           "start_server"]
