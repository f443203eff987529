"""The one frozen configuration object: defaults, then `HOTWEIGHTS_*` environment, then flags.

Nothing reads the environment at import time; `Config.load` does, when called.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from hotweights.backends.devices import parse_device
from hotweights.backends.transformers_lm import DTYPES, LOAD_IN, Device, Dtype, LoadIn
from hotweights.core.canary import CanaryPolicy
from hotweights.core.swap_policy import SwapPolicy
from hotweights.generation import ToolCallFormat
from hotweights.sources.manifest import VERIFY_MODES, VerifyMode
from hotweights.sources.watcher import WATCHER_KINDS, WatcherKind

LoadInSetting = Literal["auto", LoadIn]
ToolParserSetting = Literal["auto", ToolCallFormat]
TOOL_PARSER_SETTINGS: tuple[ToolParserSetting, ...] = ("auto", *get_args(ToolCallFormat))
LOAD_IN_SETTINGS: tuple[LoadInSetting, ...] = ("auto", *LOAD_IN)

ENV_PREFIX = "HOTWEIGHTS_"
AUTO_THREAD_FROM = 384 * 2**20
"""Where the two ways of loading cost the requests beside them about the same (380 MB:
127 ms on the thread, 115 ms in the helper; 97 MB: 123 against 87; 1.3 GB: 98 against 169)."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Config:
    """Everything `hotweights serve` needs to know."""

    source: str | None = None
    """Model directory to serve; None serves the built-in demo model."""
    repo: str | None = None
    """A model repository (ROOT/<model>/<version>/) to serve every model of, and watch."""
    watch: WatcherKind = "auto"
    """How the repository is watched: file events (watchfiles), polling, or auto."""
    poll_interval: float = 1.0
    """Seconds between scans when polling."""
    verify: VerifyMode = "digest"
    """How a version's files are checked against its manifest before it may load."""
    settle_seconds: float = 10.0
    """A version without a manifest is eligible once its files are unchanged this long."""
    model_name: str | None = None
    """Name clients put in the `model` field; defaults to the directory's parent name."""
    host: str = "127.0.0.1"
    """Interface to listen on. Anything but loopback requires an admin token."""
    port: int = 8000
    """TCP port to listen on."""
    policy: SwapPolicy = "availability"
    """Swap policy: `availability` (load beside, then swap) or `resource` (unload first)."""
    drain_timeout: float = 30.0
    """Seconds a retired version waits for its requests before it is unloaded anyway."""
    admission_timeout: float = 30.0
    """Seconds a request waits for a live version during a `resource` swap."""
    gate: str | None = None
    """A gate file (JSON) every new version must pass before it goes live: golden prompts,
    perplexity and speed against the live version. A version's own `gate.json` adds to it."""
    canary: str | None = None
    """Bake each new version on this share of new requests first (`10%` or `0.1`), beside
    the live one, before it takes them all (`availability` only); None: no canary."""
    bake: str = "60s"
    """How long a canary bakes before it is promoted (`60s`, `2m`, or seconds)."""
    canary_max_error_rate: float = 0.05
    """Roll a canary back when its error rate exceeds the stable version's by more than this."""
    canary_max_latency_ratio: float = 2.0
    """Roll a canary back when its p99 or time per token exceeds the stable one's by this ratio."""
    canary_min_requests: int = 20
    """Requests each version must finish during a bake before the canary is judged."""
    phase_timeout: float = 600.0
    """Seconds a load, validation or warmup may take before the reload fails (0: no limit)."""
    memory_check: bool = True
    """Refuse a version whose size estimate does not fit in available memory."""
    admin_token: str | None = None
    """Bearer token for /admin endpoints; required when listening beyond loopback."""
    dtype: Dtype = "auto"
    """Weight dtype: `auto` keeps the checkpoint's."""
    device: Device = "cpu"
    """Where the weights live: `cpu`, `cuda` or `cuda:N` (a load fails where it is not
    available). On a GPU the memory check and the engine's automatic cache size read the
    GPU's free memory."""
    allow_pickle: bool = False
    """Accept pickle-based weights (.bin, .pt). Unsafe with untrusted files."""
    trust_remote_code: bool = False
    """Run Python code shipped in model directories. Unsafe with untrusted files."""
    load_in: LoadInSetting = "auto"
    """Read checkpoints on the reloader's thread (the file mapped, then the weights read
    into private memory) or in a helper process (weights handed over in shared memory, so
    `from_pretrained`'s Python does not hold this process's GIL). `auto`: under
    `availability` the helper for checkpoints under `AUTO_THREAD_FROM` bytes of weights and
    the thread from there on (the helper's copy grows with the model; measured in
    `bench/load_interference.py`); under `resource` the thread (no request runs meanwhile)."""
    model_roots: tuple[str, ...] = ()
    """Directories reload paths must lie in; defaults to the served directory's parent."""
    api_key: str | None = None
    """Bearer token for the /v1 inference endpoints; None leaves them open."""
    audit_file: str | None = None
    """JSON-lines file every reload event is appended to (fsynced), read back across restarts."""
    max_pending: int = 64
    """Requests one model admits at once (generating or queued); beyond, 429 + Retry-After."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted (413 beyond)."""
    max_prompt_tokens: int = 4096
    """Longest prompt accepted, in tokens (413 beyond)."""
    max_tokens_limit: int = 1024
    """Upper bound on `max_tokens`; larger requests are clamped to it."""
    default_max_tokens: int = 256
    """`max_tokens` for chat requests that do not set it."""
    tool_parser: ToolParserSetting = "auto"
    """How generated tool calls are written and parsed; auto: detected from each version's
    chat template."""
    generation_workers: int = 4
    """Threads that render and encode prompts off the event loop (each model's engine has
    its own workers)."""
    max_batch_size: int = 32
    """Sequences one version's engine steps together; more requests wait for a row."""
    kv_cache_memory: str = "auto"
    """Each engine's key/value cache, e.g. `512MiB` or `2GB`; `auto`: what a full batch of
    the longest sequences needs, at most a quarter of available memory."""
    batching: bool = True
    """Generate through one batched engine per version; false: one decode loop per request."""
    max_batch_tokens: int = 256
    """Tokens in one engine pass: a decode token per generating sequence, the rest chunks of
    prompts being read (at least `max_batch_size`)."""
    prefill_chunk: int = 128
    """Most tokens of one prompt an engine pass reads: a joining prompt delays the running
    streams by at most one chunk."""
    prefix_cache: bool = True
    """Keep prompt prefixes' keys and values (an eighth of the cache budget), so a prompt that
    starts like an earlier one on the same version skips recomputing them."""
    threads: int = 0
    """torch's intra-op threads for the forward passes; 0: torch's default (one per core)."""
    max_resident_adapters: int = 0
    """LoRA adapters whose weights stay in memory at once (0: every adapter loaded); the
    least recently used idle one is evicted, and read back when a request asks for it."""
    lora_base: str | None = None
    """The served model a LoRA adapter applies to when its `base_model_name_or_path` names
    none of them; None: the only base model served."""
    shutdown_delay: float = 2.0
    """On SIGTERM, seconds /ready answers 503 before the listener closes (for load balancers)."""
    keep_alive_timeout: float = 120.0
    """Seconds an idle client connection stays open. Longer than clients keep idle pooled
    connections (httpx and the openai client: 5 s), so the client closes them: a server
    that closes one as the client reuses it fails that request (uvicorn's default, 5 s,
    failed 12 of 480 requests sent after about 5 s idle: `bench/keep_alive.py`)."""
    log_level: str = "info"
    """Log level for hotweights and uvicorn."""

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Config:
        """Defaults, then `HOTWEIGHTS_<FIELD>` variables, then `overrides` (CLI flags; a
        None value means "not given")."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = env.get(ENV_PREFIX + spec.name.upper())
            if raw is not None:
                values[spec.name] = _parse(spec, raw)
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Raise `ValueError` naming the setting that is out of range."""
        if self.policy not in get_args(SwapPolicy):
            raise ValueError(f"policy must be one of {get_args(SwapPolicy)}, got {self.policy!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        parse_device(self.device)  # raises naming the accepted forms
        if self.load_in not in LOAD_IN_SETTINGS:
            raise ValueError(f"load_in must be one of {LOAD_IN_SETTINGS}, got {self.load_in!r}")
        if self.tool_parser not in TOOL_PARSER_SETTINGS:
            raise ValueError(
                f"tool_parser must be one of {TOOL_PARSER_SETTINGS}, got {self.tool_parser!r}"
            )
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        self.kv_cache_bytes()  # raises for a size it cannot read
        if self.max_batch_tokens < self.max_batch_size:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_batch_size "
                f"({self.max_batch_size}): every generating sequence takes a token of each pass"
            )
        if self.max_resident_adapters < 0:
            raise ValueError(
                f"max_resident_adapters must be 0 (no limit) or more, got "
                f"{self.max_resident_adapters}"
            )
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (torch's default) or more, got {self.threads}")
        self.canary_policy()  # raises for a share, duration or threshold out of range
        if self.watch not in WATCHER_KINDS:
            raise ValueError(f"watch must be one of {WATCHER_KINDS}, got {self.watch!r}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        for name in (
            "drain_timeout",
            "admission_timeout",
            "phase_timeout",
            "settle_seconds",
            "keep_alive_timeout",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {self.max_pending}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.host not in LOOPBACK_HOSTS and not self.admin_token:
            raise ValueError(
                f"listening on {self.host} exposes the admin endpoints beyond this machine: "
                "set an admin token (--admin-token or HOTWEIGHTS_ADMIN_TOKEN)"
            )

    def kv_cache_bytes(self) -> int | None:
        """`kv_cache_memory` in bytes; None for `auto`."""
        return parse_size(self.kv_cache_memory, "kv_cache_memory")

    def canary_policy(self) -> CanaryPolicy | None:
        """The canary settings as a policy; None without `canary`."""
        if self.canary is None:
            return None
        if self.policy != "availability":
            raise ValueError("a canary needs --policy availability (two versions resident)")
        text = self.canary.strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(
                f"canary must be a share like 10% or 0.1, got {self.canary!r}"
            ) from None
        if not 0 < share < 1:
            raise ValueError(f"canary must be a share between 0 and 1, got {self.canary!r}")
        return CanaryPolicy(
            share=share,
            bake_seconds=parse_duration(self.bake, "bake"),
            max_error_rate=self.canary_max_error_rate,
            max_latency_ratio=self.canary_max_latency_ratio,
            min_requests=self.canary_min_requests,
        )

    def loads_in(self) -> LoadIn:
        """Where checkpoints are read (`auto`: see `load_in`; `thread_from` says when a
        process loader reads on the thread anyway)."""
        if self.load_in != "auto":
            return self.load_in
        return "process" if self.policy == "availability" else "thread"

    def thread_from(self) -> int | None:
        """Weight bytes from which `auto` reads on the thread even under `availability`."""
        return AUTO_THREAD_FROM if self.load_in == "auto" else None

    def roots(self) -> tuple[Path, ...]:
        """The resolved directories reload paths must lie in."""
        if self.model_roots:
            return tuple(Path(root).resolve() for root in self.model_roots)
        if self.repo:
            return (Path(self.repo).resolve(),)
        if self.source:
            return (Path(self.source).resolve().parent,)
        return ()


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
}


def parse_size(text: str, name: str) -> int | None:
    """`512MiB`, `2GB`, `1048576` in bytes; None for `auto`. Raises `ValueError` naming
    `name` for anything else."""
    value = text.strip().lower()
    if value == "auto":
        return None
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number) :].strip()
    try:
        size = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(
            f"{name} must be a size like 512MiB or 2GB, or auto; got {text!r}"
        ) from None
    if size <= 0:
        raise ValueError(f"{name} must be positive, got {text!r}")
    return int(size)


_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, name: str) -> float:
    """`60s`, `2m`, `1h` or `90` in seconds; raises `ValueError` naming `name`."""
    value = text.strip().lower()
    number = value.rstrip("smh")
    try:
        seconds = float(number) * _SECONDS[value[len(number) :]]
    except (KeyError, ValueError):
        raise ValueError(f"{name} must be a duration like 60s or 2m, got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"{name} must be positive, got {text!r}")
    return seconds


def _parse(spec: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(spec.type)
    if kind == "bool":
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind.startswith("tuple"):
        return tuple(part for part in raw.split(os.pathsep) if part)
    return raw
