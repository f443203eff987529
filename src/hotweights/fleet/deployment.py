"""The fleet on Ray: the replica deployment, the coordinator actor with its Ray link, and
`start`/`stop` for the CLI, the tests and the benchmark.

Ray does the distribution, placement and restarts: the replicas are a Serve deployment
(Serve restarts one that dies, and a new one loads the committed version in its
constructor, before Serve routes to it), the coordinator a detached named actor that
Ray restarts when it dies (it carries on from the fleet's record, `ledger.py`), and
the two phases are `DeploymentHandle.broadcast` calls. `user_config` is never used for a
version: Serve rolls it out in batches, which is the skew the two phases exist to avoid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from hotweights.fleet.bridge import Forwarded, Head
from hotweights.fleet.coordinator import Coordinator
from hotweights.fleet.ingress import Ingress
from hotweights.fleet.model_replica import Joined, Prepared, Target
from hotweights.fleet.names import APP, COORDINATOR, INGRESS, NAMESPACE, REPLICA
from hotweights.fleet.ray_link import CONTROL_TIMEOUT_S, RayLink
from hotweights.fleet.replica import FleetReplica
from hotweights.fleet.settings import FleetSettings

log = logging.getLogger("hotweights.fleet")
CATCH_UP_ROUNDS = 5
"""A starting replica asks the coordinator again after loading, at most this many times,
until what it holds is what the fleet has (see `FleetReplica.catch_up`)."""
SLOT_POLL_S = 0.05
"""How often a replica waiting for a place to prepare asks again (`prepare_parallel`)."""
HEALTH_CHECK_S = 2.0
COORDINATOR_RETRIES = 3
"""Calls to the coordinator that its death interrupted are sent again to its successor
this many times (Ray's `max_task_retries`)."""


class Replica:
    """The replica deployment's body: joins the fleet (loads each model's committed
    version, and the one being prepared) in its constructor, so Serve routes nothing to
    it before."""

    def __init__(self, settings: FleetSettings) -> None:
        coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
        joined = ray.get(coordinator.join.remote())
        context = serve.get_replica_context()
        self.settings = settings
        self.coordinator = coordinator
        self._catching_up = asyncio.Lock()
        self._reconciling: asyncio.Task[None] | None = None
        self.engine = FleetReplica(
            settings.config,
            sorted(joined),
            replica_id=context.replica_id.unique_id,
            hold_seconds=settings.hold_seconds,
            loader=settings.loader(settings.config) if settings.loader is not None else None,
        )
        # With --prepare-parallel a version being prepared is held only through a place
        # (the cutover's next prepare round asks this replica), never on the side.
        self.free_prepare = settings.prepare_parallel == 0
        timeout, free = settings.prepare_timeout, self.free_prepare
        self.engine.start(joined, timeout, prepare=free)
        for _ in range(CATCH_UP_ROUNDS):  # the fleet may have moved while this one loaded
            if self.engine.catch_up(ray.get(coordinator.join.remote()), timeout, prepare=free):
                break

    async def prepare(self, target: Target) -> Prepared:
        """Hold `target` (with `prepare_parallel`, once the coordinator gives this replica
        a place: it waits for one within the prepare timeout, or until the fleet aborts
        the generation)."""
        timeout = self.settings.prepare_timeout
        model, generation, me = self.engine.model(target.model), target.generation, self.engine.id
        if target.followers and not model.has(generation):  # its adapters must be the fleet's
            names = [name for name, _ in target.followers]
            if self.engine.lagging(await self.coordinator.join.remote(), names):
                await self._catch_up()  # a finish it missed
                late = self.engine.lagging(await self.coordinator.join.remote(), names)
                if late:
                    error = f"replica {me}: adapters {', '.join(late)} are behind the fleet"
                    return Prepared(me, generation, False, error)
        limited = self.settings.prepare_parallel > 0 and not model.has(generation)
        if limited:
            started = time.monotonic()
            while not await self.coordinator.prepare_slot.remote(generation, me):
                waited = time.monotonic() - started
                if waited > timeout or model.aborted(generation):
                    error = f"replica {me}: no place to prepare g{generation} in {waited:.1f} s"
                    return Prepared(me, generation, False, error, waited)
                await asyncio.sleep(SLOT_POLL_S)
            timeout -= time.monotonic() - started
        try:
            return await asyncio.to_thread(model.hold, target, timeout)
        finally:
            if limited:
                self.coordinator.prepared.remote(generation, me)

    async def finish(self, name: str, generation: int, timeout: float) -> bool:
        """Make `generation` of model `name` live here; a replica that never held it (it
        became routable just as the cutover prepared) catches up with the fleet first."""
        model = self.engine.model(name)
        if not model.has(generation):
            await self._catch_up()
        return await asyncio.to_thread(model.finish, generation, timeout)

    async def abort(self, name: str, generation: int, reason: str) -> None:
        await asyncio.to_thread(self.engine.model(name).abort, generation, reason)

    async def add(self, name: str, target: Target) -> None:
        """Serve adapter `name` (adopted by the fleet) from now on, `target` live."""
        timeout = self.settings.prepare_timeout
        await asyncio.to_thread(self.engine.add, name, Joined(target), timeout)

    async def remove(self, name: str) -> None:
        timeout = self.settings.config.drain_timeout
        await asyncio.to_thread(self.engine.remove, name, timeout)

    async def forward(
        self, name: str, generation: int, request: Forwarded
    ) -> AsyncIterator[Head | bytes]:
        """Answer `request`, for model `name`, on `generation` (see `bridge.answer`)."""
        if name not in self.engine.models:
            await self._catch_up()  # an adapter the fleet adopted while this one started
        model = self.engine.model(name)
        live = model.reloader.live_version
        if not model.has(generation) and live is not None and generation > live.generation:
            await self._catch_up()  # the fleet committed a version this replica missed
        async for item in self.engine.forward(generation, request):
            yield item

    async def _catch_up(self) -> None:
        """Ask the coordinator where the fleet is and get there (one at a time; every
        request waiting for it waits for the same catch-up)."""
        async with self._catching_up:
            joined = await self.coordinator.join.remote()
            timeout = self.settings.prepare_timeout
            await asyncio.to_thread(
                self.engine.catch_up, joined, timeout, prepare=self.free_prepare
            )

    async def check_health(self) -> None:
        """Serve's health check (every `HEALTH_CHECK_S`), used to notice a held version
        that nobody decided: a finish or an abort that missed this replica (it became
        routable just after the broadcast, or the coordinator died before sending it).
        The catch-up runs in the background; the check itself never fails for it."""
        busy = self._reconciling is not None and not self._reconciling.done()
        if busy or not self.engine.undecided() or self._catching_up.locked():
            return
        self._reconciling = asyncio.create_task(self._reconcile())

    async def _reconcile(self) -> None:
        try:
            await self._catch_up()
        except Exception as exc:
            log.warning("replica %s: catching up with the fleet failed: %s", self.engine.id, exc)

    async def describe(self) -> dict[str, object]:
        return self.engine.describe()

    async def metrics(self) -> tuple[str, bytes]:
        return self.engine.id, self.engine.metrics()


class CoordinatorActor(Coordinator):
    """The coordinator as a Ray actor, reaching the fleet through Serve handles. Ray
    builds it again with the same arguments when it dies; then it resumes what its
    predecessor left and watches the repository again, in the background (the actor
    answers `join` and `status` meanwhile)."""

    def __init__(self, settings: FleetSettings, fleet_id: str) -> None:
        super().__init__(settings, RayLink(), fleet_id=fleet_id)
        if self.restarts:
            threading.Thread(target=self._carry_on, name="hotweights-resume", daemon=True).start()

    def _carry_on(self) -> None:
        try:
            self.resume()
        except Exception:
            log.exception("the restarted coordinator could not resume its cutover")
        self.watch()


@dataclass
class Fleet:
    """A started fleet, from the driver's side."""

    settings: FleetSettings
    coordinator: Any
    connected: bool
    """This driver connected to Ray (`ray.init`) to start the fleet."""
    started_cluster: bool
    """This driver started the local Ray cluster (no `ray_address`)."""

    @property
    def url(self) -> str:
        config = self.settings.config
        return f"http://{config.host}:{config.port}"

    def status(self) -> dict[str, object]:
        status: dict[str, object] = ray.get(self.coordinator.status.remote())
        return status

    def stop(self) -> None:
        """Delete the application and the coordinator, nothing else: on a cluster it
        joined, Serve and its other applications go on. Shuts down Serve and Ray only
        if `start` began them, and disconnects if `start` connected."""
        with contextlib.suppress(Exception):
            ray.get(self.coordinator.close.remote(), timeout=CONTROL_TIMEOUT_S)
        with contextlib.suppress(Exception):
            serve.delete(APP)
        with contextlib.suppress(Exception):
            ray.kill(self.coordinator)
        if self.started_cluster:
            with contextlib.suppress(Exception):
                serve.shutdown()
        if self.connected:
            ray.shutdown()


class FleetRunning(RuntimeError):
    """A fleet already runs on the cluster (and `replace` was not asked for)."""


def start(settings: FleetSettings, *, log_to_driver: bool = True) -> Fleet:
    """Start (or join, with `settings.ray_address`) a Ray cluster, the coordinator, and
    the application: one ingress on `config.host:config.port` in front of
    `settings.replicas` replicas. Returns once every replica serves the committed
    version. Raises `ValueError` for a repository with nothing to serve or a Serve that
    listens elsewhere, `FleetRunning` if a fleet runs on the cluster already (unless
    `settings.replace`), and what Serve raised if the replicas could not start. Touches
    no other Serve application."""
    connected = not ray.is_initialized()
    if connected:
        options: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": log_to_driver}
        if settings.ray_address is None:
            # Ray's own gRPC ports listen beyond loopback whatever is asked (Ray 2.60 maps
            # 127.0.0.1 to the node's address), behind Ray's token authentication (on by
            # default); the HTTP endpoint listens on `config.host` only.
            options |= {"include_dashboard": False}
        ray.init(address=settings.ray_address, **options)
    try:
        _serve_on(settings)
    except BaseException:
        if connected:
            ray.shutdown()
        raise
    started_cluster = connected and settings.ray_address is None
    coordinator = (
        ray.remote(CoordinatorActor)
        .options(
            name=COORDINATOR,
            namespace=NAMESPACE,
            lifetime="detached",
            max_concurrency=16,
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=COORDINATOR_RETRIES,
        )
        .remote(settings, uuid.uuid4().hex)
    )
    try:
        ray.get(coordinator.committed.remote())
    except ray.exceptions.RayActorError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else None
        raise ValueError(str(cause or exc).strip().splitlines()[-1]) from None
    fleet = Fleet(settings, coordinator, connected, started_cluster)
    actor = {"num_cpus": settings.replica_cpus}
    quiet = {"enable_access_log": False}
    replicas = serve.deployment(
        Replica,
        name=REPLICA,
        num_replicas=settings.replicas,
        ray_actor_options=actor,
        max_ongoing_requests=settings.config.max_pending + 8,
        health_check_period_s=HEALTH_CHECK_S,
        graceful_shutdown_timeout_s=settings.config.drain_timeout,
        logging_config=quiet,
    ).bind(settings)
    ingress = serve.deployment(
        Ingress,
        name=INGRESS,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
        logging_config=quiet,
    ).bind(settings, replicas)
    try:  # even a SystemExit (ray.init's SIGTERM handler): leave nothing on the cluster
        serve.run(ingress, name=APP, route_prefix="/", blocking=False)
        ray.get(coordinator.watch.remote())
    except BaseException:
        fleet.stop()
        raise
    return fleet


def _serve_on(settings: FleetSettings) -> None:
    """Start Serve's HTTP proxy on `config.host:config.port`, or find it there; then make
    sure no fleet runs on the cluster, or replace it if `settings.replace`. Raises
    `ValueError` when Serve already listens elsewhere (it keeps its own settings), and
    `FleetRunning`."""
    config = settings.config
    serve.start(http_options={"host": config.host, "port": config.port})
    from ray.serve.context import _get_global_client  # no public getter for Serve's HTTP

    http = _get_global_client().http_config
    if (http.host, http.port) != (config.host, config.port):
        raise ValueError(
            f"Serve already runs on this cluster with its HTTP endpoint on {http.host}:"
            f"{http.port}: give the fleet --host {http.host} --port {http.port}"
        )
    try:
        running: Any = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
    except ValueError:
        running = None
    deployed = APP in serve.status().applications
    if (running is not None or deployed) and not settings.replace:
        raise FleetRunning(
            f"a fleet already runs on this cluster (Serve application {APP!r}, actor "
            f"{COORDINATOR!r}): stop it first, or start with --replace"
        )
    if running is not None:
        ray.kill(running)
