"""The conversation server: model, engine and store (`build_service`) behind one HTTP port (`csm_jax.serving.http`:
the WebSocket protocol v1 of docs/protocol.md, OpenAI speech, metrics, the web client)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

from aiohttp import web
from jax.sharding import Mesh

from csm_jax.conversation import ConversationManager
from csm_jax.csm.generator import Generator
from csm_jax.dialogue.responder import build_responder
from csm_jax.dialogue.transcriber import build_transcriber
from csm_jax.serving.config import MeshConfig, NetConfig, ServeConfig
from csm_jax.serving.http import ready_line, start_http
from csm_jax.serving.scheduler import Scheduler
from csm_jax.serving.service import Service

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def resolve_token(net: NetConfig) -> NetConfig:
    """`token_file` read into `token`; refuses a public bind without a token unless explicitly allowed."""
    if net.token_file:
        try:
            token = Path(net.token_file).expanduser().read_text().strip()
        except OSError as e:
            raise ValueError(f"server.token_file: cannot read {net.token_file}: {e}") from None
        if not token:
            raise ValueError(f"server.token_file: {net.token_file} is empty")
        net = dataclasses.replace(net, token=token)
    if not net.token and not is_loopback(net.host):
        if not net.allow_public_without_token:
            raise ValueError(f"refusing to listen on {net.host} without a token: anyone who can reach it could use "
                             "the model and read every conversation. Set CSM_JAX_TOKEN or server.token_file, or "
                             "server.allow_public_without_token=true")
        log.warning("listening on %s WITHOUT a token: anyone who can reach this port can use the server", net.host)
    return net


class MeshError(ValueError):
    """The configured mesh does not fit this machine's devices or the model; the server stops with one line."""


def serving_mesh(config: MeshConfig) -> Mesh | None:
    """The (data, tensor) mesh of `config` over this host's devices (csm_jax.sharding.make_mesh); None when it is
    1 x 1 (one device, unsharded). Raises MeshError when it does not fit the devices."""
    import jax

    from csm_jax import sharding

    devices = jax.local_devices()
    try:
        data, tensor = sharding.mesh_shape(config.data, config.tensor, len(devices))
    except ValueError as e:
        raise MeshError(f"{e} ({devices[0].platform} on this host)") from None
    if data * tensor == 1:
        return None
    log.info("serving on a mesh of data=%d x tensor=%d (%d of %d %s devices)", data, tensor, data * tensor,
             len(devices), devices[0].platform)
    return sharding.make_mesh(data, tensor, devices)


def check_mesh_fits(mesh: Mesh | None, generator: Generator, batch_size: int) -> None:
    """Refuse a mesh that would leave a device idle or duplicate work: `tensor` must divide the backbone's attention
    heads, `data` the engine's batch (otherwise csm_jax.sharding would silently replicate those dimensions)."""
    if mesh is None:
        return
    heads = generator.cfg.backbone.num_heads
    if heads % mesh.shape["tensor"]:
        raise MeshError(f"mesh tensor={mesh.shape['tensor']} does not divide the model's {heads} attention heads")
    if batch_size % mesh.shape["data"]:
        raise MeshError(f"mesh data={mesh.shape['data']} does not divide engine.batch_size={batch_size}")


def build_generator(config: ServeConfig, mesh: Mesh | None = None) -> tuple[Generator, str]:
    """The served model (a checkpoint, the built-in default voice, or the tiny random model) on `mesh` ->
    (generator, model name); checks the mesh fits it. It computes in `model.dtype`, else (no `model.quantize`)
    in the backend policy's `serving_dtype`."""
    from csm_jax import backend
    from csm_jax.csm.generator import load_csm
    from csm_jax.csm.quantize import cast_params, quantize_params
    from csm_jax.default_model import NAME, RANDOM_NAME, VOICE_DIR, random_generator

    rules = config.mesh.resolved_rules()
    m = config.model
    dtype = m.dtype or (None if m.quantize else backend.resolve(config.engine.backend).serving_dtype)
    if m.random_seed is not None:
        if m.path is not None:
            raise ValueError("model.path and model.random_seed exclude each other: pass one")
        generator, name = random_generator(m.random_seed), RANDOM_NAME
        params, cfg = generator.params, generator.cfg
        if m.quantize is not None:
            params, cfg = quantize_params(params, cfg, m.quantize, dtype)
        elif dtype != cfg.dtype:
            params, cfg = cast_params(params, dtype), cfg.replace(dtype=dtype)
        if m.num_codebooks is not None or m.quantize is not None or cfg != generator.cfg or mesh is not None:
            generator = Generator(params, cfg, generator.codec, generator.tokenizer, m.num_codebooks, mesh, rules,
                                  frontend=generator.prompt_format().frontend)
    else:
        generator = load_csm(m.path or VOICE_DIR, codec=m.codec, num_codebooks=m.num_codebooks, dtype=dtype,
                             quantize=m.quantize, backend=config.engine.backend, mesh=mesh, rules=rules)
        name = NAME if m.path is None else Path(m.path).name
    if generator.tokenizer is None or generator.codec is None:
        raise ValueError(f"{m.path}: the server needs a checkpoint with tokenizer.json and a codec "
                         "(pass model.codec=...)")
    check_mesh_fits(mesh, generator, config.engine.batch_size)
    return generator, name


def build_service(config: ServeConfig, mesh: Mesh | None = None) -> Service:
    """Load the model (or build the default one) on `mesh` (default: the one `config.mesh` describes), open the
    store, start the engine thread after warmup."""
    from csm_jax import backend
    from csm_jax.conversation import open_store

    if config.engine.compile_cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(config.engine.compile_cache_dir).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if mesh is None:
        mesh = serving_mesh(config.mesh)
    store = open_store(config.storage.url or config.storage.path)  # before the model: a bad database fails fast
    backend.configure(config.engine.backend)  # this process's backend policy, overrides from config
    generator, name = build_generator(config, mesh)
    fmt = generator.prompt_format()  # the model's conversation format; context.max_turns may override its window
    if config.context.max_turns is not None:
        fmt = fmt.with_context(config.context.max_turns)
    manager = ConversationManager(store, fmt, generator.cfg.backbone.max_seq_len)
    scheduler = Scheduler(generator, config.engine.batch_size)
    if config.engine.warmup_rows:
        t = scheduler.warmup(config.engine.warmup_rows, config.engine.warmup_batched_rows)
        log.info("warmup (compilation) took %.1f s", t)
    transcriber = build_transcriber(config.transcriber)
    responder = build_responder(config.responder)
    scheduler.start()
    return Service(config, generator, scheduler, manager, name, transcriber, responder)


async def start_server(service: Service) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve `service` on its configured host and port -> (runner, bound (host, port))."""
    return await start_http(service)


async def serve_forever(config: ServeConfig) -> None:
    t0 = time.perf_counter()
    config = dataclasses.replace(config, server=resolve_token(config.server))  # before the (slow) model load
    try:
        mesh = serving_mesh(config.mesh)  # before the model load too
        service = await asyncio.to_thread(build_service, config, mesh)
    except MeshError as e:  # one clear line and exit status 1, as an unreachable database
        raise SystemExit(f"csm-jax: {e}") from None
    runner, address = await start_server(service)
    print(f"csm-jax server ready in {time.perf_counter() - t0:.1f} s on the model {service.model_name!r}\n"
          f"{ready_line(service.model_name, address)}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        service.scheduler.stop()
        service.manager.store.close()
