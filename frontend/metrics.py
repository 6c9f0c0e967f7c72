"""Prometheus metrics of the HTTP server, named after vLLM's with the `pagedserve:` prefix.

Two sources:
- the scheduler's SchedulerStats (sent with every step's outputs): gauges are set from the latest
  stats at scrape time, counters advance by the difference since the previous scrape;
- per-request timings measured here in the frontend (RequestTimer): time to first token,
  inter-token latency, end-to-end latency, and the queue time the scheduler reports.

The registry is private to the server, so nothing else in the process leaks into /metrics.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from frontend.output_processor import OutputUpdate
from ipc.messages import SchedulerStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# SchedulerStats counter field -> metric name (prometheus_client appends _total).
_STAT_COUNTERS = {
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    "num_preemptions": ("num_preemptions", "Requests preempted because the KV cache was full."),
    "num_prompt_tokens": ("prompt_tokens", "Prompt tokens prefilled."),
    "num_generation_tokens": ("generation_tokens", "Tokens generated."),
}


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name}
        names = list(self.labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pagedserve:{name}", doc, names, registry=self.registry).labels(**self.labels)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"pagedserve:{name}", doc, names, buckets=buckets,
                             registry=self.registry).labels(**self.labels)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).")
        self.counters = {field: Counter(f"pagedserve:{name}", doc, names, registry=self.registry)
                         .labels(**self.labels) for field, (name, doc) in _STAT_COUNTERS.items()}
        self.request_success = Counter("pagedserve:request_success", "Finished requests by finish reason.",
                                       names + ["finished_reason"], registry=self.registry)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's output steps.",
                             _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduling.",
                                    _REQUEST_BUCKETS)
        self._last = SchedulerStats()

    def render(self, stats: SchedulerStats) -> bytes:
        """Bring the scheduler-side metrics up to `stats`, then the Prometheus text of everything."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        for field, counter in self.counters.items():
            delta = getattr(stats, field) - getattr(self._last, field)
            if delta > 0:
                counter.inc(delta)
        self._last = stats
        return generate_latest(self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Timings of one engine request, fed by its OutputUpdates."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last_token: float | None = None

    def on_update(self, update: OutputUpdate) -> None:
        if not any(update.new_token_ids):
            return
        now = time.monotonic()
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.itl.observe(now - self.last_token)
        self.last_token = now

    def on_finish(self, update: OutputUpdate) -> None:
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.arrival)
        queue_time = update.output.metrics.get("queue_time")
        if queue_time is not None:
            m.queue_time.observe(queue_time)
        for out in update.outputs:
            m.request_success.labels(finished_reason=out.finish_reason or "abort", **m.labels).inc()
