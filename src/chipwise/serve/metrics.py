"""The server's Prometheus metrics: latency histograms and token counters as requests finish, the engine's queue,
slots and KV cache read at scrape time, and what serving costs (dollars and energy) accumulated over the time
served, at the price and power the server was started with (measured time x stated rate; not a metered figure).

Each server has its own registry, so several servers in one process (tests) never share a counter.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Decode steps of a small model on a CPU take milliseconds, a large model's prefill on a busy server seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, engine, model: str, pricing=None):
        """`pricing`: a pricing.Pricing (the chips' price and power, and where they come from), or None."""
        self.registry = r = CollectorRegistry()
        self.engine, self.started = engine, time.monotonic()
        labels = {"model_name": model}
        names = list(labels)

        def gauge(name, doc, read):
            g = Gauge(name, doc, names, registry=r)
            g.labels(**labels).set_function(read)

        self.ttft = Histogram("chipwise_time_to_first_token_seconds", "Time from arrival to the first token",
                              names, buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.itl = Histogram("chipwise_inter_token_latency_seconds", "Time between successive streamed tokens",
                             names, buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("chipwise_e2e_request_latency_seconds", "Time from arrival to the last token",
                             names, buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.prompt_tokens = Counter("chipwise_prompt_tokens", "Prompt tokens prefilled", names,
                                     registry=r).labels(**labels)
        self.output_tokens = Counter("chipwise_generation_tokens", "Tokens generated", names,
                                     registry=r).labels(**labels)
        self.finished = Counter("chipwise_requests", "Requests ended, by why", [*names, "finish_reason"],
                                registry=r)
        self.rejected = Counter("chipwise_requests_rejected", "Requests refused, by HTTP status",
                                [*names, "status"], registry=r)
        stats = engine.stats
        gauge("chipwise_queue_depth", "Requests waiting for a slot", lambda: stats()["queued"])
        gauge("chipwise_slots_in_use", "Decode slots holding a request", lambda: stats()["slots_busy"])
        gauge("chipwise_slots", "Decode slots", lambda: stats()["slots"])
        gauge("chipwise_kv_cache_usage_ratio", "Share of the KV cache's token positions in use",
              lambda: stats()["kv_tokens"] / stats()["kv_capacity"])
        gauge("chipwise_output_tokens_per_second", "Tokens generated per second over the server's lifetime",
              lambda: self.output_tokens._value.get() / max(time.monotonic() - self.started, 1e-9))
        self._rates(pricing, names, labels)
        self.labels = labels

    def _rates(self, pricing, names, labels) -> None:
        """Dollars and kWh served so far, and per million output tokens; an unknown price or power stays unknown
        (no series, never a made-up zero); a power range gives a `bound="low"` and a `bound="high"` series."""
        if pricing is None:
            return
        info = Gauge("chipwise_serving_rates_info", "Where the price and power come from (value 1)",
                     [*names, "price_source", "power_source"], registry=self.registry)
        info.labels(**labels, price_source=pricing.price_source, power_source=pricing.power_source).set(1)
        series = []
        if pricing.price_per_chip_hour is not None:
            series.append(("usd", {}, pricing.price_per_chip_hour * pricing.chips))
        if pricing.power_watts_low is not None:
            for bound, watts in (("low", pricing.power_watts_low), ("high", pricing.power_watts_high)):
                series.append(("kwh", {"bound": bound}, watts * pricing.chips / 1000.0))
        gauges = {}
        for unit, extra, per_hour in series:
            for name, doc, read in (
                    (f"chipwise_serving_{unit}_total", f"{unit} spent serving: time served x {unit} per hour",
                     lambda per_hour=per_hour: per_hour * (time.monotonic() - self.started) / 3600.0),
                    (f"chipwise_{unit}_per_million_output_tokens", f"{unit} per million generated tokens so far",
                     lambda per_hour=per_hour: self._per_million(per_hour))):
                if name not in gauges:
                    gauges[name] = Gauge(name, doc, [*names, *extra], registry=self.registry)
                gauges[name].labels(**labels, **extra).set_function(read)

    def _per_million(self, rate_per_hour: float) -> float:
        tokens = self.output_tokens._value.get()
        spent = rate_per_hour * (time.monotonic() - self.started) / 3600.0
        return spent / tokens * 1e6 if tokens else float("nan")

    def request_done(self, arrival: float, token_times: list[float], prompt_tokens: int, output_tokens: int,
                     finish_reason: str) -> None:
        """One request ended; `token_times` are when each streamed piece of it was produced (perf_counter)."""
        if token_times:
            self.ttft.observe(token_times[0] - arrival)
            for a, b in zip(token_times, token_times[1:]):
                self.itl.observe(b - a)
            self.e2e.observe(token_times[-1] - arrival)
        self.prompt_tokens.inc(prompt_tokens)
        self.output_tokens.inc(output_tokens)
        self.finished.labels(**self.labels, finish_reason=finish_reason).inc()

    def reject(self, status: int) -> None:
        self.rejected.labels(**self.labels, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
