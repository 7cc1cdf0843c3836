"""The server's Prometheus metrics, named like vLLM's (``vllm:`` → ``joey:``) so existing dashboards
and alerts carry over: requests running and waiting, prompt and generated tokens, time to first
token, inter-token latency, end-to-end latency, and the speculative-decoding counters.

Every server has its own registry (several may live in one process, as in the tests). The worker
thread updates them as each step's events come out, so the counters move while requests run. A
replica under Ray Serve adds a ``replica`` label to every series, so the merged view of all
replicas (``joey.server.ray_serve``) keeps each replica's counters apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from joey.request import StreamEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class ServerMetrics:
    """The counters, gauges and histograms of one server, labelled with its model name (and replica)."""

    def __init__(self, model_name: str, replica: str | None = None) -> None:
        self.registry = reg = CollectorRegistry()
        labels = ["model_name"] if replica is None else ["model_name", "replica"]
        self.label_values = (model_name,) if replica is None else (model_name, replica)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=reg)

        self.running = Gauge("joey:num_requests_running", "Requests in the decoding batch.", labels, registry=reg)
        self.waiting = Gauge("joey:num_requests_waiting", "Requests queued for a place in the batch.", labels,
                             registry=reg)
        self.prompt_tokens = counter("joey:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("joey:generation_tokens", "Tokens generated.")
        self.finished = counter("joey:request_success", "Requests finished, by reason.", ("finished_reason",))
        self.ttft = Histogram("joey:time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=sorted(set(LATENCY_BUCKETS + REQUEST_BUCKETS)), registry=reg)
        self.itl = Histogram("joey:inter_token_latency_seconds",
                             "Time per generated token after the first (a step's gap shared by its tokens).",
                             labels, buckets=LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram("joey:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=REQUEST_BUCKETS, registry=reg)
        self.drafts = counter("joey:spec_decode_num_drafts", "Steps that verified a draft.")
        self.draft_tokens = counter("joey:spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.accepted = counter("joey:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter("joey:spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted, by depth in the draft (0 = first).", ("position",))
        self.model_name = model_name

    def set_load(self, running: int, waiting: int) -> None:
        self.running.labels(*self.label_values).set(running)
        self.waiting.labels(*self.label_values).set(waiting)

    def observe(self, event: StreamEvent, arrived: float, last_token_at: float | None, now: float) -> None:
        """Account one event of a request that arrived at ``arrived`` and last got tokens at
        ``last_token_at`` (None: these are its first)."""
        m = self.label_values
        if event.token_ids:
            self.generation_tokens.labels(*m).inc(len(event.token_ids))
            if last_token_at is None:
                self.ttft.labels(*m).observe(now - arrived)
            else:
                gap = (now - last_token_at) / len(event.token_ids)
                for _ in event.token_ids:
                    self.itl.labels(*m).observe(gap)
        if event.draft_tokens:
            self.drafts.labels(*m).inc()
            self.draft_tokens.labels(*m).inc(event.draft_tokens)
            self.accepted.labels(*m).inc(event.accepted)
            for pos in range(event.accepted):
                self.accepted_per_pos.labels(*m, str(pos)).inc()
        gen = event.generation
        if gen is not None:
            self.prompt_tokens.labels(*m).inc(gen.prompt_tokens)
            self.finished.labels(*m, gen.finish_reason).inc()
            self.e2e.labels(*m).observe(now - arrived)
        elif event.error is not None:
            self.finished.labels(*m, "error").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def families(self) -> list[Metric]:
        """The current values as metric families (what a view merging several servers combines)."""
        return list(self.registry.collect())
