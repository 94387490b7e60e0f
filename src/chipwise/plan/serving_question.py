"""The seed's question, put to the serving planner: what does a million output tokens of Llama-3-8B cost, in dollars
and kWh, at a stated latency target, on x86 and Graviton CPUs, Inferentia2, Trainium2, an NVIDIA GPU and TPUs?

`python -m chipwise.plan.serving_question` prints the tables docs/planner.md carries (a test checks they agree);
each is `chipwise plan --serve` with the command shown above it.
"""

from __future__ import annotations

from chipwise.catalog.power import format_range
from chipwise.plan.serving import ServeRequest, plan_serving
from chipwise.plan.spec import load_model

ACCELERATORS = ["xeon-8488c", "epyc-9r14", "graviton3", "graviton4", "inf2", "trn2", "h100-sxm", "tpu-v5e", "tpu-v6e"]
# A chat-sized request, 8 chips of each kind (8 sockets = 8 CPU instances), every chip serving at the most
# concurrency whose time per output token stays within 100 ms (about 10 tokens/s a user, faster than reading).
SETTING = dict(model="llama3-8b", chips=8, input_len=512, output_len=256, max_tpot_ms=100)
DTYPES = ("bf16", "int8")


def command(dtype: str) -> str:
    s = SETTING
    return (f"chipwise plan --serve --model {s['model']} --accelerator {','.join(ACCELERATORS)} --chips {s['chips']} "
            f"--input-len {s['input_len']} --output-len {s['output_len']} --max-tpot-ms {s['max_tpot_ms']} "
            f"--weights-dtype {dtype} --json")


def question_table(dtype: str) -> str:
    s = SETTING
    req = ServeRequest(load_model(s["model"]), ACCELERATORS, s["chips"], s["input_len"], s["output_len"],
                       weights_dtype=dtype, max_tpot_s=s["max_tpot_ms"] / 1e3)
    rows = ["| accelerator | TP | sequences in flight | TTFT ms | TPOT ms | output tok/s per chip "
            "| $ per M output tokens | kWh per M output tokens | power basis |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(plan_serving(req), key=lambda r: r.usd_per_million_output_tokens() or float("inf")):
        usd, kwh = r.usd_per_million_output_tokens(), r.kwh_per_million_output_tokens()
        watts = r.accelerator.power_range()
        rows.append(f"| {r.accelerator.id} | {r.tensor} | {r.sequences:,} | {r.ttft_s * 1e3:,.0f} "
                    f"| {r.tpot_s * 1e3:.0f} | {r.output_tokens_per_s / r.chips:,.0f} "
                    f"| {'n/a' if usd is None else f'{usd:.3f}'} | {format_range(*(kwh or (None, None)), '.3f')} "
                    f"| {watts.describe() if watts else 'unknown (no published figure)'} |")
    return "\n".join(rows)


def tables() -> str:
    return "\n\n".join(f"`{command(d)}`\n\n{question_table(d)}" for d in DTYPES)


def power_table() -> str:
    """Every catalog chip's power as the energy figures use it: the figure or range, its basis, or why none."""
    from chipwise import catalog

    rows = ["| chip | watts | basis | source, or why there is none |", "|---|---:|---|---|"]
    for acc in catalog.load_catalog().values():
        watts = acc.power_range()
        if watts is None:
            rows.append(f"| {acc.id} | - | - | {acc.power_unknown} |")
            continue
        keys = ("power_watts",) if acc.power_watts is not None else ("power_watts_low", "power_watts_high")
        why = " / ".join(acc.sources[k]["source"] for k in keys)
        rows.append(f"| {acc.id} | {format_range(watts.low, watts.high, ',.0f')} | {watts.basis} | {why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(tables() + "\n\n" + power_table())
