"""Prometheus metrics, prefix `quept:`, with vLLM's names where one exists (docs/architecture.md §5).

Deployment (dashboards, autoscaling) depends on these exact names:

    quept:num_requests_running                  gauge    sequences in the running batch
    quept:num_requests_waiting                  gauge    requests waiting for admission
    quept:kv_cache_usage_perc                   gauge    KV-cache blocks in use, 0..1 (1 = 100 %; cached blocks
                                                         nobody holds count as free)
    quept:prefix_cache_queries_total            counter  prompt tokens of sequences admitted with a prefix-cache lookup
    quept:prefix_cache_hits_total               counter  of those, tokens found cached (hit rate = hits / queries)
    quept:structured_output_requests_total{kind}  counter  requests with a grammar: json_schema | json_object |
                                                         regex | choice | grammar (forced tool calls count as grammar)
    quept:grammar_compile_seconds               histogram  compiling a grammar not in the cache
    quept:prompt_tokens_total                   counter  prompt tokens admitted
    quept:prefill_tokens_total                  counter  prompt rows run through the model (the n completions
                                                         of one request share one prefill; a recompute after
                                                         preemption runs its rows again)
    quept:generation_tokens_total{precision}    counter  generated tokens, by the plan that produced them
    quept:time_to_first_token_seconds           histogram
    quept:inter_token_latency_seconds           histogram
    quept:e2e_request_latency_seconds           histogram
    quept:request_success_total{finished_reason}  counter  stop | length | abort (aborted = client gone)
    quept:precision_switches_total{policy,reason} counter  plan changes made by the controller
    quept:requests_by_precision_total{precision}  counter  requests by the plan they started at
    quept:num_preemptions_total                 counter  sequences preempted for KV blocks
    quept:request_queue_time_seconds            histogram  arrival to admission
    quept:request_rejected_total{reason}        counter  queue_full | draining (429/503 answers)
    quept:default_precision_bits                gauge    real bits per weight of the plan `auto` requests get now
    quept:predicted_inter_token_latency_seconds gauge    load policy: predicted ITL of that plan at the expected batch
    quept:generation_tokens_by_width_total{width} counter generated tokens by stored width (mixed plans split
                                                         by each width's share of the weights)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from quept.engine.engine import EngineObserver, EngineStats
from quept.engine.sequence import FinishReason, Sequence
from quept.precision.plan import PrecisionPlan

PREFIX = "quept:"
GRAMMAR_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics(EngineObserver):
    """All metrics of one server, in their own registry (several servers can live in one process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = PREFIX
        self.num_running = Gauge(f"{p}num_requests_running", "Number of requests in the running batch.", registry=r)
        self.num_waiting = Gauge(f"{p}num_requests_waiting", "Number of requests waiting to be admitted.", registry=r)
        self.kv_usage = Gauge(f"{p}kv_cache_usage_perc", "KV-cache usage, 0..1 (1 means 100 percent).", registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.prefill_tokens = Counter(f"{p}prefill_tokens", "Prompt rows run through the model.", registry=r)
        self.prefix_queries = Counter(f"{p}prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      registry=r)
        self.prefix_hits = Counter(f"{p}prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Generated tokens by precision.", ["precision"], registry=r)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{p}inter_token_latency_seconds", "Inter-token latency.", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{p}e2e_request_latency_seconds", "End-to-end request latency.", buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{p}request_queue_time_seconds", "Arrival to admission.", buckets=TTFT_BUCKETS, registry=r)
        self.success = Counter(f"{p}request_success", "Finished requests by finish reason (abort: client gone).",
                               ["finished_reason"], registry=r)
        self.switches = Counter(f"{p}precision_switches", "Precision plan changes by policy and reason.",
                                ["policy", "reason"], registry=r)
        self.by_precision = Counter(f"{p}requests_by_precision", "Requests by the precision they started at.",
                                    ["precision"], registry=r)
        self.preemptions = Counter(f"{p}num_preemptions", "Sequences preempted for KV blocks.", registry=r)
        self.rejected = Counter(f"{p}request_rejected", "Requests refused before admission.", ["reason"], registry=r)
        self.structured = Counter(f"{p}structured_output_requests", "Requests whose output a grammar constrains, by "
                                  "kind.", ["kind"], registry=r)
        self.grammar_compile = Histogram(f"{p}grammar_compile_seconds", "Compiling a grammar not in the cache.",
                                         buckets=GRAMMAR_BUCKETS, registry=r)
        for reason in FinishReason:
            self.success.labels(finished_reason=reason.value)
        for reason in ("queue_full", "draining"):
            self.rejected.labels(reason=reason)
        self.default_bits = Gauge(f"{p}default_precision_bits", "Real bits per weight of the plan auto requests get now.",
                                  registry=r)
        self.predicted_itl = Gauge(f"{p}predicted_inter_token_latency_seconds",
                                   "Load policy: predicted ITL of the default plan at the expected batch (NaN otherwise).",
                                   registry=r)
        self.width_tokens = Counter(f"{p}generation_tokens_by_width", "Generated tokens by stored width "
                                    "(a mixed-plan token counts by each width's share of the weights).", ["width"],
                                    registry=r)
        self._width_shares: Callable[[PrecisionPlan], dict[int, float]] | None = None

    def bind(self, running: Callable[[], float], waiting: Callable[[], float], kv_usage: Callable[[], float]) -> None:
        """Read the gauges live from the engine at scrape time (always current, also when idle)."""
        self.num_running.set_function(running)
        self.num_waiting.set_function(waiting)
        self.kv_usage.set_function(kv_usage)

    def bind_controller(self, controller: Any) -> None:
        """The precision policy's view: default plan gauge, predicted ITL (load policy), tokens per width."""
        from quept.policies.plans import plan_bits, width_shares

        self.default_bits.set_function(lambda: plan_bits(controller.default_plan))
        self.predicted_itl.set_function(lambda: float(getattr(controller, "predicted_itl_s", float("nan"))))
        shares: dict[PrecisionPlan, dict[int, float]] = {}

        def lookup(plan: PrecisionPlan) -> dict[int, float]:
            if plan not in shares:
                shares[plan] = width_shares(controller.model, plan)
            return shares[plan]

        self._width_shares = lookup
        for bits in controller.model.widths:
            self.width_tokens.labels(width=str(bits))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ EngineObserver (engine thread)

    def on_admitted(self, seq: Sequence, now: float) -> None:
        self.prompt_tokens.inc(seq.num_prompt)
        self.by_precision.labels(precision=seq.plan.name).inc()
        self.queue_time.observe(max(0.0, now - seq.request.arrival_time))

    def on_tokens(self, plan: PrecisionPlan, count: int) -> None:
        self.generation_tokens.labels(precision=plan.name).inc(count)
        if self._width_shares is not None:
            for bits, share in self._width_shares(plan).items():
                self.width_tokens.labels(width=str(bits)).inc(count * share)

    def on_prefill(self, rows: int) -> None:
        self.prefill_tokens.inc(rows)

    def on_prefix_cache(self, queried: int, hit: int) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)

    def on_first_token(self, seq: Sequence, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_inter_token(self, seq: Sequence, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_finished(self, seq: Sequence) -> None:
        reason = seq.finish_reason.value if seq.finish_reason is not None else "abort"
        self.success.labels(finished_reason=reason).inc()
        if seq.finished_time is not None:
            self.e2e.observe(max(0.0, seq.finished_time - seq.request.arrival_time))

    def on_switch(self, policy: str, reason: str, seq: Sequence, old: PrecisionPlan, new: PrecisionPlan) -> None:
        self.switches.labels(policy=policy, reason=reason).inc()

    def on_preempted(self, seq: Sequence) -> None:
        self.preemptions.inc()

    def on_step(self, stats: EngineStats, num_rows: int, seconds: float) -> None:
        pass
