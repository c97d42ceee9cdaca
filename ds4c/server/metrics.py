"""``/metrics``: Prometheus text format, one registry per server (never the global one, so two apps
in one process do not share counters).

Counters and histograms are updated by the handlers; the engine's gauges (running and waiting
requests, pages per pool, preemptions, steps) are read from ``Engine.stats()`` at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("ds4c_requests_running", "requests in the running batch", value=stats["running"])
        yield GaugeMetricFamily("ds4c_requests_waiting", "requests waiting for admission", value=stats["waiting"])
        used = GaugeMetricFamily("ds4c_pages_used", "state pages in use per pool", labels=["pool"])
        total = GaugeMetricFamily("ds4c_pages_capacity", "state pages per pool", labels=["pool"])
        for pool, p in stats["pages"].items():
            used.add_metric([pool], p["used"])
            total.add_metric([pool], p["capacity"])
        yield used
        yield total
        yield CounterMetricFamily("ds4c_preemptions", "requests preempted (pages freed, recomputed later)",
                                  value=stats["preemptions"])
        yield CounterMetricFamily("ds4c_engine_steps", "engine steps run", value=stats["steps"])
        yield CounterMetricFamily("ds4c_computed_prefill_tokens", "prompt tokens computed by the engine",
                                  value=stats["prefill_tokens"])
        cache = stats.get("prefix_cache")
        if cache is not None:
            yield CounterMetricFamily("ds4c_prefix_query_tokens", "prompt tokens of admitted requests, looked up in "
                                      "the prefix cache", value=cache["query_tokens"])
            yield CounterMetricFamily("ds4c_prefix_hit_tokens", "prompt tokens the prefix cache saved computing",
                                      value=cache["hit_tokens"])
            yield GaugeMetricFamily("ds4c_prefix_cache_hit_rate", "hit tokens over looked-up tokens, since start",
                                    value=cache["hit_rate"] or 0.0)
            yield GaugeMetricFamily("ds4c_prefix_cache_nodes", "nodes of the prefix cache's tree", value=cache["nodes"])


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ds4c_requests", "finished HTTP generation requests", ["endpoint", "finish_reason"],
                                registry=r)
        self.rejected = Counter("ds4c_requests_rejected", "requests refused before generation", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("ds4c_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("ds4c_generation_tokens", "tokens generated for served requests",
                                         registry=r)
        self.ttft = Histogram("ds4c_time_to_first_token_seconds", "submit to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("ds4c_time_per_output_token_seconds", "mean time between a request's tokens after "
                              "the first", buckets=TPOT_BUCKETS, registry=r)
        self.latency = Histogram("ds4c_e2e_request_latency_seconds", "submit to finish", buckets=LATENCY_BUCKETS,
                                 registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
