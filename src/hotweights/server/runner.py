"""Assemble a server from a `Config` and run it: blocking (the CLI) or in a thread (tests,
the demo, the benchmarks)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from hotweights.config import Config
from hotweights.core import CanaryPolicy, Loader, MemoryCheck, Notice, Reloader
from hotweights.core.loader import LibraryImporting
from hotweights.server.app import create_app
from hotweights.server.server_state import ServedModel, ServerState

log = logging.getLogger("hotweights.server")

# How long before uvicorn cancels what is left of a shutdown the responses still
# generating are told to stop (each at its next token, with an error).
CUT_MARGIN_S = 1.0


def default_model_name(source: str) -> str:
    """`models/my-llm/3` serves as `my-llm`; any other directory by its own name."""
    path = Path(source).resolve()
    return path.parent.name if path.name.isdigit() else path.name


def build_state(
    config: Config,
    loader: Loader[Any] | None = None,
    observers: tuple[Callable[[Notice], None], ...] = (),
    canary: CanaryPolicy | None = None,
) -> ServerState:
    """The models `config` asks for, each with its own reloader: every model of
    `config.repo` (watched), or the one directory `config.source`. `loader` (default: a
    transformers loader per model) turns a version directory into a model; `canary`
    replaces the config's canary (a fleet replica holds each prepared version)."""

    def make_loader() -> Loader[Any]:
        return loader if loader is not None else transformers_loader(config)

    from hotweights.sources.gate_spec import GateSpec, QualityGate

    spec = GateSpec.from_file(config.gate) if config.gate else None

    def served(name: str) -> ServedModel:
        reloader: Reloader[Any] = Reloader(
            make_loader(),
            name=name,
            policy=config.policy,
            drain_timeout=config.drain_timeout,
            admission_timeout=config.admission_timeout,
            phase_timeout=config.phase_timeout or None,
            memory=_memory_check(config),
            gate=QualityGate(spec),
            canary=canary or config.canary_policy(),
        )
        for observer in observers:
            reloader.subscribe(observer)
        return ServedModel(name, reloader, int(time.time()))

    if config.repo is not None:
        from hotweights.sources import ModelRepository, RepositorySync, make_watcher

        repository = ModelRepository(
            config.repo, verify=config.verify, settle_seconds=config.settle_seconds
        )
        state = repository.scan()
        if not state.readable:
            raise ValueError(f"cannot read the model repository {config.repo}: {state.error}")
        names = repository.models()
        if not names:
            raise ValueError(f"the model repository {config.repo} holds no model directories")
        server = ServerState(config, {name: served(name) for name in names})
        watcher = make_watcher(config.watch, repository.root, interval=config.poll_interval)
        reloaders = {name: m.reloader for name, m in server.models.items()}
        server.sync = RepositorySync(repository, reloaders, watcher)
        return server
    if config.source is None:
        raise ValueError("nothing to serve: give a model directory or --repo")
    name = config.model_name or default_model_name(config.source)
    return ServerState(config, {name: served(name)})


def _memory_check(config: Config) -> MemoryCheck | None:
    """Refuses a version that will not fit in the memory of the device it loads onto: the
    host's for the CPU, what `torch.cuda.mem_get_info` says is free for a GPU."""
    if not config.memory_check:
        return None
    from hotweights.backends.devices import free_bytes

    device = config.device
    return MemoryCheck(available=lambda: free_bytes(device))


def transformers_loader(config: Config) -> Loader[Any]:
    """The loader `hotweights serve` uses: transformers behind the batched engine."""
    from hotweights.backends import TransformersLoader
    from hotweights.engine.batching_loader import BatchingLoader, EngineSettings

    inner = TransformersLoader(
        dtype=config.dtype,
        device=config.device,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
        load_in=config.loads_in(),
        thread_from=config.thread_from(),
    )
    settings = EngineSettings(
        max_batch=config.max_batch_size,
        kv_cache_bytes=config.kv_cache_bytes(),
        max_sequence_tokens=config.max_prompt_tokens + config.max_tokens_limit,
        batched=config.batching,
    )
    return BatchingLoader(inner, settings)


def load_initial(state: ServerState) -> None:
    """Start loading what should be live (the startup trigger): the repository's targets,
    which fall back to older versions one by one if the newest fail, or the source."""
    if state.sync is not None:
        state.sync.start()
        return
    source = state.config.source
    for served in state.models.values():
        if source is not None:
            served.reloader.submit(source, trigger="startup", description="initial version")


def build_app(state: ServerState) -> FastAPI:
    return create_app(state, on_startup=load_initial)


class GracefulServer(uvicorn.Server):
    """uvicorn with a readiness step: on SIGTERM, /ready turns 503 and new requests are
    refused for `shutdown_delay` seconds before the listener closes; requests in flight
    (streams included) then get up to the drain timeout to finish. Those still generating
    a moment before that grace ends stop at their next token with an error (an SSE error
    event, or a 503) rather than being cut off without a word when uvicorn cancels them."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        delay = self.state.config.shutdown_delay
        if sig != signal.SIGTERM or self.state.stopping or delay <= 0:
            self.state.stopping = True
            super().handle_exit(sig, frame)
            return
        self.state.stopping = True
        log.info("SIGTERM: not ready; closing the listener in %.1f s", delay)
        timer = threading.Timer(delay, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.config.timeout_graceful_shutdown
        if grace:
            margin = min(CUT_MARGIN_S, grace / 2)
            asyncio.get_running_loop().call_later(grace - margin, self.state.cut.set)
        await super().shutdown(sockets)


def freeze_startup_heap(state: ServerState) -> None:
    """Import the loaders' libraries, then move every object alive now to the collector's
    permanent generation. Call once, in a process that serves, before the first load.

    With torch and transformers imported a process holds about 350,000 objects that live
    as long as it does. An unload ends with a full collection (a model's reference cycles
    are freed there); walking them all holds the GIL for 0.2-0.35 s on this machine,
    stalling every request in flight. Frozen, they are skipped, and the collection takes
    under a millisecond. Objects created later (every model version) are collected as
    before."""
    for served in state.models.values():
        loader = served.reloader.loader
        if isinstance(loader, LibraryImporting):
            loader.import_libraries()
    gc.collect()
    gc.freeze()
    log.debug("%d objects frozen before the first load", gc.get_freeze_count())


def serve(state: ServerState) -> None:
    """Run until interrupted (SIGINT/SIGTERM end it gracefully)."""
    freeze_startup_heap(state)
    config = state.config
    uvicorn_config = uvicorn.Config(
        build_app(state),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=int(config.drain_timeout) or None,
        timeout_keep_alive=keep_alive(config),
    )
    GracefulServer(uvicorn_config, state).run()


def keep_alive(config: Config) -> int:
    """uvicorn's idle-connection timeout (whole seconds, at least one)."""
    return max(1, round(config.keep_alive_timeout))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ServerThread:
    """A real uvicorn server on a background thread, for tests, the demo and benchmarks."""

    def __init__(self, state: ServerState, port: int | None = None, grace: int = 5) -> None:
        self.state = state
        self.port = port or free_port(state.config.host)
        self.url = f"http://{state.config.host}:{self.port}"
        config = uvicorn.Config(
            build_app(state),
            host=state.config.host,
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=grace,
            timeout_keep_alive=keep_alive(state.config),
        )
        self.server = GracefulServer(config, state)
        self._thread = threading.Thread(target=self.server.run, name="hotweights-uvicorn")

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def wait_live(self, timeout: float = 120.0) -> None:
        """Wait until every model has a live version; raise if a load failed first."""
        deadline = time.monotonic() + timeout
        for served in self.state.models.values():
            while served.reloader.live_version is None:
                # A repository falls back to older versions; a lone source has no fallback.
                failed = [e for e in served.reloader.log.recent() if not e.succeeded]
                if failed and self.state.sync is None:
                    raise RuntimeError(f"{served.name} failed to load: {failed[0].error_message}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{served.name} did not go live within {timeout} s")
                time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
