"""Prometheus metrics of the server (names after vLLM's, prefixed ``optlm:``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("optlm:num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("optlm:num_requests_waiting", "Sequences waiting to be admitted", registry=r)
        self.blocks = Gauge("optlm:kv_cache_blocks_in_use", "Paged KV cache blocks held by sequences", registry=r)
        self.blocks_total = Gauge("optlm:kv_cache_blocks_total", "Paged KV cache blocks in the pool", registry=r)
        self.ttft = Histogram("optlm:time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("optlm:inter_token_latency_seconds", "Time between a completion's outputs",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("optlm:e2e_request_latency_seconds", "Arrival to the last token",
                             buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("optlm:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("optlm:generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("optlm:request_success", "Finished requests by finish reason", ["finished_reason"],
                                registry=r)
        self.added = Gauge("optlm:engine_requests_added", "Requests the engine has accepted since it started",
                           registry=r)
        self.guard_checked = Counter("optlm:guard_checked", "Texts the guard classified", registry=r)
        self.guard_refused = Counter("optlm:guard_refused", "Requests the guard refused, by the label it gave",
                                     ["label"], registry=r)
        self.errors = Counter("optlm:request_errors", "Requests answered with an error, by reason", ["reason"],
                              registry=r)

    def render(self, stats: dict[str, int]) -> bytes:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.blocks.set(stats["blocks"])
        self.blocks_total.set(stats["blocks_total"])
        self.added.set(stats["requests_added"])
        return generate_latest(self.registry)
