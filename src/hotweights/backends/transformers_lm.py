"""The Hugging Face transformers causal-LM backend: a `Loader` of `LoadedLM`s.

A source is a model directory (config.json, safetensors weights, tokenizer files, a chat
template). The directory is checked cheaply before torch reads any of it, so a truncated
copy or a refused format fails in milliseconds with a message that names the file.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

from hotweights.backends.devices import check_cuda, is_cuda, parse_device
from hotweights.backends.digest_check import DigestCheck
from hotweights.backends.files import ModelFiles, estimate_bytes, fingerprint, inspect_model_dir
from hotweights.backends.load_process import LoadProcess, LoadRequest, read_pretrained
from hotweights.backends.loaded_lm import LoadedLM
from hotweights.backends.per_request import DEFAULT_WORKERS
from hotweights.backends.private_weights import make_weights_private
from hotweights.digests import ExpectedDigests
from hotweights.errors import HotweightsError, LoadError, ValidationError
from hotweights.generation import GenerationParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[Dtype, ...] = get_args(Dtype)
Device = str
"""`cpu`, `cuda` or `cuda:N` (see `hotweights.backends.devices.parse_device`)."""
LoadIn = Literal["thread", "process"]
LOAD_IN: tuple[LoadIn, ...] = get_args(LoadIn)

VALIDATION_PROMPT = "Hello, world. 1 2 3"
WARMUP_PROMPT = "Hello"
WARMUP_TOKENS = 4
_CONCRETE_DTYPES = ("float32", "bfloat16", "float16")
T = TypeVar("T")


log = logging.getLogger("hotweights.backends")


class TransformersLoader:
    """Loads Hugging Face causal LMs from model directories, as `LoadedLM`s.

    Implements `Loader[LoadedLM]`, `Fingerprinting` and `SizeEstimating`. The constructor
    only stores its options; torch and transformers are imported on first use. Like every
    loader it is called from the reloader's worker thread, one call at a time (`unload`
    may overlap a later `load`).

    `dtype="auto"` keeps the checkpoint's declared dtype (config `dtype`/`torch_dtype`),
    float32 when it declares none. `device="cuda"` (or `"cuda:N"`) fails the load when
    CUDA or that GPU is not available; on a GPU the weights go from the checkpoint's mapped
    pages straight to the device, always on the calling thread (the helper's shared memory
    would only add a copy). Pickle-based weights and remote code are refused unless opted
    in.

    `load_in="process"` reads checkpoints in a helper process (see `load_process`) and
    receives the weights in shared memory, so a load does not hold this process's GIL
    for the tenth of a second `from_pretrained` takes; `"thread"` reads them on the
    calling thread (mapped, then read into private memory: `private_weights`). With
    `thread_from` set, a process loader reads checkpoints of at least that many weight
    bytes on the thread anyway: the helper's copy grows with the model, the thread's GIL
    cost does not. The helper starts at the first load, or at `import_libraries`.

    With `expected_digests` (a version's manifest, as `hotweights.sources.expected_digests`
    gives it), a load confirms every listed file's digest before it returns, and a version
    whose bytes differ fails with `VerificationError` naming each file, the expected and the
    actual digest. On the thread, on the CPU, each weight file is hashed on the pass that
    reads it into private memory; the helper process and a GPU read weights their own way,
    so there the files are hashed on threads beside that load (a second read, from the page
    cache). Config and tokenizer files are always hashed apart: they are small.

    `in_place(source)` names sources whose files belong to this server alone and are never
    rewritten (a version pushed without a repository, staged in memory): those are read on
    the thread and their weights stay the file's pages, mapped rather than copied.
    """

    def __init__(
        self,
        dtype: Dtype = "auto",
        device: Device = "cpu",
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        load_in: LoadIn = "thread",
        thread_from: int | None = None,
        expected_digests: ExpectedDigests | None = None,
        in_place: Callable[[str], bool] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        device = parse_device(device)
        if load_in not in LOAD_IN:
            raise ValueError(f"load_in must be one of {LOAD_IN}, got {load_in!r}")
        self.dtype = dtype
        self.device = device
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        self.load_in = load_in
        self.thread_from = thread_from
        self.expected_digests = expected_digests
        self.in_place = in_place
        on_cpu = not is_cuda(device)
        self._helper = LoadProcess() if load_in == "process" and on_cpu else None
        self._architecture: str | None = None  # of the version validated last

    @property
    def checks_digests(self) -> bool:
        """Whether loads confirm the digests of a version's manifest (`DigestChecking`)."""
        return self.expected_digests is not None

    def import_libraries(self) -> None:
        """Import torch and transformers' auto classes now (a few seconds, once per
        process) rather than in the first `load`, and start the load process if used."""
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        if self._helper is not None:
            self._helper.start()

    def close(self) -> None:
        """Stop the load process, if any (a later load starts another)."""
        if self._helper is not None:
            self._helper.close()

    def load(self, source: str) -> LoadedLM:
        """Check `source`, then load its model (eval mode) and tokenizer.

        Raises `LoadError` naming the path and file for a bad directory (see
        `inspect_model_dir`), for a CUDA device that is not there, and wrapping any error
        transformers raises while reading the files; `VerificationError` (or
        `ManifestError`) when files differ from the expected digests.
        """
        files = self._inspect(source)
        expected = self.expected_digests(source) if self.expected_digests else None
        check = DigestCheck(files.root, expected) if expected is not None else None
        missing = check_cuda(self.device)
        if missing is not None:
            raise LoadError(f"cannot load {source} on {self.device}: {missing}")
        dtype = self._resolve_dtype(files)
        digest = fingerprint(files)
        try:
            model, tokenizer = self._from_pretrained(files, dtype, check)
            return LoadedLM(
                model, tokenizer, source=source, device=self.device, dtype=dtype, fingerprint=digest
            )
        except HotweightsError:
            self._collect(cuda=is_cuda(self.device))
            raise
        except Exception as exc:
            self._collect(cuda=is_cuda(self.device))
            raise LoadError(f"could not load {files.root}: {type(exc).__name__}: {exc}") from exc

    def validate(self, model: LoadedLM) -> None:
        """Raise `ValidationError` unless the tokenizer fits the model's embedding and one
        forward pass on a fixed prompt gives finite logits."""
        import torch

        if model.tokenizer_size > model.vocab_size:
            raise ValidationError(
                f"{model.source}: the tokenizer has {model.tokenizer_size} tokens but the "
                f"model's embedding has only {model.vocab_size} rows"
            )
        ids = model.encode(VALIDATION_PROMPT)
        with torch.inference_mode():
            inputs = torch.tensor([ids], dtype=torch.long, device=model.device)  # (1, n)
            logits = model.model(input_ids=inputs, use_cache=False).logits  # (1, n, vocab)
            bad = int((~torch.isfinite(logits)).sum().item())
        if bad:
            raise ValidationError(
                f"{model.source}: a forward pass on a fixed prompt gave {bad} non-finite "
                f"logits out of {logits.numel()}"
            )
        previous, self._architecture = self._architecture, model.architecture
        if previous is not None and previous != model.architecture:
            # Allowed (clients only see text), but worth an operator's attention.
            log.warning(
                "%s: architecture changes from %s to %s", model.source, previous, model.architecture
            )

    def warmup(self, model: LoadedLM) -> None:
        """Generate a few greedy tokens, running every layer once with a KV cache; then,
        unless a wrapping loader already gave it one, give `model` its per-request engine
        (`DEFAULT_WORKERS` sequences at once)."""
        params = GenerationParams(temperature=0.0, max_tokens=WARMUP_TOKENS)
        for _ in model.stream(WARMUP_PROMPT, params):
            pass
        if model.engine is None:
            model.engine = model.per_request_engine(DEFAULT_WORKERS)
            model.engine_note = "per-request"

    def unload(self, model: LoadedLM) -> None:
        """Drop the model and tokenizer from `model`, collect garbage and, on CUDA, return
        cached memory to the device. Later use of `model` raises `ModelRetired`."""
        on_cuda = is_cuda(model.device) and not model.unloaded
        model.release()
        self._collect(cuda=on_cuda)

    def fingerprint(self, source: str) -> str:
        """A content digest of `source`'s config, tokenizer and weights (see
        `hotweights.backends.files.fingerprint`); raises `LoadError` for a bad directory."""
        return fingerprint(self._inspect(source))

    def estimate_bytes(self, source: str) -> int:
        """Weight bytes once loaded at this loader's dtype, from the safetensors headers."""
        files = self._inspect(source)
        return estimate_bytes(files, self._resolve_dtype(files))

    def _inspect(self, source: str) -> ModelFiles:
        return inspect_model_dir(source, allow_pickle=self.allow_pickle)

    def _resolve_dtype(self, files: ModelFiles) -> str:
        if self.dtype != "auto":
            return self.dtype
        declared = files.config_dtype
        return declared if declared in _CONCRETE_DTYPES else "float32"

    def _from_pretrained(
        self, files: ModelFiles, dtype: str, check: DigestCheck | None
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        request = LoadRequest(
            root=str(files.root),
            dtype=dtype,
            trust_remote_code=self.trust_remote_code,
            use_safetensors=files.weight_format == "safetensors",
        )
        weight_bytes = sum(header.tensor_bytes for header in files.headers)
        big = self.thread_from is not None and weight_bytes >= self.thread_from
        helper = self._helper if not big else None
        if check is not None:  # the small files first: a bad one may not even parse
            check.check_rest(skip=files.headers)
        if self.in_place is not None and self.in_place(str(files.root)) and check is None:
            model, tokenizer = read_pretrained(request)  # its pages are its own already
        elif helper is not None or is_cuda(self.device) or not files.headers:
            # The weights are read elsewhere (the helper, mapped pages to the GPU): hash
            # the files beside that read.
            model, tokenizer = _beside(check, lambda: _read(helper, request))
        else:
            model, tokenizer = read_pretrained(request)
            hashers = check.hashers(files.headers) if check is not None else None
            make_weights_private(model, files.headers, hashers)  # not the file's pages
            if check is not None and hashers is not None:
                check.confirm_streamed(files.headers, hashers)
                check.check_rest()
        untyped: Any = model  # transformers leaves `to` unannotated
        untyped.to(self.device)
        return model, tokenizer

    def _collect(self, *, cuda: bool) -> None:
        gc.collect()
        if cuda:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _read(
    helper: LoadProcess | None, request: LoadRequest
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return helper.load(request) if helper is not None else read_pretrained(request)


def _beside(check: DigestCheck | None, load: Callable[[], T]) -> T:
    """`load()`, with `check`'s files hashed on other threads meanwhile; raises the
    check's `VerificationError` after the load, which is then dropped."""
    if check is None:
        return load()
    with ThreadPoolExecutor(1, thread_name_prefix="hotweights-digest") as pool:
        checked = pool.submit(check.check_rest)
        loaded = load()
        checked.result()
    return loaded
