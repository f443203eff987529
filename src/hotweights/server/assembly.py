"""The assembly of a server: `Config` → loader → reloader (with its gate, canary and memory
check) → `ServerState`, and the process readied to serve it.

One module that `hotweights serve`, the demo and each fleet replica use; it imports no
HTTP framework, so a caller that hosts the state its own way (a Ray Serve replica) gets
it without the runner. Running the HTTP server is `server/runner.py`'s.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotweights.config import Config
from hotweights.core import Loader, MemoryCheck, Notice, Reloader
from hotweights.core.loader import LibraryImporting
from hotweights.digests import DigestChecking
from hotweights.server.adapters import (
    AdapterResidency,
    adopt_adapter,
    follow_bases,
    holds_adapters,
    serve_adapter,
)
from hotweights.server.memory_versions import MemoryVersions
from hotweights.server.server_state import ServedModel, ServerState

log = logging.getLogger("hotweights.server")


def default_model_name(source: str) -> str:
    """`models/my-llm/3` serves as `my-llm`; any other directory by its own name."""
    path = Path(source).resolve()
    return path.parent.name if path.name.isdigit() else path.name


def build_state(
    config: Config,
    loader: Loader[Any] | None = None,
    observers: tuple[Callable[[Notice], None], ...] = (),
) -> ServerState:
    """The models `config` asks for, each with its own reloader: every model of
    `config.repo` (watched), or the one directory `config.source`. `loader` (default: a
    transformers loader per model) turns a version directory into a model.

    In `digest` mode the default loader checks each file's digest on the pass that reads
    it, and so may a given loader (`DigestChecking`); the repository's scan then checks
    the manifest's listing and sizes only, and a version's bytes are read once."""

    pushed = MemoryVersions()  # the server's in-memory pushed versions: mapped, not copied

    def make_loader() -> Loader[Any]:
        return loader if loader is not None else transformers_loader(config, pushed.__contains__)

    from hotweights.sources.gate_spec import GateSpec
    from hotweights.sources.quality_gate import QualityGate

    spec = GateSpec.from_file(config.gate) if config.gate else None

    def make_reloader(model_loader: Loader[Any], name: str) -> Reloader[Any]:
        reloader: Reloader[Any] = Reloader(
            model_loader,
            name=name,
            policy=config.policy,
            drain_timeout=config.drain_timeout,
            admission_timeout=config.admission_timeout,
            phase_timeout=config.phase_timeout or None,
            memory=memory_check(config),
            gate=QualityGate(spec),
            canary=config.canary_policy(),
        )
        for observer in observers:
            reloader.subscribe(observer)
        return reloader

    def served(name: str) -> ServedModel:
        return ServedModel(name, make_reloader(make_loader(), name), int(time.time()))

    def serving(models: dict[str, ServedModel], adapters: list[str]) -> ServerState:
        """The state, with the repository's adapters served beside their bases."""
        state = ServerState(config, models, make_reloader=make_reloader, pushed=pushed)
        if config.max_resident_adapters:
            state.residency = AdapterResidency(state, config.max_resident_adapters)
        for name in adapters:
            state.add(serve_adapter(state, name))
        follow_bases(state)
        return state

    if config.repo is not None:
        from hotweights.sources import ModelRepository, RepositorySync, make_watcher

        checks = loader.checks_digests if isinstance(loader, DigestChecking) else loader is None
        repository = ModelRepository(
            config.repo,
            verify=config.verify,
            settle_seconds=config.settle_seconds,
            loader_checks_digests=checks,
        )
        state = repository.scan()
        if not state.readable:
            raise ValueError(f"cannot read the model repository {config.repo}: {state.error}")
        names = repository.models()
        if not names:
            raise ValueError(f"the model repository {config.repo} holds no model directories")
        adapters = [name for name in names if holds_adapters(repository.root / name)]
        bases = [name for name in names if name not in adapters]
        server = serving({name: served(name) for name in bases}, adapters)
        watcher = make_watcher(config.watch, repository.root, interval=config.poll_interval)
        reloaders = {name: m.reloader for name, m in server.models.items()}
        server.sync = RepositorySync(repository, reloaders, watcher)
        server.sync.adopt = lambda name: adopt_adapter(server, repository.root / name)
        return server
    if config.source is None:
        raise ValueError("nothing to serve: give a model directory or --repo")
    name = config.model_name or default_model_name(config.source)
    return serving({name: served(name)}, [])


def memory_check(config: Config) -> MemoryCheck | None:
    """Refuses a version that will not fit in the memory of the device it loads onto: the
    host's for the CPU, what `torch.cuda.mem_get_info` says is free for a GPU."""
    if not config.memory_check:
        return None
    from hotweights.backends.devices import free_bytes

    device = config.device
    return MemoryCheck(available=lambda: free_bytes(device))


def transformers_loader(
    config: Config, in_place: Callable[[str], bool] | None = None
) -> Loader[Any]:
    """The loader `hotweights serve` uses: transformers behind the batched engine.
    `in_place` names the sources whose pages it may keep mapped (see `TransformersLoader`)."""
    from hotweights.backends import TransformersLoader
    from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
    from hotweights.sources import expected_digests

    inner = TransformersLoader(
        dtype=config.dtype,
        device=config.device,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
        load_in=config.loads_in(),
        thread_from=config.thread_from(),
        expected_digests=expected_digests if config.verify == "digest" else None,
        in_place=in_place,
    )
    settings = EngineSettings(
        max_batch=config.max_batch_size,
        kv_cache_bytes=config.kv_cache_bytes(),
        max_sequence_tokens=config.max_prompt_tokens + config.max_tokens_limit,
        batched=config.batching,
        max_batch_tokens=config.max_batch_tokens,
        prefill_chunk=config.prefill_chunk,
        prefix_cache=config.prefix_cache,
        threads=config.threads,
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
