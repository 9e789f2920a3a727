"""Prometheus metrics (prometheus-client): per model requests, latency by stage, items; per table and tier the
parameter server's hits, misses and evictions; the scheduler's knobs; online updates applied and skipped.

Request counts and latencies are recorded as requests finish. State that lives elsewhere (knobs, queue depth,
worker lookup counters, what each tier holds) is read when /metrics is scraped, by a custom collector: nothing
is copied on the hot path for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from recserve.sched.executor import QueryResult
    from recserve.serve.repository import ServedModel

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, models: Callable[[], dict[str, ServedModel]]) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter("recserve_requests", "Inference requests by outcome.",
                                 ["model", "protocol", "outcome"], registry=self.registry)
        self._items = Counter("recserve_items", "Items scored (rate() gives items/s).", ["model"],
                              registry=self.registry)
        self._latency = Histogram("recserve_latency_seconds", "Query latency by stage: queue (arrival to first "
                                  "sub-batch sent), compute (worker time, summed), total.", ["model", "stage"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(models))

    def request(self, model: str, protocol: str, outcome: str) -> None:
        self._requests.labels(model, protocol, outcome).inc()

    def observe(self, model: str, result: QueryResult) -> None:
        self._items.labels(model).inc(result.scores.shape[0])
        self._latency.labels(model, "queue").observe(result.queue_s)
        self._latency.labels(model, "compute").observe(result.compute_s)
        self._latency.labels(model, "total").observe(result.total_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, models: Callable[[], dict[str, ServedModel]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        knobs = GaugeMetricFamily("recserve_scheduler", "Scheduler knobs in force (B, W, k, T; T 0: none).",
                                  labels=["model", "knob"])
        queue = GaugeMetricFamily("recserve_queue_queries", "Queries admitted and not yet answered.",
                                  labels=["model"])
        rejected = CounterMetricFamily("recserve_rejections", "Queries refused by admission control or shed "
                                       "past their deadline.", labels=["model", "reason"])
        hits = CounterMetricFamily("recserve_ps_hits", "Unique keys a tier answered.", labels=["table", "tier"])
        misses = CounterMetricFamily("recserve_ps_misses", "Unique keys a tier lacked.", labels=["table", "tier"])
        not_found = CounterMetricFamily("recserve_ps_not_found", "Unique keys no tier held (default row).",
                                        labels=["table"])
        evictions = CounterMetricFamily("recserve_ps_evictions", "Rows a bounded tier evicted.",
                                        labels=["table", "tier"])
        rows = GaugeMetricFamily("recserve_ps_rows", "Rows a tier holds.", labels=["table", "tier"])
        updates = CounterMetricFamily("recserve_updates", "Online updates from the model's stream: messages "
                                      "applied or skipped (malformed, unknown table, values the table cannot "
                                      "hold), rows applied, failed reads and writes (retried).",
                                      labels=["model", "outcome"])
        for name, model in self._models().items():
            k = model.executor.knobs
            for knob, value in (("batch_size", k.batch_size), ("num_workers", k.num_workers),
                                ("threads_per_worker", k.threads_per_worker),
                                ("accelerator_threshold", k.accelerator_threshold or 0), ("max_queue", k.max_queue)):
                knobs.add_metric([name, knob], value)
            queue.add_metric([name], model.executor.queue_state()[0])
            for reason in ("queue_full", "deadline"):
                rejected.add_metric([name, reason], model.executor.rejections[reason])
            for table, counts in model.executor.lookup_counts().items():
                not_found.add_metric([table], counts.not_found)
                for tier, value in counts.hits.items():
                    hits.add_metric([table, tier], value)
                for tier, value in counts.misses.items():
                    misses.add_metric([table, tier], value)
            if model.updates:
                u = model.updates.stats()
                for outcome, value in (("applied_messages", u.applied_messages), ("applied_rows", u.applied_rows),
                                       ("skipped_messages", u.skipped_messages), ("read_errors", u.read_errors),
                                       ("write_errors", u.write_errors)):
                    updates.add_metric([name, outcome], value)
            for tier in model.ps.tiers:
                for table, held in tier.stats().items():
                    rows.add_metric([table, tier.name], held.rows)
                    evictions.add_metric([table, tier.name], held.evictions)
        yield from (knobs, queue, rejected, hits, misses, not_found, evictions, rows, updates)
