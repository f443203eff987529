"""Prometheus metrics: requests and tokens by generation, reloads by outcome and phase.

Counters are updated on the request path (one labelled increment each) and by a reloader
observer; live generation and in-flight leases are read from the reloaders at scrape time,
so they cost nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hotweights.backends.grammar import SHARED_GRAMMARS, GrammarCache
from hotweights.core import Notice, Reloader, ReloadFinished
from hotweights.engine.batching import StepObserver
from hotweights.engine.step_plan import StepKind, StepStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _LiveState(Collector):
    """Scrape-time gauges read from the reloaders."""

    def __init__(self, reloaders: Callable[[], Mapping[str, Reloader[Any]]]) -> None:
        self._reloaders = reloaders

    def collect(self) -> Iterable[GaugeMetricFamily]:
        live = GaugeMetricFamily(
            "hotweights_live_generation", "Generation serving new requests", labels=["model"]
        )
        inflight = GaugeMetricFamily(
            "hotweights_inflight_requests",
            "Requests holding a lease, by generation",
            labels=["model", "generation"],
        )
        for name, reloader in self._reloaders().items():
            version = reloader.live_version
            live.add_metric([name], version.generation if version else 0)
            for generation, count in reloader.inflight().items():
                inflight.add_metric([name, str(generation)], count)
        yield live
        yield inflight


class _GrammarState(Collector):
    """Scrape-time counters of the grammar cache: compiles and their seconds, cache hits,
    and the logits rows masked with the seconds they took (the mask's cost per step)."""

    def __init__(self, cache: GrammarCache) -> None:
        self._cache = cache

    def collect(self) -> Iterable[CounterMetricFamily]:
        stats = self._cache.stats()
        for name, help_text, value in (
            ("grammar_compiles", "Output grammars compiled (cache misses)", stats.compiles),
            ("grammar_compile_seconds", "Seconds spent compiling grammars", stats.compile_seconds),
            ("grammar_cache_hits", "Constrained requests that found their grammar", stats.hits),
            ("grammar_masked_rows", "Logits rows masked by a grammar", stats.masks),
            (
                "grammar_mask_seconds",
                "Seconds spent computing and applying masks",
                stats.mask_seconds,
            ),
        ):
            yield CounterMetricFamily(f"hotweights_{name}", help_text, value=value)


class Metrics:
    """One registry per server, so tests and several apps in one process do not collide."""

    def __init__(self, reloaders: Callable[[], Mapping[str, Reloader[Any]]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hotweights_requests",
            "Inference requests by model, endpoint, generation and HTTP status",
            ["model", "endpoint", "generation", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hotweights_request_duration_seconds",
            "Inference request duration, admission to last byte",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "hotweights_generated_tokens",
            "Completion tokens generated, by generation",
            ["model", "generation"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "hotweights_reloads",
            "Reload attempts by outcome",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.phases = Histogram(
            "hotweights_reload_phase_seconds",
            "Seconds spent in each reload phase",
            ["model", "phase"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "hotweights_time_to_first_token_seconds",
            "Admission to the first generated text",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "hotweights_engine_batch_size",
            "Sequences in each engine pass",
            ["model", "kind"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "hotweights_engine_pass_seconds",
            "Seconds each engine pass (one forward over the batch) took",
            ["model", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.waiting = Gauge(
            "hotweights_engine_waiting",
            "Sequences waiting for a row of the engine, after its last pass",
            ["model"],
            registry=self.registry,
        )
        self.canary_retries = Counter(
            "hotweights_canary_retries",
            "Requests that failed on a canary before their first byte and were answered by "
            "the stable version",
            ["model", "generation"],
            registry=self.registry,
        )
        self.gate_checks = Counter(
            "hotweights_gate_checks",
            "Quality-gate checks run on new versions, by result (passed, failed, skipped)",
            ["model", "result"],
            registry=self.registry,
        )
        self.gate_figure = Gauge(
            "hotweights_gate_last_figure",
            "The figure of each numeric gate check (perplexity, ratios) at the last reload",
            ["model", "check"],
            registry=self.registry,
        )
        self.registry.register(_LiveState(reloaders))
        self.registry.register(_GrammarState(SHARED_GRAMMARS))

    def observe(self, notice: Notice) -> None:
        """Reloader observer: count outcomes and phase times."""
        if not isinstance(notice, ReloadFinished):
            return
        event = notice.event
        if notice.drained:
            if "drain" in event.phases:
                self.phases.labels(notice.model, "drain").observe(event.phases["drain"])
            return
        self.reloads.labels(notice.model, event.outcome.value).inc()
        for phase, seconds in event.phases.items():
            self.phases.labels(notice.model, phase).observe(seconds)
        for check in event.gate:
            result = {True: "passed", False: "failed", None: "skipped"}[check.passed]
            self.gate_checks.labels(notice.model, result).inc()
            if isinstance(check.value, int | float):
                self.gate_figure.labels(notice.model, check.name).set(check.value)

    def request(
        self, model: str, endpoint: str, generation: int, status: int, seconds: float
    ) -> None:
        self.requests.labels(model, endpoint, str(generation), str(status)).inc()
        self.latency.labels(model, endpoint).observe(seconds)

    def retried(self, model: str, generation: int) -> None:
        self.canary_retries.labels(model, str(generation)).inc()

    def engine_step(self, model: str) -> StepObserver:
        """An observer of `model`'s engine passes (called on the engine threads)."""
        kinds = get_args(StepKind)
        batch = {kind: self.batch.labels(model, kind) for kind in kinds}
        seconds = {kind: self.step_seconds.labels(model, kind) for kind in kinds}
        waiting = self.waiting.labels(model)

        def observe(stats: StepStats) -> None:
            batch[stats.kind].observe(stats.batch)
            seconds[stats.kind].observe(stats.seconds)
            waiting.set(stats.waiting)

        return observe

    def generated(self, model: str, generation: int, tokens: int) -> None:
        if tokens:
            self.tokens.labels(model, str(generation)).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
