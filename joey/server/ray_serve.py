"""``joey serve --replicas N``: joey's server as N replicas on Ray Serve.

Ray does what lies between replicas: one HTTP proxy per node routes each request to a replica,
replaces replicas that die or fail their health check, and places replicas on a cluster's nodes
(autoscaling too, through Ray's own config). Each replica is the whole single-process server
(``joey.server.app.JoeyServer``): its own engine, drafters, continuous batch and decoding thread,
with the same routes, API key (401), errors and joey's own 429 as the last line of admission.

- Admission: Ray sends a replica at most ``max_batch + max_queue`` requests at once (what its batch
  and queue hold; Ray's default of 5 would cap the batch at 5), keeps at most ``max(1, max_queue)``
  more waiting in each proxy once every replica is full, and answers past that 429 with
  ``Retry-After``. The proxy answers that one itself, in plain text; ``proxy_middlewares`` rewrites it
  into joey's OpenAI-shaped error where the proxy loads it (the local Ray that joey starts does).
- Startup: a replica loads its model in its constructor, so Ray routes to it only once it is loaded;
  ``check_health`` fails (and Ray replaces the replica) if its decoding thread stopped.
- Metrics: each replica labels its series with its id (``replica``) and pushes them to a one-replica
  ``MetricsBoard`` deployment every ``METRICS_PUSH_S``; ``GET /metrics`` on any replica (the proxy
  picks one) answers the board's merged view of every live replica.
- Every response carries the replica's id in ``x-joey-replica``.

Two entry points: ``joey serve --replicas N`` (``serve_replicas``), and for clusters managed with Ray's
own tools ``serve run joey.server.ray_serve:app_builder model=... replicas=2`` or a ``serve deploy``
config (``app_builder``). Ray is imported inside functions only: it is optional (``joey[ray]``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from starlette.datastructures import MutableHeaders
from starlette.responses import Response

from joey.cli import serve_setup
from joey.errors import InvalidArgumentError, JoeyError, MissingDependencyError
from joey.server.app import JoeyServer, ServerSettings, error_response
from joey.server.metrics import CONTENT_TYPE
from joey.server.schemas import APIError

log = logging.getLogger("joey.server")
APP_NAME = "joey"
INSTALL = 'pip install "joey[ray]"'
METRICS_PUSH_S = 2.0  # how often a replica sends its metrics to the board: others' figures are this old at most
METRICS_STALE_S = 15.0  # a replica not heard from for this long (it died or left) drops out of /metrics
REPLICA_HEADER = "x-joey-replica"
PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # read by each Ray proxy as it starts


def require_ray() -> ModuleType:
    """``ray.serve``, or a one-line error naming the install command."""
    try:
        from ray import serve
    except ImportError:
        raise MissingDependencyError(f"--replicas runs joey on Ray Serve, which is not installed: {INSTALL}")
    return serve


@dataclass(frozen=True)
class RayOptions:
    """How many replicas, on which Ray, with what resources each."""

    replicas: int = 1
    address: str | None = None  # None: start a new local Ray; "auto" or HOST:PORT: join that cluster
    cpus_per_replica: float = 1.0  # Ray also sets each replica's OMP threads (PyTorch's) to this
    gpus_per_replica: float = 0.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidArgumentError(f"--replicas must be at least 1, got {self.replicas}")
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise InvalidArgumentError("--cpus-per-replica and --gpus-per-replica must be >= 0")
        if self.address is not None and not self.address.strip():
            raise InvalidArgumentError("--address must be 'auto' or HOST:PORT of a Ray cluster")


class _Families:
    """What ``generate_latest`` reads: anything with ``collect()``."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class MetricsBoard:
    """A one-replica deployment holding every replica's latest metrics; answers them merged. A proxy
    sends ``/metrics`` to one replica, and Prometheus cannot reach replicas one by one, so the
    replicas push here and any of them can answer for all."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, list[Metric]]] = {}

    def put(self, replica: str, families: list[Metric]) -> None:
        self._latest[replica] = (time.monotonic(), families)

    def merged(self, replica: str, families: list[Metric]) -> bytes:
        """Prometheus text of ``replica``'s fresh metrics and every other live replica's latest."""
        self.put(replica, families)
        now = time.monotonic()
        self._latest = {r: v for r, v in self._latest.items() if now - v[0] < METRICS_STALE_S}
        merged: dict[str, Metric] = {}
        for _, fams in self._latest.values():  # the `replica` label keeps the replicas' series apart
            for fam in fams:
                into = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                into.samples += fam.samples
        return generate_latest(_Families(list(merged.values())))


class JoeyReplica:
    """One replica: a ``JoeyServer`` loaded in the constructor, served as Ray's ASGI ingress."""

    def __init__(self, load: Callable[[], Any], settings: ServerSettings, board: Any) -> None:
        from ray import serve

        self.replica = serve.get_replica_context().replica_tag
        self.server = JoeyServer(load, replace(settings, replica=self.replica))
        self.server.load_now()  # before returning: Ray routes to a replica only once its constructor is done
        self.board = board
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())

    def __serve_build_asgi_app__(self) -> _ReplicaApp:  # Ray calls this after the constructor
        return _ReplicaApp(self)

    def check_health(self) -> None:
        """Ray calls this periodically; raising makes it replace the replica."""
        if not self.server.worker.alive:
            raise RuntimeError("joey's decoding thread has stopped")

    async def merged_metrics(self) -> bytes:
        return await self.board.merged.remote(self.replica, self.server.metrics.families())

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self.board.put.remote(self.replica, self.server.metrics.families())
            except Exception as exc:  # the board restarting must not stop the replica
                log.warning("joey: could not push metrics: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(METRICS_PUSH_S)


class _ReplicaApp:
    """joey's FastAPI app as a replica serves it: ``GET /metrics`` answers every replica's metrics,
    and each response names the replica. Pure ASGI, so streaming and disconnects pass untouched."""

    def __init__(self, replica: JoeyReplica) -> None:
        self.replica, self.app = replica, replica.server.app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # lifespan: the server's own (it stops the decoding thread)
            await self.app(scope, receive, send)
            return

        async def receive_or_gone() -> dict:
            try:
                return await receive()
            except Exception:  # Ray's receive raises once its proxy dropped the request: the client is gone
                return {"type": "http.disconnect"}

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REPLICA_HEADER, self.replica.replica)
            await send(message)

        if scope["path"] == "/metrics" and scope["method"] == "GET":
            response = Response(await self.replica.merged_metrics(), media_type=CONTENT_TYPE)
            await response(scope, receive_or_gone, named)
        else:
            await self.app(scope, receive_or_gone, named)


def proxy_middlewares() -> list[Any]:
    """Ray's HTTP proxy calls this as it starts where ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` is
    ``joey.server.ray_serve:proxy_middlewares`` (joey sets it for the local Ray it starts; on a cluster
    set it for ``ray start``): the proxy's own 429s then come in joey's error shape."""
    from starlette.middleware import Middleware

    return [Middleware(_BackpressureAsJSON)]


class _BackpressureAsJSON:
    """Turns the proxy's plain-text 429 (its queue is full) into joey's OpenAI-shaped 429 with
    ``Retry-After``; a replica's own 429 is JSON already and passes untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rewriting = False

        async def rewrite(message: dict) -> None:
            nonlocal rewriting
            if message["type"] == "http.response.start" and message["status"] == 429:
                headers = {bytes(k).lower(): bytes(v) for k, v in message.get("headers", [])}
                rewriting = not headers.get(b"content-type", b"").startswith(b"application/json")
            if not rewriting:
                await send(message)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                error = APIError(429, "every replica's batch and queue, and the proxy's queue, are full; retry later",
                                 kind="rate_limit_error", code="rate_limit_exceeded")
                await error_response(error)(scope, receive, send)

        await self.app(scope, receive, rewrite)


def application(load: Callable[[], Any], settings: ServerSettings, options: RayOptions) -> Any:
    """The Ray Serve application (``serve.run`` it): ``options.replicas`` replicas and the metrics board."""
    serve = require_ray()
    from ray.serve.config import BackpressureConfig

    board = serve.deployment(MetricsBoard, num_replicas=1, ray_actor_options={"num_cpus": 0},
                             logging_config={"enable_access_log": False})  # not a line per push
    replicas = serve.deployment(
        serve.ingress()(JoeyReplica),  # no app given: Ray asks each replica for its own (its server's)
        name="JoeyReplica",
        num_replicas=options.replicas,
        max_ongoing_requests=settings.max_batch + settings.max_queue,
        max_queued_requests=max(1, settings.max_queue),  # Ray accepts -1 (unbounded) or >= 1
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        max_constructor_retry_count=3,  # a model that fails to load fails again: say so soon, not after 20 tries
    )
    return replicas.bind(load, settings, board.bind())


def _connect(options: RayOptions, log_level: str) -> bool:
    """Start a new local Ray or join ``options.address``; True when joey started it (and stops it)."""
    import ray

    level = log_level.upper()
    if options.address is not None:
        try:
            ray.init(address=options.address, logging_level=level)
        except (ConnectionError, ValueError) as exc:  # no cluster there, or not an address
            raise JoeyError(f"--address {options.address}: {str(exc).strip().splitlines()[0]}") from None
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault(PROXY_CALLBACK, f"{__name__}:proxy_middlewares")  # Ray's processes inherit it
    # "local" always starts a new Ray: without it ray.init() joins a cluster left by `ray start` here
    ray.init(address="local", include_dashboard=False, logging_level=level)
    have = ray.cluster_resources()
    for what, each in (("CPU", options.cpus_per_replica), ("GPU", options.gpus_per_replica)):
        if options.replicas * each > have.get(what, 0):
            ray.shutdown()
            raise InvalidArgumentError(
                f"{options.replicas} replicas x {each:g} {what}s need {options.replicas * each:g} {what}s; this "
                f"machine has {have.get(what, 0):g} (lower --{what.lower()}s-per-replica or --replicas)")
    return True


@contextmanager
def running(load: Callable[[], Any], settings: ServerSettings, options: RayOptions, host: str = "127.0.0.1",
            port: int = 8000, log_level: str = "info") -> Iterator[None]:
    """Ray Serve with joey's replicas on ``host:port``, all of them loaded; removed on exit (and the
    local Ray stopped, when joey started it)."""
    serve = require_ray()
    import ray

    started = _connect(options, log_level)
    try:
        serve.start(http_options={"host": host, "port": port})  # an existing Serve keeps its own (Ray warns)
        try:
            serve.run(application(load, settings, options), name=APP_NAME, route_prefix="/",
                      logging_config={"log_level": log_level.upper()})  # returns once every replica is up
        except RuntimeError as exc:  # a replica could not start (e.g. its model did not load)
            raise JoeyError(f"the replicas did not start: {_why(serve, exc)}") from None
        yield
    finally:
        try:
            if started:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)  # the cluster, and whatever else it serves, stay
        finally:
            if started:
                ray.shutdown()


def _why(serve: ModuleType, exc: Exception) -> str:
    """One line: the exception a replica's constructor raised (Ray keeps it in the deployment's
    status), else Ray's own message."""
    try:
        texts = [d.message for d in serve.status().applications[APP_NAME].deployments.values() if d.message]
    except Exception:  # no status to read: Ray's message is all there is
        texts = []
    for text in [*texts, str(exc)]:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return re.sub(r"^joey\.errors\.\w+: ", "", lines[-1])
    return type(exc).__name__


def serve_replicas(load: Callable[[], Any], settings: ServerSettings, options: RayOptions, host: str = "127.0.0.1",
                   port: int = 8000, log_level: str = "info") -> int:
    """``joey serve --replicas N``: serve until SIGINT or SIGTERM, then clean up. Returns the exit status."""
    require_ray()
    stop = threading.Event()
    with running(load, settings, options, host, port, log_level):
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own SIGTERM handler
            signal.signal(sig, lambda *_: stop.set())
        print(f"joey: {options.replicas} replica(s) serving on http://{host}:{port} (Ray Serve; Ctrl-C stops)",
              flush=True)
        stop.wait()
    return 0


def app_builder(args: dict[str, Any]) -> Any:
    """For Ray's own tools: ``serve run joey.server.ray_serve:app_builder model=default replicas=2
    max-batch=8`` or ``import_path``/``args`` in a ``serve deploy`` config. Every ``joey serve`` option,
    named as on the command line without its dashes (``true`` for a flag); host and port are Ray's."""
    argv = ["serve"]
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if str(value).lower() == "true":
            argv.append(flag)
        elif str(value).lower() != "false":
            argv += [flag, str(value)]
    if {"--host", "--port", "--address"} & set(argv):
        raise InvalidArgumentError("host, port and address are Ray's here: serve run's --address, or the config "
                                   "file's http_options")
    load, settings, options = serve_setup(argv)
    return application(load, settings, options)
