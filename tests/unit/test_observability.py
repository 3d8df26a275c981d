"""Request ids, JSON log lines and the metrics exposition (pure parts, no server)."""

from __future__ import annotations

import json
import logging
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emberbox import logs
from emberbox.api.observe import request_id_from
from emberbox.service import metrics


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("emberbox.test", logging.INFO, __file__, 1, message, (), None)
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def test_request_id_kept_when_sane_and_replaced_when_not() -> None:
    """A sane X-Request-Id is kept; a missing, too long or odd one becomes a fresh id."""
    assert request_id_from([(b"x-request-id", b"abc-123.X:y_z")]) == "abc-123.X:y_z"
    fresh = request_id_from([])
    assert len(fresh) == 32 and fresh != request_id_from([])
    for bad in (b"a" * 129, b"has space", b"new\nline", b""):
        got = request_id_from([(b"x-request-id", bad)])
        assert got != bad.decode("latin-1") and len(got) == 32


def test_json_line_carries_the_request_context() -> None:
    """Inside a request, a JSON line has time, level, message, request id, tenant, sandbox."""
    token = logs.request_context.set(logs.RequestContext("rid1", tenant="t1", sandbox_id="sb1"))
    try:
        record = _record("hello %s", status=200, duration_ms=1.5)
        record.args = ("world",)
        assert logs.ContextFilter().filter(record)
    finally:
        logs.request_context.reset(token)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["level"] == "info"
    assert (line["request_id"], line["tenant"], line["sandbox_id"]) == ("rid1", "t1", "sb1")
    assert (line["status"], line["duration_ms"]) == (200, 1.5)
    assert line["time"].endswith("+00:00")


def test_json_line_outside_a_request_has_no_request_fields() -> None:
    """Outside a request there is no request id, and odd values never break the line."""
    record = _record("x")
    record.status = object()  # not JSON-serialisable: written as its str()
    logs.ContextFilter().filter(record)
    line = json.loads(logs.JsonFormatter().format(record))
    assert "request_id" not in line and "tenant" not in line
    assert line["status"].startswith("<object")


def test_exposition_parses_and_counts_live_sandboxes() -> None:
    """The scrape text parses as Prometheus' format; gauges count what they are given."""
    metrics.CREATES.labels("pool", "ok").inc()
    text = metrics.exposition(
        metrics.snapshot_families(
            [("running", "default"), ("running", "default"), ("paused", "polyglot")],
            {"default": 2},
            4096,
        )
    ).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples["emberbox_sandboxes", (("image", "default"), ("state", "running"))] == 2
    assert samples["emberbox_sandboxes", (("image", "polyglot"), ("state", "paused"))] == 1
    assert samples["emberbox_pool_ready", (("image", "default"),)] == 2
    assert samples["emberbox_vmm_resident_bytes", ()] == 4096
    assert samples["emberbox_sandbox_creates_total", (("outcome", "ok"), ("path", "pool"))] >= 1


def test_metrics_bind_parses_host_and_port() -> None:
    """HOST:PORT (IPv6 in brackets) parses; anything else is a HostError naming it."""
    from emberbox import errors
    from emberbox.api.metrics_listener import parse_bind

    assert parse_bind("10.0.0.5:9464") == ("10.0.0.5", 9464)
    assert parse_bind("[::1]:9464") == ("::1", 9464)
    assert parse_bind(":9464") == ("127.0.0.1", 9464)
    for bad in ("9464", "host:", "host:port", "h:70000"):
        with pytest.raises(errors.HostError, match=re.escape(repr(bad))):
            parse_bind(bad)
