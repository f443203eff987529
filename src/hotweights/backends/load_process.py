"""Loading in a helper process, so that a reload does not take the GIL from requests.

`from_pretrained` is mostly Python. Run on a thread of the serving process, it holds the
GIL for most of its ~0.05-0.1 s, and a request generating beside it runs slower meanwhile
(every torch op a request makes releases the GIL and has to win it back). Run in another
process, that Python costs the server nothing; the copy into shared memory and the pickled
module tree cost time instead, which grows with the model (`bench/load_interference.py`:
at 97 MB a helper load costs the requests beside it 87 ms in all against 123 ms on a
thread; at 1.3 GB 169 ms against 98 ms, and takes 1.07 s against 0.64 s).

The helper is spawned once per `LoadProcess` and kept: each load imports nothing. It reads
the checkpoint on the CPU, then moves every parameter and buffer into one block of shared
memory and sends the model and tokenizer back over a pipe, dropping its own references.
The server receives one file descriptor and rebuilds the module tree around it in a few
milliseconds: the weights live once, in the server.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from hotweights.errors import LoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("hotweights.backends")

# The helper yields the CPU to the server when both want it.
HELPER_NICENESS = 10
_BLOCK_ALIGNMENT = 64


@dataclass(frozen=True)
class LoadRequest:
    """What the helper needs to read one checkpoint (on the CPU)."""

    root: str
    dtype: str
    """`float32`, `bfloat16` or `float16`."""
    trust_remote_code: bool
    use_safetensors: bool


def read_pretrained(request: LoadRequest) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (on the CPU, eval mode) and tokenizer of `request.root`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # A server reports its own load progress; transformers' bars would interleave.
    quiet: Callable[[], None] = hf_logging.disable_progress_bar  # unannotated upstream
    quiet()
    tokenizer = AutoTokenizer.from_pretrained(
        request.root, trust_remote_code=request.trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        request.root,
        dtype=getattr(torch, request.dtype),
        trust_remote_code=request.trust_remote_code,
        use_safetensors=request.use_safetensors,
    )
    model.train(False)
    return model, tokenizer


class LoadProcess:
    """A helper process that runs `read_pretrained` and hands back shared-memory models.

    One load at a time. A load that finds another still running takes it for abandoned
    (its caller timed out: a loader's loads are sequential) and replaces the helper, which
    fails the abandoned load. A helper that dies is replaced at the next load.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the fields, never held across a load
        self._busy = False
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        """The helper's process id, None before it starts."""
        process = self._process
        return process.pid if process is not None else None

    def start(self) -> None:
        """Start the helper now if it is not running (it imports torch and transformers:
        seconds, on its own CPU time)."""
        with self._lock:
            self._ensure_started()

    def load(self, request: LoadRequest) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Read `request` in the helper. Raises `LoadError` with the helper's reason, or
        when the helper dies or is replaced before it answers."""
        with self._lock:
            if self._busy:
                log.warning("a load is still running in the helper process; replacing it")
                self._stop()
            conn, process = self._ensure_started()
            self._busy = True
        try:
            return self._exchange(conn, process, request)
        finally:
            with self._lock:
                if self._conn is conn:
                    self._busy = False

    def close(self) -> None:
        """Stop the helper (it is also a daemon: it ends with this process)."""
        with self._lock:
            self._stop()

    def _exchange(
        self, conn: Connection, process: BaseProcess, request: LoadRequest
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        import torch.multiprocessing  # noqa: F401  (registers the reducers that share tensors)

        try:
            conn.send(("load", request))
            reply = conn.recv()  # unpickling fetches the block's descriptor from the helper
            if reply[0] == "loaded":
                return reply[1]  # type: ignore[no-any-return]
        except (EOFError, OSError) as exc:
            process.join(timeout=5)
            with self._lock:
                if self._process is process:  # not replaced meanwhile: the next load starts one
                    self._process, self._conn, self._busy = None, None, False
            conn.close()
            raise LoadError(
                f"the load process for {request.root} ended before answering "
                f"(exit code {process.exitcode}): {type(exc).__name__}"
            ) from exc
        _, kind, message = reply
        raise LoadError(f"could not load {request.root}: {kind}: {message}")

    def _ensure_started(self) -> tuple[Connection, BaseProcess]:
        if self._process is not None and self._conn is not None and self._process.is_alive():
            return self._conn, self._process
        self._stop()
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_helper_main, args=(theirs,), name="hotweights-loader", daemon=True
        )
        process.start()
        theirs.close()
        self._process, self._conn, self._busy = process, ours, False
        log.info("load process %s started", process.pid)
        return ours, process

    def _stop(self) -> None:
        """Kill the helper. A load in flight sees the pipe end and closes its side itself;
        closing it here, under a thread blocked reading it, could hand that thread a
        reused descriptor."""
        process, conn, busy = self._process, self._conn, self._busy
        self._process, self._conn, self._busy = None, None, False
        if conn is not None and not busy:
            conn.close()
        if process is not None and process.is_alive():
            process.kill()
            process.join(timeout=5)


def share_in_one_block(model: PreTrainedModel) -> None:
    """Move every parameter and buffer of `model` into views of one shared-memory block
    (tied weights stay tied: each tensor is moved once)."""
    import torch

    tensors: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        tensors.setdefault(id(tensor), tensor)
    sizes = [_aligned(t.numel() * t.element_size()) for t in tensors.values()]
    block: Any = torch.empty(max(sum(sizes), 1), dtype=torch.uint8)
    block.share_memory_()  # unannotated upstream
    offset = 0
    with torch.no_grad():
        for tensor, size in zip(tensors.values(), sizes, strict=True):
            length = tensor.numel() * tensor.element_size()
            view = block[offset : offset + length].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)
            tensor.data = view
            offset += size


def _aligned(length: int) -> int:
    return -(-length // _BLOCK_ALIGNMENT) * _BLOCK_ALIGNMENT


def _helper_main(conn: Connection) -> None:
    """The helper's loop: read, share, send, forget. Until the server fetches it, a
    duplicate of the block's descriptor (held by multiprocessing's resource sharer)
    keeps the block alive."""
    os.nice(HELPER_NICENESS)
    import torch
    import torch.multiprocessing  # registers the reducers that share tensors

    torch.set_num_threads(1)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the server closed the pipe or exited
            return
        request: LoadRequest = message[1]
        try:
            conn.send_bytes(_read_and_share(request))
        except OSError:  # the server is gone
            return


def _read_and_share(request: LoadRequest) -> bytes:
    """The pickled reply to one load request (what `Connection.send` would send):
    `("loaded", (model, tokenizer))`, or `("failed", type, message)` when reading or
    pickling fails (a remote-code model that cannot be pickled, say)."""
    from multiprocessing.reduction import ForkingPickler

    try:
        model, tokenizer = read_pretrained(request)
        share_in_one_block(model)
        return bytes(ForkingPickler.dumps(("loaded", (model, tokenizer))))
    except Exception as exc:
        return bytes(ForkingPickler.dumps(("failed", type(exc).__name__, str(exc))))
