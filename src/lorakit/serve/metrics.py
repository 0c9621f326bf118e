"""Prometheus metrics for the server, in a registry of its own (one per app)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorakit_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "lorakit_request_latency_seconds",
            "Time from request to the end of the answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "lorakit_time_to_first_token_seconds",
            "Time from queueing to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lorakit_prompt_tokens", "Prompt tokens processed, by model", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "lorakit_generated_tokens", "Tokens generated, by model", ["model"], registry=r
        )
        self.finished = Counter(
            "lorakit_generations",
            "Generations ended, by model and finish reason",
            ["model", "finish_reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "lorakit_batch_size",
            "Requests in each decoding step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.in_flight = Gauge("lorakit_requests_in_progress", "Generation requests queued or running", registry=r)
        self.adapters_loaded = Gauge("lorakit_adapters_loaded", "LoRA adapters loaded", registry=r)

    def record_finish(self, request) -> None:
        self.prompt_tokens.labels(request.model).inc(len(request.prompt_ids))
        self.generated_tokens.labels(request.model).inc(len(request.ids))
        self.finished.labels(request.model, request.finish_reason or "unknown").inc()
        if request.first_token_at is not None:
            self.first_token.observe(request.first_token_at - request.enqueued_at)

    def observe_request(self, endpoint: str, status: int, started: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - started)
