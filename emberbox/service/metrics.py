"""Prometheus metrics (``GET /metrics``; docs/observability.md lists each one).

Counters and histograms live in one registry per process (:data:`REGISTRY`): the
service and the API bump them as things happen. What is a state rather than an event
(sandboxes by state and image, pool sizes, VMM memory) is read at scrape time by
:func:`snapshot_families`, so it is never stale and costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

# Create → running, by where the sandbox came from.
CREATE_PATHS = ("pool", "template", "cold", "fork", "resume")
_FAST = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

CREATES = Counter(
    "emberbox_sandbox_creates_total",
    "Sandboxes started, by path (pool, template, cold, fork, resume) and outcome.",
    ["path", "outcome"],
    registry=REGISTRY,
)
CREATE_SECONDS = Histogram(
    "emberbox_sandbox_create_seconds",
    "Create to running, by path.",
    ["path"],
    buckets=_FAST,
    registry=REGISTRY,
)
EXEC_SECONDS = Histogram(
    "emberbox_exec_seconds",
    "Commands run in sandboxes, request to result (outcome: ok, timeout, error).",
    ["outcome"],
    buckets=_FAST,
    registry=REGISTRY,
)
ONESHOT_SECONDS = Histogram(
    "emberbox_oneshot_seconds",
    "One-shot runs (POST /v1/run), request to result, by language and status.",
    ["language", "status"],
    buckets=_FAST,
    registry=REGISTRY,
)
ERRORS = Counter(
    "emberbox_errors_total",
    "Errors answered by the API, by error type (the body's error.type).",
    ["type"],
    registry=REGISTRY,
)
POOL_REFILLS = Counter(
    "emberbox_pool_refills_total",
    "Warm-pool sandboxes started ahead of time, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
REAPER_ACTIONS = Counter(
    "emberbox_reaper_actions_total",
    "What the reaper and the orphan sweep did (expired, vmm_died, orphan_removed).",
    ["action"],
    registry=REGISTRY,
)
REFUSALS = Counter(
    "emberbox_refusals_total",
    "Requests refused by a limit (rate_limited, failed_auth, quota).",
    ["reason"],
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "emberbox_http_requests_total",
    "HTTP requests, by method, route template and status code.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_SECONDS = Histogram(
    "emberbox_http_request_seconds",
    "HTTP requests until the response is complete, by method and route template.",
    ["method", "route"],
    buckets=_FAST,
    registry=REGISTRY,
)


def snapshot_families(
    sandboxes: Iterable[tuple[str, str]],
    pool_sizes: Mapping[str, int],
    vmm_resident_bytes: int,
) -> list[Metric]:
    """The scrape-time gauges: ``sandboxes`` as (state, image) pairs, the pool's ready
    sandboxes per image, and the summed resident memory of the live VMM processes."""
    by_state = GaugeMetricFamily(
        "emberbox_sandboxes",
        "Sandboxes known to the store, by state and image.",
        labels=["state", "image"],
    )
    counts: dict[tuple[str, str], int] = {}
    for state, image in sandboxes:
        counts[state, image] = counts.get((state, image), 0) + 1
    for (state, image), n in sorted(counts.items()):
        by_state.add_metric([state, image], n)
    pool = GaugeMetricFamily(
        "emberbox_pool_ready", "Warm-pool sandboxes ready to hand out, by image.", labels=["image"]
    )
    for image, n in sorted(pool_sizes.items()):
        pool.add_metric([image], n)
    rss = GaugeMetricFamily(
        "emberbox_vmm_resident_bytes", "Resident memory of all live VMM processes, summed."
    )
    rss.add_metric([], vmm_resident_bytes)
    return [by_state, pool, rss]


class _Families(Collector):
    """A collector that yields fixed families (one scrape's gauges)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


def exposition(gauges: list[Metric]) -> bytes:
    """The whole scrape, in Prometheus' text format: events, then this scrape's gauges."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_Families(gauges))
    return generate_latest(REGISTRY) + generate_latest(scrape)
