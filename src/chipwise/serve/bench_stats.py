"""The statistics and the report of `chipwise bench-serve` (bench.py sends the requests).

Field names follow vLLM's `bench serve` results wherever the meaning is the same (completed, failed,
total_input_tokens, request_throughput, mean_ttft_ms, p99_itl_ms, request_goodput, ...), so results from either
tool can be compared or fed to the same scripts. Definitions, as there:

- TTFT: from sending the request to the first streamed chunk that carries text.
- ITL: the gaps between successive text chunks (a chunk that bundles several tokens is one gap).
- TPOT per request: (end-to-end latency - TTFT) / (output tokens - 1), for requests with more than one token.
- E2EL: from sending the request to the end of its stream.
- Goodput: completed requests that met every given SLO, per second of the benchmark (a one-token request's TPOT
  counts as 0).

Cost and energy per million output tokens divide the serving chips' price and rated power by the measured output
throughput: the price is a catalog figure or the user's, the energy is modelled (chips rarely draw exactly their
rating), never measured here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from chipwise.errors import ChipwiseError
from chipwise.serve.pricing import Pricing

SLO_METRICS = ("ttft", "tpot", "e2el")  # what --goodput may bound, in milliseconds
LATENCY_METRICS = (("ttft", "TTFT", "time to first token"), ("tpot", "TPOT", "time per output token, excl. 1st"),
                   ("itl", "ITL", "inter-token latency"), ("e2el", "E2EL", "end-to-end latency"))
PERCENTILES = (90, 99)


@dataclass
class RequestOutput:
    """One request as the client saw it; times in seconds (time.perf_counter)."""

    prompt_len: int  # tokens under the benchmark's tokenizer
    success: bool = False
    error: str = ""
    unreachable: bool = False  # the connection itself failed: no server answered
    start: float = 0.0  # when the request was sent (after waiting for a --max-concurrency slot)
    ttft: float = 0.0
    latency: float = 0.0  # end-to-end
    itl: list[float] = field(default_factory=list)
    usage_tokens: int | None = None  # completion_tokens from the server's usage, when it sent one
    text: str = ""


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        try:
            ms = float(value) if sep else math.nan
        except ValueError:
            ms = math.nan
        if name not in SLO_METRICS or not ms >= 0 or math.isinf(ms):
            raise ChipwiseError(f"--goodput {pair!r}: write NAME:MILLISECONDS with NAME one of "
                                f"{', '.join(SLO_METRICS)}, e.g. --goodput ttft:500 tpot:50")
        slos[name] = ms
    return slos


def _summary(prefix: str, seconds: list[float]) -> dict[str, float | None]:
    """mean/median/std/p90/p99 in milliseconds; None where nothing was measured (vLLM writes 0 there)."""
    import numpy as np

    keys = ["mean", "median", "std"] + [f"p{p}" for p in PERCENTILES]
    if not seconds:
        return {f"{k}_{prefix}_ms": None for k in keys}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    values = [ms.mean(), np.median(ms), ms.std()] + [np.percentile(ms, p) for p in PERCENTILES]
    return {f"{k}_{prefix}_ms": float(v) for k, v in zip(keys, values)}


def output_token_counts(outputs: list[RequestOutput], count_tokens) -> list[int]:
    """Each completed request's output tokens: the server's usage figure, else its text under the tokenizer."""
    return [o.usage_tokens if o.usage_tokens is not None else count_tokens(o.text) for o in outputs if o.success]


def compute_metrics(outputs: list[RequestOutput], duration: float, count_tokens,
                    slos: dict[str, float]) -> dict:
    """The measured figures, under vLLM's result names. `count_tokens(text) -> int` counts a response's tokens
    when the server sent no usage."""
    done = [o for o in outputs if o.success]
    out_lens = output_token_counts(outputs, count_tokens)
    ttfts = [o.ttft for o in done]
    e2els = [o.latency for o in done]
    # TPOT needs two tokens; for goodput a one-token request's TPOT is 0, so a TPOT SLO cannot fail it.
    tpot_all = [(o.latency - o.ttft) / (n - 1) if n > 1 else 0.0 for o, n in zip(done, out_lens)]
    tpots = [t for t, n in zip(tpot_all, out_lens) if n > 1]
    itls = [gap for o in done for gap in o.itl]
    total_in, total_out = sum(o.prompt_len for o in done), sum(out_lens)
    good = None
    if slos:
        per_request = {"ttft": ttfts, "tpot": tpot_all, "e2el": e2els}
        good = sum(all(per_request[name][i] * 1000.0 <= limit for name, limit in slos.items())
                   for i in range(len(done)))
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    metrics = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(done)),
        "request_goodput": None if good is None else per_s(good),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
        "max_concurrent_requests": _peak_concurrency(done),
    }
    for name, seconds in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        metrics.update(_summary(name, seconds))
    return metrics


def _peak_concurrency(done: list[RequestOutput]) -> int:
    """The most requests in flight at once (a sweep over [start, end) intervals; an end sorts before a start)."""
    events = sorted([(o.start, 1) for o in done] + [(o.start + o.latency, -1) for o in done])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


# ---- cost and energy ----------------------------------------------------------------------------------------


def cost_fields(pricing: Pricing | None, output_throughput: float | None) -> dict:
    """Dollars and kWh per million output tokens at the measured output throughput (None where unknown). Energy
    from a power range stays a range (the single-figure fields are None then: a midpoint nobody published)."""
    if pricing is None:
        return {}
    rate = output_throughput if output_throughput and output_throughput > 0 else None
    dollars = kwh = None
    if rate and pricing.price_per_chip_hour is not None:
        dollars = pricing.price_per_chip_hour * pricing.chips / 3600.0 / rate * 1e6
    if rate and pricing.power_watts_low is not None:
        kwh = [w * pricing.chips / 1000.0 / 3600.0 / rate * 1e6
               for w in (pricing.power_watts_low, pricing.power_watts_high)]
    point = pricing.power_watts_low == pricing.power_watts_high
    watts = None if pricing.power_watts_low is None else [pricing.power_watts_low, pricing.power_watts_high]
    return {"accelerator": pricing.accelerator, "chips": pricing.chips,
            "price_per_chip_hour": pricing.price_per_chip_hour, "price_source": pricing.price_source,
            "power_watts_per_chip": watts[0] if watts and point else None, "power_watts_per_chip_range": watts,
            "power_source": pricing.power_source, "dollars_per_million_output_tokens": dollars,
            "kwh_per_million_output_tokens": kwh[0] if kwh and point else None,
            "kwh_per_million_output_tokens_range": kwh}


# ---- the human report ---------------------------------------------------------------------------------------


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def _span(pair: list[float], spec: str) -> str:
    """"low-high", or one figure where both ends print the same."""
    low, high = (format(v, spec) for v in pair)
    return low if low == high else f"{low}-{high}"


def report_lines(result: dict) -> list[str]:
    """The result as aligned text: figure, value, and what the value rests on."""
    rows: list[tuple[str, str, str]] = []

    def row(label, value, basis="measured", digits=2):
        rows.append((label, _fmt(value, digits), basis))

    rate = result["request_rate"]
    lines = [f"chipwise bench-serve: {result['num_prompts']} prompts to {result['url']}{result['endpoint']} "
             f"(model {result['model_id']})",
             f"  {result['input_len']} input tokens (under {result['tokenizer_id']}) and {result['output_len']} "
             f"output tokens per request; request rate {rate}"
             f"{' (Poisson arrivals)' if rate != 'inf' else ' (all at once)'}; "
             f"max concurrency {result['max_concurrency'] or 'unbounded'}", ""]
    row("Successful requests", result["completed"])
    row("Failed requests", result["failed"])
    row("Benchmark duration (s)", result["duration"])
    row("Total input tokens", result["total_input_tokens"], "counted by the client's tokenizer")
    row("Total output tokens", result["total_output_tokens"], result["output_tokens_counted_by"])
    row("Request throughput (req/s)", result["request_throughput"])
    if result["request_goodput"] is not None:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in result["goodput_slos_ms"].items())
        row("Request goodput (req/s)", result["request_goodput"], f"measured; SLOs {slos}")
    row("Output token throughput (tok/s)", result["output_throughput"])
    row("Total token throughput (tok/s)", result["total_token_throughput"])
    row("Peak concurrent requests", result["max_concurrent_requests"])
    for key, short, _ in LATENCY_METRICS:
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {short} (ms)", result[f"{stat}_{key}_ms"])
    if "price_source" in result:
        chips = f"{result['chips']} chip{'s' if result['chips'] != 1 else ''}"
        price = result["price_per_chip_hour"]
        basis = (f"${price:g}/chip-hour x {chips} ({result['price_source']}) / measured output throughput"
                 if price is not None else result["price_source"])
        row("Cost per 1M output tokens ($)", result["dollars_per_million_output_tokens"], basis, 4)
        watts, kwh = result["power_watts_per_chip_range"], result["kwh_per_million_output_tokens_range"]
        basis = (f"{_span(watts, 'g')} W x {chips} ({result['power_source']}; energy modelled at that draw) / "
                 f"measured output throughput" if watts else f"energy {result['power_source']}")
        rows.append(("Energy per 1M output tokens (kWh)", _span(kwh, ",.4f") if kwh else "n/a", basis))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines += [f"{label:<{width}}  {value:>{vwidth}}  {basis}" for label, value, basis in rows]
    return lines
