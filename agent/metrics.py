"""A node's Prometheus metrics, in a registry of its own (several nodes may share one process).

The node updates these as it serves (tokens, sessions, queue, latencies, drafting figures) and
the HTTP API counts requests by API and status; `/metrics` serves `text()`. No global
registry: tests and the harness run many nodes in one interpreter.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds. A CPU node takes ~0.05-2 s to the first token of a short prompt and far longer for
# long prompts on a small device; buckets span both.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds between consecutive tokens of one reply (decode step plus network when remote).
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ACCEPTANCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TOKENS_PER_STEP_BUCKETS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
DRAFT_LENGTH_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeMetrics:
    """Counters, gauges and histograms of one node; `text()` is the exposition format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.generated_tokens = Counter(
            "sled_generated_tokens", "Tokens generated for clients", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "sled_prompt_tokens", "Prompt tokens processed for clients", ["model"], registry=r
        )
        self.requests = Counter(
            "sled_requests",
            "HTTP generation requests by API endpoint and status code",
            ["api", "status"],
            registry=r,
        )
        self.active_sessions = Gauge(
            "sled_active_sessions", "Generation sessions in progress on this node", registry=r
        )
        self.queue_depth = Gauge(
            "sled_queue_depth", "Work items waiting for a forward pass", ["queue"], registry=r
        )
        self.time_to_first_token = Histogram(
            "sled_time_to_first_token_seconds",
            "From request accepted to first generated token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "sled_token_latency_seconds",
            "Time between consecutive generated tokens of one reply",
            ["model"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        # Drafting (speculative decoding) figures; zero until drafting runs.
        self.draft_tokens = Counter(
            "sled_draft_tokens",
            "Draft tokens proposed to the verifier, by drafter kind and outcome",
            ["kind", "outcome"],  # outcome: accepted | rejected
            registry=r,
        )
        self.draft_acceptance = Histogram(
            "sled_draft_acceptance_ratio",
            "Accepted share of the drafted tokens, per verify step with a draft",
            ["kind"],
            buckets=ACCEPTANCE_BUCKETS,
            registry=r,
        )
        self.tokens_per_verify_step = Histogram(
            "sled_tokens_per_verify_step",
            "Tokens committed per verify pass (accepted drafts plus the bonus token)",
            ["kind"],
            buckets=TOKENS_PER_STEP_BUCKETS,
            registry=r,
        )
        self.draft_length = Histogram(
            "sled_draft_length",
            "Draft tokens per verify step (the adaptive or fixed draft length in use)",
            ["kind"],
            buckets=DRAFT_LENGTH_BUCKETS,
            registry=r,
        )
        self.verify_batch = Histogram(
            "sled_verify_batch_sessions",
            "Sessions in one verifier forward pass",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.drafter_failovers = Counter(
            "sled_drafter_failovers",
            "Sessions whose drafter failed and that went on with another drafter or none",
            registry=r,
        )

    # Small named updates so callers do not need prometheus_client's label API.
    def count_request(self, api: str, status: int) -> None:
        self.requests.labels(api=api, status=str(status)).inc()

    def count_prompt(self, model: str, tokens: int) -> None:
        self.prompt_tokens.labels(model=model).inc(tokens)

    def count_generated(self, model: str, tokens: int = 1) -> None:
        self.generated_tokens.labels(model=model).inc(tokens)

    def observe_first_token(self, model: str, seconds: float) -> None:
        self.time_to_first_token.labels(model=model).observe(seconds)

    def observe_token_gap(self, model: str, seconds: float) -> None:
        self.token_latency.labels(model=model).observe(seconds)

    def set_queue_depth(self, queue: str, depth: int) -> None:
        self.queue_depth.labels(queue=queue).set(depth)

    def observe_verify_step(self, drafted: int, accepted: int, kind: str = "none") -> None:
        """One session's verify pass over `drafted` draft tokens, of which `accepted` stood."""
        if drafted < 0 or not 0 <= accepted <= drafted:
            raise ValueError(f"bad verify figures: drafted={drafted}, accepted={accepted}")
        self.draft_tokens.labels(kind=kind, outcome="accepted").inc(accepted)
        self.draft_tokens.labels(kind=kind, outcome="rejected").inc(drafted - accepted)
        if drafted:
            self.draft_acceptance.labels(kind=kind).observe(accepted / drafted)
        self.tokens_per_verify_step.labels(kind=kind).observe(accepted + 1)
        self.draft_length.labels(kind=kind).observe(drafted)

    def text(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self.registry).decode("utf-8")
