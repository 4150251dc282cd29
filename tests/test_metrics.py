"""Metrics tallies counts in plain dicts and hands them to prometheus_client on
flush (it reaches into a histogram's own values to do so): the exposition must
be exactly what prometheus_client's own inc() and observe() would have made."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.metrics import _LATENCY_BUCKETS, Metrics

DURATIONS = [0.0, 0.0004, 0.001, 0.0010001, 0.003, 0.05, 0.7, 2.5, 9.99, 10.0, 12.0, 300.0]


def _lines(body: bytes, prefix: str) -> list[str]:
    return sorted(
        line for line in body.decode().splitlines()
        if line.startswith(prefix) and "_created" not in line
    )


def test_flushed_tallies_match_prometheus_client_own_counting() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    requests = Counter("indexguard_http_requests", "x", ["route", "method", "status"],
                       registry=reference)
    latency = Histogram("indexguard_http_request_duration_seconds", "x", ["route"],
                        buckets=_LATENCY_BUCKETS, registry=reference)
    served = Counter("indexguard_bytes_served", "x", ["source"], registry=reference)
    for i, seconds in enumerate(DURATIONS):
        route = "/simple/{project}/" if i % 3 else "/files/{project}/{filename}"
        status = 200 if i % 4 else 304
        metrics.request_done(route, "GET", status, seconds)
        requests.labels(route, "GET", str(status)).inc()
        latency.labels(route).observe(seconds)
        metrics.count(metrics.bytes_served, "cache", amount=1000 * i)
        served.labels("cache").inc(1000 * i)
    # Methods a client makes up share one label value.
    metrics.request_done("unmatched", "BREW", 405, 0.001)
    requests.labels("unmatched", "other", "405").inc()
    latency.labels("unmatched").observe(0.001)

    ours, theirs = metrics.exposition(), generate_latest(reference)
    for prefix in ("indexguard_http_requests_total", "indexguard_http_request_duration",
                   'indexguard_bytes_served_total{source="cache"}'):
        assert _lines(ours, prefix) == _lines(theirs, prefix), prefix
    assert _lines(ours, "indexguard_http_request_duration_seconds_count")

    # A second flush adds only what came since.
    metrics.request_done("/simple/{project}/", "GET", 200, 0.002)
    latency.labels("/simple/{project}/").observe(0.002)
    requests.labels("/simple/{project}/", "GET", "200").inc()
    ours, theirs = metrics.exposition(), generate_latest(reference)
    prefix = "indexguard_http_request_duration"
    assert _lines(ours, prefix) == _lines(theirs, prefix)
