"""The fleet's HTTP face: one Ray Serve ingress in front of the replicas.

Every `/v1/...` request is admitted here, stamped with the committed generation of the
model its body names (the fleet's one flip point, `Admissions`), and handed to a replica
Ray picks, which answers it on that generation. `GET /v1/models` asks a replica about each
model on its committed generation, so it answers with the fleet's generations, not with
what one replica has finished. The OpenAI shapes, the API key, the limits and the error
bodies are the replica's own server's, so a fleet answers exactly like `hotweights serve`.
`/admin/fleet`, `/admin/reload` and `/admin/rollback` go to the coordinator; `/metrics`
shows the ingress's counts and every replica's own metrics, labelled by replica.
"""

# No `from __future__ import annotations`: Serve rebuilds the routes of a class ingress
# and FastAPI must see `Request` itself, not the string "Request".

import json
import logging
import os
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any

import ray
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from ray import serve
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from hotweights.errors import (
    HotweightsError,
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    ReloadFailed,
    ReplicaFailed,
)
from hotweights.fleet.admin_body import parse_reload, parse_rollback
from hotweights.fleet.admissions import Admissions, requested_model
from hotweights.fleet.bridge import Forwarded, Head
from hotweights.fleet.names import COORDINATOR, NAMESPACE
from hotweights.fleet.settings import FleetSettings
from hotweights.server import error_responses
from hotweights.server.bearer import check_bearer
from hotweights.server.error_responses import classify, error_body
from hotweights.server.metrics import CONTENT_TYPE

log = logging.getLogger("hotweights.fleet")
app = FastAPI(title="hotweights fleet")
error_responses.install(app)
_DROPPED = {b"content-length", b"transfer-encoding", b"connection"}
LORA_ENDPOINTS = ("load_lora_adapter", "unload_lora_adapter")


class Relayed(StreamingResponse):
    """A replica's stream, relayed; when it ends for any reason (done, the client went
    away, the replica died) the Ray stream is cancelled and the request counted out."""

    def __init__(self, stream: Any, head: Head, done: Any) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}
        for key in ("content-length", "transfer-encoding"):
            headers.pop(key, None)
        super().__init__(_relay(stream), status_code=head.status, headers=headers)
        self._stream = stream
        self._done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.cancel()
            self._done()


async def _relay(stream: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    except Exception as exc:  # the replica died mid-stream: say so, as an SSE error event
        log.warning("a replica failed mid-stream: %s", _first_line(exc))
        failure = ReplicaFailed(f"the replica serving this stream failed: {_first_line(exc)}")
        body = error_body(str(failure), *classify(failure)[1:])
        yield f"data: {json.dumps(body)}\n\n".encode()


class _Stamps(Collector):
    def __init__(self, admissions: Admissions) -> None:
        self._admissions = admissions

    def collect(self) -> Iterable[Metric]:
        committed = GaugeMetricFamily(
            "hotweights_fleet_committed_generation",
            "Generation stamped on new requests, by model",
            labels=["model"],
        )
        for model, generation in self._admissions.generations.items():
            committed.add_metric([model], generation)
        inflight = GaugeMetricFamily(
            "hotweights_fleet_inflight_requests",
            "Requests in flight through the ingress, by stamped generation",
            labels=["generation"],
        )
        for generation, count in self._admissions.inflight().items():
            inflight.add_metric([str(generation)], count)
        return iter((committed, inflight))


class _ReplicaMetrics(Collector):
    """Every replica's own metrics, each sample labelled with its replica."""

    def __init__(self, texts: list[tuple[str, bytes]]) -> None:
        self._texts = texts

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Any] = {}
        for replica, text in self._texts:
            for family in text_string_to_metric_families(text.decode()):
                merged = families.setdefault(family.name, family)
                if merged is not family:
                    merged.samples.extend(_labelled(family.samples, replica))
                else:
                    family.samples = _labelled(family.samples, replica)
        return iter(families.values())


def _labelled(samples: list[Any], replica: str) -> list[Any]:
    return [s._replace(labels={**s.labels, "replica": replica}) for s in samples]


async def _read(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    return bytes(body)


def _forwarded(request: Request, body: bytes) -> Forwarded:
    return Forwarded(
        request.method,
        request.url.path,
        request.url.query.encode(),
        tuple(request.headers.raw),
        body,
    )


def _holds(described: dict[str, Any], generations: dict[str, int]) -> bool:
    """Whether a replica (as it `describe`s itself) holds each model's `generations`."""
    models = described.get("models", {})
    return all(
        any(v["generation"] == generation for v in models.get(model, {}).get("resident", []))
        for model, generation in generations.items()
    )


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


@serve.ingress(app)
class Ingress:
    """The ingress deployment's body (one replica: the flip must happen at one point)."""

    def __init__(self, settings: FleetSettings, replicas: Any) -> None:
        self.settings = settings
        self.replicas = replicas
        self.coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
        parents: dict[str, str] = ray.get(self.coordinator.bases.remote())
        self.admissions = Admissions(ray.get(self.coordinator.committed.remote()), parents)
        self.served = sorted(self.admissions.generations)
        self.bases = [model for model in self.served if model not in parents]
        self.registry = CollectorRegistry()
        self.answered = Counter(
            "hotweights_fleet_requests_total",
            "Requests the fleet answered, by the generation stamped on them and status",
            ["generation", "status"],
            registry=self.registry,
        )
        self.registry.register(_Stamps(self.admissions))

    # -- called by the coordinator ---------------------------------------------------------

    async def flip(
        self, model: str, generation: int, followers: dict[str, int] | None = None
    ) -> int:
        """Stamp `generation` on `model`'s requests from now on, and `followers`' on its
        adapters' (see `Admissions.flip`)."""
        return self.admissions.flip(model, generation, followers)

    async def add(self, model: str, parent: str, generation: int) -> None:
        """Admit requests for adapter `model`, on base `parent`, from now on (the fleet
        adopted it: every replica serves it)."""
        self.admissions.add(model, parent, generation)
        self.served = sorted(self.admissions.generations)

    async def drained(self, generation: int, timeout: float) -> int:
        return await self.admissions.drained(generation, timeout)

    async def status(self) -> dict[str, object]:
        generations = self.admissions.generations
        only = {"generation": generations[self.bases[0]]} if len(self.bases) == 1 else {}
        return only | {
            "pid": os.getpid(),
            "generations": dict(generations),
            "parents": dict(self.admissions.parents),
            "inflight": {str(g): n for g, n in self.admissions.inflight().items()},
            "admitted": {str(g): n for g, n in self.admissions.admitted.items()},
        }

    # -- HTTP --------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        """Each model as a replica describes it on the model's committed generation."""
        data: list[Any] = []
        for model in self.served:
            answer = await self._forward(model, _forwarded(request, b""))
            if answer.status_code != 200:  # the API key, say: as the replica answered
                return answer
            listed = json.loads(bytes(answer.body))["data"]
            data += [entry for entry in listed if entry.get("id") == model]
        return JSONResponse({"object": "list", "data": data})

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def v1(self, request: Request, path: str) -> Response:
        if path in LORA_ENDPOINTS:  # one replica would load it: the others would not
            raise InvalidRequest(
                f"/v1/{path} loads or unloads on one server; a fleet serves the adapters of "
                "its repository: publish ROOT/<adapter>/<N>/ and the fleet cuts it over on "
                "every replica (hotweights publish), or roll back with /admin/rollback"
            )
        body = await _read(request, self.settings.config.max_body_bytes)
        model = requested_model(body, self.served, self.bases)
        return await self._forward(model, _forwarded(request, body))

    async def _forward(self, model: str, forwarded: Forwarded) -> Response:
        """Answer `forwarded` on a replica, pinned to the generation stamped on it (for an
        adapter, the adapter's: its version is bound to the base generation stamped)."""
        stamped = self.admissions.admit(model)
        generation, stamp = stamped.generation, str(stamped.generation)
        stream = None
        relayed = False
        try:  # whatever happens, even a cancellation, the request is counted out once
            forward = self.replicas.options(stream=True).forward
            stream = forward.remote(model, generation, forwarded)
            try:
                head: Head = await stream.__anext__()
            except Exception as exc:
                self.answered.labels(stamp, "503").inc()
                raise ReplicaFailed(f"no replica answered: {_first_line(exc)}") from exc
            self.answered.labels(stamp, str(head.status)).inc()
            if head.streamed:
                relayed = True
                return Relayed(stream, head, lambda: self.admissions.done(stamped))
            headers = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in head.headers
                if k.lower() not in _DROPPED
            }
            return Response(head.body, status_code=head.status, headers=headers)
        finally:
            if not relayed:
                if stream is not None:
                    stream.cancel()  # the client left before the answer: stop the replica
                self.admissions.done(stamped)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Ready when a replica holds every model's committed generation (Serve's proxy
        routes to the ingress before the replicas have started)."""
        generations = dict(self.admissions.generations)
        try:
            described = await self.replicas.broadcast("describe").results_async(
                timeout_s=10, return_exceptions=True
            )
        except Exception:  # no replica running at all (starting, or all restarting)
            described = []
        serving = sum(1 for d in described if isinstance(d, dict) and _holds(d, generations))
        only = {"generation": generations[self.bases[0]]} if len(self.bases) == 1 else {}
        body = {"status": "ready" if serving else "starting"} | only | {"generations": generations}
        return JSONResponse(
            body | {"replicas_serving": serving}, status_code=200 if serving else 503
        )

    @app.get("/admin/status")  # what `hotweights status` reads from a single server
    @app.get("/admin/fleet")
    async def fleet(
        self, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, object]:
        self._admin(authorization)
        status: dict[str, object] = await self._ask(self.coordinator.status.remote())
        return status

    @app.post("/admin/reload")
    async def reload(
        self, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        """Cut over to the repository's latest eligible version, or with `{"version": N}`
        pin version N (the watcher then keeps it until the next reload without one);
        `model` names the model (required when the fleet serves several)."""
        self._admin(authorization)
        ask = parse_reload(await _read(request, 4096))
        pending = self.coordinator.reload.remote(ask.version, ask.description, ask.model)
        return await self._cutover(pending, ask.model)

    @app.post("/admin/rollback")
    async def rollback(
        self, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        """Cut over to the newest eligible version older than the committed one (pinned)."""
        self._admin(authorization)
        ask = parse_rollback(await _read(request, 4096))
        pending = self.coordinator.rollback.remote(ask.description, ask.model)
        return await self._cutover(pending, ask.model)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        texts = await self.replicas.broadcast("metrics").results_async(
            timeout_s=10, return_exceptions=True
        )
        replicas = CollectorRegistry()
        replicas.register(_ReplicaMetrics([t for t in texts if isinstance(t, tuple)]))
        body = generate_latest(self.registry) + generate_latest(replicas)
        return Response(body, media_type=CONTENT_TYPE)

    def _admin(self, authorization: str | None) -> None:
        check_bearer(self.settings.config.admin_token, authorization, "admin token")

    async def _ask(self, pending: Any) -> Any:
        """The coordinator's answer; its own errors as they are, and 503 when it cannot
        be reached (Ray restarts it, and sends it again a call its death interrupted, a
        few times)."""
        try:
            return await pending
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError) as exc:
            raise NotReady(f"the coordinator is unavailable: {_first_line(exc)}") from None
        except Exception as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, HotweightsError):
                raise cause from None
            raise

    async def _cutover(self, pending: Any, model: str | None) -> JSONResponse:
        record: dict[str, Any] | None = await self._ask(pending)
        if record is None:
            model = model if model is not None else self.bases[0]  # the coordinator checked
            generation = self.admissions.generations.get(model)
            return JSONResponse({"outcome": "unchanged", "model": model, "generation": generation})
        if record["outcome"] != "committed":
            raise ReloadFailed(f"cutover {record['outcome']}: {record['error']}", record)
        return JSONResponse(record)
