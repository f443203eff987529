"""Weights pushed from a trainer: `POST /admin/models/{name}/versions`.

The body is one safetensors file, streamed (every tensor of the model, or only those that
changed against a base version: the live one, or `?base=N`). The server writes it to a
staging directory as it arrives, checks its header against the base as soon as the header
is in (names and shapes; a bad tensor is refused before the rest is read), assembles a
complete version there (`backends/pushed_weights.py`), and makes it live the way every
version goes live (prepare, then commit: validate, warm up, gate, canary). The answer is
the reload event once it is live; 422 when it was refused, 409 when a newer one superseded
it, 400 for weights that do not fit the base.

- With `--repo`, the version is staged in the repository (a hidden directory, renamed to
  the next version number with its manifest, as `hotweights publish` does): a restart
  keeps it, and the watcher's policy decides as for any published version.
- Without one, it is staged in memory (a directory under /dev/shm where there is one),
  removed once the version is retired, or at once if it never went live.
- A client on the same host may hand over a file it wrote under /dev/shm instead of a
  body (header `x-hotweights-push-file`): the server moves it into place without a copy
  when the staging directory is on the same filesystem.

A client that goes away mid-stream leaves nothing behind: the staging directory is
removed, and the live version serves on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from hotweights.backends.files import ModelFiles, inspect_model_dir
from hotweights.backends.pushed_weights import assemble, header_of, plan_push
from hotweights.backends.safetensors_header import read_header
from hotweights.core import Outcome, ReloadEvent, ReloadTicket
from hotweights.errors import (
    Forbidden,
    InvalidRequest,
    LoadError,
    NotReady,
    ReloadFailed,
    ReloadSuperseded,
    UnknownVersion,
)
from hotweights.server.deps import Admin
from hotweights.server.memory_versions import MemoryVersions
from hotweights.server.outcomes import failure_message
from hotweights.server.server_state import ServedModel, ServerState
from hotweights.sources import StagedVersion, stage

log = logging.getLogger("hotweights.server")
router = APIRouter()

SHM_DIR = Path("/dev/shm")
PUSH_FILE_HEADER = "x-hotweights-push-file"
PUSH_FILE_PREFIX = "hotweights-push-"
INCOMING = ".pushed.safetensors"
"""The received file's name in the staging directory (hidden: never taken for weights)."""


@router.post("/admin/versions", response_model=None)
@router.post("/admin/models/{name}/versions", response_model=None)
async def push_version(
    state: Admin,
    request: Request,
    name: str | None = None,
    base: Annotated[int | None, Query(ge=1)] = None,
    description: Annotated[str, Query(max_length=1000)] = "",
) -> Response:
    served = state.only_model() if name is None else state.resolve(name)
    base_dir, label = _base(state, served, base)
    files = await asyncio.to_thread(_inspect_base, base_dir, label)
    staging = await asyncio.to_thread(_Staging.open, state, served.name)
    text = description or f"pushed over {label}"
    try:
        handed = request.headers.get(PUSH_FILE_HEADER)
        if handed is not None:
            await asyncio.to_thread(_take_file, Path(handed), staging.incoming)
        else:
            await _receive(request, staging.incoming, files, label)
        header = await asyncio.to_thread(_checked_header, staging.incoming)
        plan = plan_push(files, header.tensors, label)
        await asyncio.to_thread(assemble, plan, staging.incoming, staging.path)
        source = await asyncio.to_thread(staging.commit, text)
    except BaseException:
        await asyncio.to_thread(staging.discard)
        raise
    event = await _go_live(state, served, source, text)
    return JSONResponse(event.to_dict())


class _Staging:
    """Where one push is written: a hidden directory in the repository, or in memory."""

    def __init__(self, path: Path, staged: StagedVersion | None, memory: MemoryVersions) -> None:
        self.path = path
        self.incoming = path / INCOMING
        self._staged = staged
        self._memory = memory

    @classmethod
    def open(cls, state: ServerState, model: str) -> _Staging:
        if state.config.repo is not None:
            staged = stage(state.config.repo, model)
            return cls(staged.path, staged, state.pushed)
        root = SHM_DIR if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) else None
        path = Path(tempfile.mkdtemp(prefix=PUSH_FILE_PREFIX + f"{model}-", dir=root))
        return cls(path, None, state.pushed)

    def commit(self, description: str) -> str:
        """The version's source: the repository's new version directory, or this one."""
        if self._staged is None:
            self._memory.add(str(self.path))
            return str(self.path)
        return str(self._staged.commit(description=description).path)

    def discard(self) -> None:
        if self._staged is not None:
            self._staged.discard()
        else:
            self._memory.remove(str(self.path))
            shutil.rmtree(self.path, ignore_errors=True)


def _base(state: ServerState, served: ServedModel, base: int | None) -> tuple[Path, str]:
    """The directory of the version a push builds on, and how to name it in messages."""
    if base is None:
        live = served.reloader.live_version
        if live is None:
            raise NotReady(f"{served.name!r} has no live version to push over (give ?base=N)")
        return Path(live.source), f"g{live.generation} ({live.source})"
    if state.sync is not None:
        infos = {info.number: info for info in state.sync.repository.versions(served.name)}
        if base not in infos:
            raise UnknownVersion(f"{served.name!r} has no version {base} in the repository")
        return Path(infos[base].path), f"version {base} ({infos[base].path})"
    version = served.reloader.history.find(base)
    if version is None:
        raise UnknownVersion(f"{served.name!r} has no generation {base} in its history")
    return Path(version.source), f"g{base} ({version.source})"


def _inspect_base(path: Path, label: str) -> ModelFiles:
    try:
        return inspect_model_dir(path)
    except LoadError as exc:
        raise InvalidRequest(f"the base version {label} cannot take a push: {exc}") from exc


async def _receive(request: Request, target: Path, files: ModelFiles, label: str) -> None:
    """Write the body to `target` as it arrives. As soon as the header is in, check its
    tensors against the base (`plan_push`): weights that do not fit are refused before
    the rest of the body is read."""
    prefix = b""
    checked = False
    with target.open("wb") as sink:
        try:
            async for chunk in request.stream():
                if not checked:
                    prefix += chunk
                    header = header_of(prefix, "the pushed weights")
                    if header is not None:
                        plan_push(files, header[1], label)  # raises for a bad tensor
                        checked, prefix = True, b""
                sink.write(chunk)
        except ClientDisconnect:
            log.warning("a push over %s was abandoned mid-stream; nothing was kept", label)
            raise
    if not checked:
        raise InvalidRequest("the pushed weights are not a safetensors file (no header)")


def _take_file(handed: Path, target: Path) -> None:
    """Move a file the client wrote in /dev/shm into the staging directory."""
    real = Path(os.path.realpath(handed))
    if real.parent != Path(os.path.realpath(SHM_DIR)) or not real.name.startswith(PUSH_FILE_PREFIX):
        raise Forbidden(f"{handed}: a handed-over file must be {SHM_DIR}/{PUSH_FILE_PREFIX}*")
    try:
        info = os.lstat(handed)
    except OSError as exc:
        raise InvalidRequest(f"{handed}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise Forbidden(f"{handed}: not a regular file of this server's user")
    shutil.move(str(real), target)


def _checked_header(path: Path) -> Any:
    try:
        return read_header(path)
    except LoadError as exc:
        raise InvalidRequest(f"the pushed weights: {exc}") from exc


async def _go_live(state: ServerState, served: ServedModel, source: str, text: str) -> ReloadEvent:
    """Make the staged version live as any version goes live; its event, or the error."""
    reloader = served.reloader
    ticket: ReloadTicket | None
    if state.sync is None:
        ticket = reloader.submit(source, trigger="push", description=text)
    else:
        report = await asyncio.to_thread(state.sync.rescan, trigger="push")
        ticket = report.submitted.get(served.name)
        if ticket is None:  # the watcher was first, or the policy keeps another version
            done = next((e for e in reloader.log.recent() if e.target == source), None)
            if done is not None and done.succeeded:
                return done
        if ticket is None or ticket.target != source:
            raise ReloadSuperseded(
                f"{source} was published, but the repository's policy for {served.name!r} "
                "does not make it live (a pin or a newer version decides)",
                {"target": source, "outcome": Outcome.SUPERSEDED.value},
            )
    event = await ticket.wait_async()
    if event.succeeded:
        return event
    if event.outcome is Outcome.SUPERSEDED:  # never loaded: nothing will retire it
        state.pushed.remove(source)
        raise ReloadSuperseded(failure_message(event), event.to_dict())
    raise ReloadFailed(failure_message(event), event.to_dict())
