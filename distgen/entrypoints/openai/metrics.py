"""Prometheus metrics under the ``distgen:`` prefix, named after vLLM's set.

Fed once per engine step by ``AsyncLLM`` (see :class:`distgen.frontend.stats.StatLogger`): gauges from
the scheduler's stats, counters and histograms from what the step produced. Each server owns its
registry, so several servers in one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from distgen.engine_core.messages import SchedulerStatsMsg
from distgen.frontend.stats import IterationStats

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0]


disable_created_metrics()  # no "_created" series beside every counter and histogram


class PrometheusStatLogger:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"distgen:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"distgen:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(f"distgen:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Preemptions (KV blocks reclaimed).")
        self.restarts = counter("num_worker_restarts", "Lost workers replaced (worker recovery).")
        self.recovered = counter("num_recovered_requests", "Requests rescheduled after a worker restart.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        self._success = Counter(
            "distgen:request_success",
            "Finished sequences by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.model_name = model_name
        # The scheduler reports running totals; counters advance by the difference.
        self._last: SchedulerStatsMsg | None = None

    def record(self, scheduler: SchedulerStatsMsg | None, it: IterationStats) -> None:
        if scheduler is not None:
            self.running.set(scheduler.num_running)
            self.waiting.set(scheduler.num_waiting)
            self.kv_usage.set(scheduler.kv_cache_usage)
            last = self._last or SchedulerStatsMsg(0, 0, 0.0, 0, 0, 0)
            self.prefix_queries.inc(scheduler.prefix_cache_queries - last.prefix_cache_queries)
            self.prefix_hits.inc(scheduler.prefix_cache_hits - last.prefix_cache_hits)
            self.preemptions.inc(scheduler.num_preemptions - last.num_preemptions)
            self.restarts.inc(scheduler.num_worker_restarts - last.num_worker_restarts)
            self.recovered.inc(scheduler.num_recovered_requests - last.num_recovered_requests)
            self._last = scheduler
        self.prompt_tokens.inc(it.num_prompt_tokens)
        self.generation_tokens.inc(it.num_generation_tokens)
        for v in it.time_to_first_tokens:
            self.ttft.observe(v)
        for v in it.inter_token_latencies:
            self.itl.observe(v)
        for v in it.e2e_latencies:
            self.e2e.observe(v)
        for reason in it.finish_reasons:
            self._success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
