"""An API replica's view of the hosts (:class:`Cluster`), and :func:`start_host`.

Each host is a detached Ray actor ``emberbox-host-<name>`` in the namespace ``emberbox``,
pinned to its machine by the custom resource ``emberbox_host_<name>`` (``ray start
--resources '{"emberbox_host_<name>": 1}'``). Every Ray call here is bounded by a
timeout: a dead node makes a host ``alive=False`` (or :class:`HostDown`), it never hangs
an API request. Ray's blocking calls run in worker threads; actor calls are awaited as
futures.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from emberbox.config import Settings
from emberbox.errors import HostDown, HostError, InvalidRequest, NotFound

NAMESPACE = "emberbox"
ACTOR_PREFIX = "emberbox-host-"
RESOURCE_PREFIX = "emberbox_host_"
STATUS_TIMEOUT_S = 2.0  # a host that does not answer in this is reported not alive
CALL_TIMEOUT_S = 5.0  # endpoint, drain
CONNECT_TIMEOUT_S = 30.0
GCS_PROBE_S = 5.0  # a TCP connect to the GCS before ray.init
# An endpoint is asked again after this; a status call that finds the host down or at
# another URL drops it at once (a restarted host has a new key).
ENDPOINT_TTL_S = 5.0
START_TIMEOUT_S = 180.0  # the host's server answers /healthz (a first start is slow)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class HostStatus:
    name: str
    alive: bool
    draining: bool
    url: str | None
    sandboxes: int
    max_sandboxes: int
    free_memory_mib: int
    images: tuple[str, ...]
    node_id: str | None = None  # the Ray node the host's actor runs (ran) on
    # The actor answered (alive=False with reachable=True: its server did not, in time).
    # The monitor counts only an unreachable host down.
    reachable: bool | None = None  # None: as alive


@dataclass(frozen=True)
class HostEndpoint:
    name: str
    url: str  # the host server's base URL
    key: str  # its admin key (never logged, never shown to tenants)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidRequest(
            f"host name {name!r}: use 1-63 letters, digits, '-' or '_' (a letter or digit first)"
        )
    return name


def actor_name(name: str) -> str:
    return ACTOR_PREFIX + check_name(name)


def resource_name(name: str) -> str:
    """The custom resource that pins host ``name``'s actor to its machine."""
    return RESOURCE_PREFIX + check_name(name)


def actor_options(name: str) -> dict[str, Any]:
    """The options of host ``name``'s actor (pure)."""
    return {
        "name": actor_name(name),
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_concurrency": 4,  # ping and endpoint answer while a status call waits
        "num_cpus": 0,  # the actor only waits; the VMs' CPUs are the host's own
        "resources": {resource_name(name): 1},
        "get_if_exists": True,
    }


def start_host(
    name: str,
    data_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    port: int = 0,
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Create host ``name``'s detached actor (if it does not exist yet) and wait until
    its server answers. Needs a connected Ray driver (``ray.init``). ``env`` goes to the
    host's ``emberbox serve`` (EMBERBOX_* settings); ``port`` 0 picks a free one."""
    import ray

    from emberbox.cluster.agent import HostAgent

    resource = resource_name(name)
    if not any(resource in node.get("Resources", {}) for node in _ray_nodes() if node["Alive"]):
        raise HostError(
            f"no node of the Ray cluster has the resource {resource}: on the host's machine, "
            f"ray start ... --resources '{{\"{resource}\": 1}}'"
        )
    remote = ray.remote(HostAgent).options(**actor_options(name))
    actor: Any = remote.remote(name, str(data_dir), dict(env or {}), port)
    try:
        ray.get(actor.ping.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise HostError(
            f"host {name} did not start in {timeout_s:.0f} s: is the node with "
            f"{resource_name(name)} busy? (its server's log: {data_dir}/host-server.log)"
        ) from exc
    except ray.exceptions.RayActorError as exc:
        raise HostError(f"host {name} could not start: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The HostError message an actor's constructor raised, else Ray's own text."""
    text = str(exc)
    marker = "HostError: "
    return text[text.rindex(marker) + len(marker) :].strip() if marker in text else text


def connect_driver(address: str) -> None:
    """Connect this process to the Ray cluster at ``address`` ("auto": the local one)."""
    try:
        _init_ray(address)
    except ConnectionError as exc:
        raise HostError(f"cannot reach the Ray cluster at {address}: {exc}") from exc


def host_url(name: str) -> str:
    """Host ``name``'s server URL (not its key), from its actor."""
    import ray

    actor = _get_actor(name)
    if actor is None:
        raise NotFound(f"no host named {name!r}", host=name)
    url, _key = ray.get(actor.endpoint.remote(), timeout=CALL_TIMEOUT_S)
    return str(url)


def stop_host(name: str) -> None:
    """End host ``name``'s actor for good (its server stops; Ray does not restart it)."""
    import ray

    try:
        actor = ray.get_actor(actor_name(name), namespace=NAMESPACE)
    except ValueError as exc:
        raise NotFound(f"no host named {name!r}") from exc
    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor, no_restart=True)


def dead_status(name: str, node_id: str | None) -> HostStatus:
    return HostStatus(name, False, False, None, 0, 0, 0, (), node_id, reachable=False)


def status_of(raw: Mapping[str, Any], node_id: str | None) -> HostStatus:
    """The actor's answer; ``alive`` only when its server answered too."""
    return HostStatus(
        name=str(raw["name"]),
        alive=bool(raw.get("serving", True)),
        reachable=True,
        draining=bool(raw["draining"]),
        url=str(raw["url"]),
        sandboxes=int(raw["sandboxes"]),
        max_sandboxes=int(raw["max_sandboxes"]),
        free_memory_mib=int(raw["free_memory_mib"]),
        images=tuple(raw["images"]),
        node_id=node_id or raw.get("node_id"),
    )


class Cluster:
    """One per API replica: the hosts of the Ray cluster at ``settings.cluster_address``."""

    def __init__(self) -> None:
        self._actors: dict[str, Any] = {}
        self._nodes: dict[str, str] = {}  # host -> the node its actor last answered from
        self._endpoints: dict[str, tuple[float, HostEndpoint]] = {}

    @classmethod
    async def connect(cls, settings: Settings) -> Cluster:
        address = settings.cluster_address or "auto"
        with anyio.fail_after(CONNECT_TIMEOUT_S):
            await anyio.to_thread.run_sync(_init_ray, address, abandon_on_cancel=True)
        return cls()

    async def close(self) -> None:
        import ray

        self._actors.clear()
        await anyio.to_thread.run_sync(ray.shutdown)

    async def names(self) -> list[str]:
        """Every registered host (a named actor in the namespace, alive or not)."""
        names = await self._blocking(_list_host_names, CALL_TIMEOUT_S)
        return sorted(names)

    async def hosts(self) -> list[HostStatus]:
        """The status of every registered host; ``alive=False`` when it does not answer."""
        try:
            names = await self.names()
        except HostError:
            names = sorted(self._actors)
        statuses: dict[str, HostStatus] = {}

        async def one(name: str) -> None:
            statuses[name] = await self.status(name)

        async with anyio.create_task_group() as group:
            for name in names:
                group.start_soon(one, name)
        return [statuses[name] for name in names]

    async def status(self, name: str) -> HostStatus:
        try:
            actor = await self._actor(name)
            raw, node_id = await self._call(_status_call(actor), STATUS_TIMEOUT_S)
        except (HostError, NotFound):
            self.forget(name)  # it may come back with a new URL and key
            self._actors.pop(name, None)  # or as a new actor (host stop + start)
            return dead_status(name, self._nodes.get(name))
        self._nodes[name] = node_id
        status = status_of(raw, node_id)
        cached = self._endpoints.get(name)
        if cached and cached[1].url != status.url:
            self.forget(name)  # restarted: a new server, a new key
        return status

    async def endpoint(self, name: str) -> HostEndpoint:
        """Host ``name``'s server URL and admin key; :class:`HostDown` if it does not answer."""
        cached = self._endpoints.get(name)
        if cached and time.monotonic() - cached[0] < ENDPOINT_TTL_S:
            return cached[1]
        try:
            actor = await self._actor(name)
            url, key = await self._call(actor.endpoint.remote(), CALL_TIMEOUT_S)
        except NotFound as exc:  # its actor is gone for good: the host is down
            raise HostDown(f"host {name} is not registered", host=name) from exc
        except HostError as exc:
            self._actors.pop(name, None)
            raise HostDown(f"host {name} does not answer: {exc}", host=name) from exc
        found = HostEndpoint(name, str(url), str(key))
        self._endpoints[name] = (time.monotonic(), found)
        return found

    def forget(self, name: str) -> None:
        """Drop the cached endpoint of ``name`` (say, after its server refused its key)."""
        self._endpoints.pop(name, None)

    async def drain(self, name: str, on: bool) -> None:
        """Stop (``on``) or resume placing new sandboxes on host ``name``."""
        actor = await self._actor(name)
        try:
            await self._call(actor.drain.remote(on), CALL_TIMEOUT_S)
        except HostError as exc:
            self._actors.pop(name, None)
            raise HostDown(f"host {name} does not answer: {exc}", host=name) from exc

    async def dead_nodes(self) -> set[str]:
        """Ids of the Ray nodes the cluster has declared dead."""
        nodes = await self._blocking(_ray_nodes, CALL_TIMEOUT_S)
        return {str(node["NodeID"]) for node in nodes if not node.get("Alive", False)}

    async def _actor(self, name: str) -> Any:
        actor = self._actors.get(name)
        if actor is None:
            actor = await self._blocking(lambda: _get_actor(name), CALL_TIMEOUT_S)
            if actor is None:
                raise NotFound(f"no host named {name!r}", host=name)
            self._actors[name] = actor
        return actor

    @staticmethod
    async def _call(ref: Any, timeout_s: float) -> Any:
        """Await a Ray object ref (or a coroutine of refs) within ``timeout_s``."""
        try:
            with anyio.fail_after(timeout_s):
                if asyncio.iscoroutine(ref):
                    return await ref
                return await asyncio.wrap_future(ref.future())
        except TimeoutError as exc:
            raise HostError(f"no answer in {timeout_s:.1f} s") from exc
        except Exception as exc:  # Ray's own errors: the actor died, its call raised
            raise HostError(f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    async def _blocking(fn: Any, timeout_s: float) -> Any:
        try:
            with anyio.fail_after(timeout_s):
                return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
        except TimeoutError as exc:
            raise HostError(f"the Ray cluster did not answer in {timeout_s:.1f} s") from exc


async def _status_call(actor: Any) -> tuple[dict[str, Any], str]:
    raw = await asyncio.wrap_future(actor.status.remote().future())
    return raw, str(raw.get("node_id", ""))


def probe_gcs(address: str, timeout_s: float = GCS_PROBE_S) -> None:
    """HostError at once when nothing answers at a ``HOST:PORT`` address: ``ray.init``
    itself retries an unreachable GCS for minutes. ("auto" and URLs are left to Ray.)"""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise HostError(f"cannot reach the Ray cluster at {address}: {exc}") from exc


def _init_ray(address: str) -> None:
    import ray

    probe_gcs(address)
    ray.init(
        address=address,
        namespace=NAMESPACE,
        ignore_reinit_error=True,
        log_to_driver=False,
    )


def _list_host_names() -> list[str]:
    import ray

    found = ray.util.list_named_actors(all_namespaces=False)
    return [n[len(ACTOR_PREFIX) :] for n in found if str(n).startswith(ACTOR_PREFIX)]


def _get_actor(name: str) -> Any:
    import ray

    try:
        return ray.get_actor(actor_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


def _ray_nodes() -> list[dict[str, Any]]:
    import ray

    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return nodes
