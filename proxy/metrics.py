"""Every Prometheus metric the proxy exports, on one registry per app.

Never registers on prometheus_client's global registry, so several apps (tests,
workers) can live in one process without clashing.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Set by the supervisor for its worker processes (prometheus_client's own switch):
# every worker writes its samples there and /metrics adds them up.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Methods get their own label value; anything else a client invents is "other",
# so a scanner cannot create a series per made-up method.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
# How often tallied counts reach prometheus_client (see Metrics.count).
FLUSH_INTERVAL = 1.0
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# indexguard_auth_failures_total's reasons: a fixed set, whatever a client sends.
AUTH_FAILURE_REASONS = (
    "missing", "invalid", "expired", "scope", "rate_limited", "unavailable",
    # trusted publishing: an ID token refused (at /_/oidc/mint-token or as __oidc__)
    "oidc_disabled", "oidc_malformed", "oidc_algorithm", "oidc_issuer", "oidc_audience",
    "oidc_expired", "oidc_not_yet_valid", "oidc_signature", "oidc_unknown_key", "oidc_replay",
    "oidc_claims", "oidc_unavailable",
    # a minted upload token refused, or used beyond its publisher's index and projects
    "minted_expired", "minted_invalid", "oidc_scope",
)


class _RequestTally:
    __slots__ = ("buckets", "count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        # Not cumulative, like prometheus_client's own: one slot per bucket, +Inf last.
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)


class Metrics:
    """The metric objects; names and labels are documented in the README."""

    def __init__(
        self, upstreams: Sequence[str] = ("pypi",), groups: Sequence[str] = ("default",),
    ) -> None:
        """upstreams and groups: the names the config gives, the only values of the
        `upstream` and `group` labels (exported at 0 from the first scrape)."""
        self._multiproc_dir = os.environ.get(MULTIPROC_ENV)
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "indexguard_http_requests", "HTTP requests answered",
            ["route", "method", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "indexguard_http_request_duration_seconds", "Time to answer a request",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.index_cache = Counter(
            "indexguard_index_cache", "Upstream project page lookups by cache result",
            ["result", "upstream"], registry=r,  # hit | miss | revalidated
        )
        self.file_cache = Counter(
            "indexguard_file_cache", "Upstream file and metadata requests by cache result",
            ["result"], registry=r,  # hit | miss | joined
        )
        self.cache_bytes = Gauge(
            "indexguard_cache_bytes", "Bytes of upstream artifacts in the disk cache", registry=r,
            multiprocess_mode="livemax",  # workers share one disk cache
        )
        self.cache_entries = Gauge(
            "indexguard_cache_entries", "Upstream artifacts in the disk cache", registry=r,
            multiprocess_mode="livemax",
        )
        self.cache_evictions = Counter(
            "indexguard_cache_evictions", "Artifacts evicted to stay under cache.max_bytes",
            registry=r,
        )
        self.upstream_requests = Counter(
            "indexguard_upstream_requests", "Requests sent upstream by kind and outcome",
            # kind: page|file|names; outcome: ok|not_modified|not_found|error|refused
            ["kind", "outcome", "upstream"], registry=r,
        )
        self.upstream_latency = Histogram(
            "indexguard_upstream_request_duration_seconds", "Upstream response time (headers)",
            ["kind", "upstream"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_up = Gauge(
            "indexguard_upstream_up", "1 when the last upstream request got an answer, else 0",
            ["upstream"], registry=r, multiprocess_mode="livemostrecent",
        )
        self.stale_pages = Counter(
            "indexguard_stale_pages_served", "Cached pages served because upstream failed",
            ["upstream"], registry=r,
        )
        self.hash_mismatches = Counter(
            "indexguard_hash_mismatches",
            "Upstream files whose bytes did not match the page's hash",
            registry=r,
        )
        self.uploads = Counter(
            "indexguard_uploads", "Upload attempts by outcome",
            ["outcome"], registry=r,  # stored | duplicate | rejected | error
        )
        self.blocked_collisions = Counter(
            "indexguard_blocked_collisions",
            "Requests for a name that exists upstream but was kept private",
            ["rule", "project"], registry=r,  # rule: private | reserved
        )
        self.guard_decisions = Counter(
            "indexguard_guard_decisions", "Guard decisions by rule",
            # rule: private | reserved | forward_off | upstream | not_found; group: a
            # group's name, or index:<name> for /i/<index>/
            ["rule", "group"], registry=r,
        )
        self.min_age_hidden = Counter(
            "indexguard_min_age_hidden_files", "Upstream files hidden by guard.min_age",
            registry=r,
        )
        self.upload_collisions = Counter(
            "indexguard_upload_collisions", "Uploads of a name that exists upstream",
            ["action"], registry=r,  # rejected | warned | allowed
        )
        self.bytes_served = Counter(
            "indexguard_bytes_served", "File bytes sent to clients by source",
            ["source"], registry=r,  # private | cache | upstream
        )
        self.auth_failures = Counter(
            "indexguard_auth_failures", "Requests refused for credentials",
            ["reason"], registry=r,  # one of AUTH_FAILURE_REASONS
        )
        self._upstreams = tuple(upstreams)
        self._groups = tuple(groups)
        for upstream in self._upstreams:
            self.upstream_up.labels(upstream).set(1)
        # Counts from the request path wait here, in plain dicts, until flush():
        # prometheus_client takes a lock (and in multiprocess mode writes an
        # mmap) per inc() and per observe(), which cost a warm page about 6 us
        # of its 55 (profiled). flush() runs every FLUSH_INTERVAL and before
        # every exposition, so a scrape sees at most a second-old count from
        # the other workers and an exact one from the worker it asks.
        self._tally: dict[tuple[Counter, tuple[str, ...]], float] = {}
        self._requests: dict[tuple[str, str, int], _RequestTally] = {}
        self._initialize_labels()

    def count(self, metric: Counter, *values: str, amount: float = 1.0) -> None:
        """metric.labels(*values).inc(amount), at the next flush()."""
        key = (metric, values)
        self._tally[key] = self._tally.get(key, 0.0) + amount

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request, for the request counter and the latency histogram."""
        if method not in _METHODS:
            method = "other"
        key = (route, method, status)
        tally = self._requests.get(key)
        if tally is None:
            tally = self._requests[key] = _RequestTally()
        tally.count += 1
        tally.seconds += seconds
        tally.buckets[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1

    def flush(self) -> None:
        """Hand the tallied counts to prometheus_client."""
        tally, self._tally = self._tally, {}
        for (metric, values), amount in tally.items():
            (metric.labels(*values) if values else metric).inc(amount)
        requests, self._requests = self._requests, {}
        for (route, method, status), t in requests.items():
            self.requests.labels(route, method, str(status)).inc(t.count)
            histogram = self.request_latency.labels(route)
            # A histogram's buckets and sum are prometheus_client's own values
            # (in-process or mmap): adding to them is what observe() does, once
            # per bucket instead of once per request. tests/test_prometheus.py
            # checks the result against observe() itself.
            histogram._sum.inc(t.seconds)
            for i, n in enumerate(t.buckets):
                if n:
                    histogram._buckets[i].inc(n)

    def exposition(self) -> bytes:
        """The text format for /metrics: this process's, or all workers' summed."""
        self.flush()
        if self._multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._multiproc_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def _initialize_labels(self) -> None:
        """Export every known label value at 0, so rate() and the dashboard see a
        series from the first scrape instead of 'No data' until the first event."""
        for upstream in self._upstreams:
            self.stale_pages.labels(upstream)
            for result in ("hit", "miss", "revalidated"):
                self.index_cache.labels(result, upstream)
        for result in ("hit", "miss", "joined"):
            self.file_cache.labels(result)
        for upstream in self._upstreams:
            for kind in ("page", "file"):
                self.upstream_latency.labels(kind, upstream)
                for outcome in ("ok", "not_modified", "not_found", "error", "refused"):
                    self.upstream_requests.labels(kind, outcome, upstream)
        for outcome in ("stored", "duplicate", "rejected", "error"):
            self.uploads.labels(outcome)
        for group in self._groups:
            for rule in ("private", "reserved", "forward_off", "upstream", "not_found"):
                self.guard_decisions.labels(rule, group)
        for action in ("rejected", "warned"):
            self.upload_collisions.labels(action)
        for source in ("private", "cache", "upstream"):
            self.bytes_served.labels(source)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
