"""The serving planner (`chipwise plan --serve`, plan/serving.py): its physics, its choice of tensor parallelism, its
validation against published serving runs, its one-line errors, and energy as a range where power is one.
Pure Python: no JAX computation runs."""

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from chipwise import catalog
from chipwise.cli import main
from chipwise.errors import ConfigError
from chipwise.plan import assumptions as A
from chipwise.plan.serving import ServeRequest, allreduce_s, estimate, plan_serving, tensor_degrees
from chipwise.plan.serving_question import power_table, tables
from chipwise.plan.serving_validation import markdown_table, published_serving_runs, validate
from chipwise.plan.spec import load_model
from conftest import flat, one_line_error

DOCS = Path(__file__).parents[1] / "docs" / "planner.md"
LLAMA8B = load_model("llama3-8b")


def _one(acc_id="h100-sxm", chips=1, tensor=1, overrides=None, **kw):
    """One layout's estimate, the catalog optionally overridden."""
    req = ServeRequest(kw.pop("model", LLAMA8B), [acc_id], chips, kw.pop("input_len", 512), kw.pop("output_len", 256),
                       **{"batch": 1, **kw})
    return estimate(req, catalog.get(acc_id, catalog.load_catalog(overrides)), tensor)


# ------------------------------------------------------------------------------------------ the model's physics


def test_decode_at_batch_one_is_bound_by_memory_bandwidth():
    base = _one("h100-sxm")
    faster = _one("h100-sxm", overrides={"h100-sxm": {"hbm_tbps": 2 * 3.35}})
    assert faster.tpot_s / base.tpot_s == pytest.approx(0.5, abs=0.03)
    # while the prefill of a long prompt is bound by compute: bandwidth does not move it
    long_base, long_fast = (_one("h100-sxm", input_len=8192, overrides=o) for o in
                            (None, {"h100-sxm": {"hbm_tbps": 6.7}}))
    assert long_fast.ttft_s == pytest.approx(long_base.ttft_s, rel=0.02)


def test_tensor_parallelism_adds_per_layer_all_reduce_latency():
    trn2 = catalog.get("trn2")
    latencies = [allreduce_s(trn2, t, 2 * 4096) for t in (1, 2, 4, 16)]
    assert latencies[0] == 0 and latencies == sorted(latencies) and latencies[1] > 0
    base, per_step = A.ALLREDUCE_LATENCY_S["NeuronLink-v3"]
    assert latencies[3] == pytest.approx(base + 30 * per_step, rel=0.05)  # 2 (t - 1) ring steps, latency-bound
    one, four = _one("trn2", chips=4, tensor=1), _one("trn2", chips=4, tensor=4)
    assert one.parts["decode_comm_s"] == 0
    assert four.parts["decode_comm_s"] == pytest.approx(2 * LLAMA8B.num_layers * allreduce_s(trn2, 4, 4096 * 2))
    assert four.parts["decode_weights_s"] == pytest.approx(one.parts["decode_weights_s"] / 4)


def test_the_largest_batch_shrinks_as_the_context_grows():
    short, long = (_one("h100-sxm", input_len=n, output_len=256).max_batch for n in (1024, 8192))
    assert 0 < long < short
    assert long == pytest.approx(short * (1024 + 256) / (8192 + 256), rel=0.05)


def test_tensor_degrees_stay_in_the_fabric_and_split_heads():
    assert tensor_degrees(LLAMA8B, catalog.get("h100-sxm"), 16) == [1, 2, 4, 8]  # NVLink domain of 8
    assert tensor_degrees(LLAMA8B, catalog.get("graviton4"), 8) == [1]  # no chip-to-chip fabric
    assert tensor_degrees(load_model("llama2-7b"), catalog.get("inf2"), 12) == [1, 2, 4]  # 32 heads


def test_the_chosen_tensor_degree_follows_the_stated_rule():
    """Of the fitting degrees that meet the target, the most output tokens/s; llama3-70b needs TP >= 2 on H100."""
    req = ServeRequest(load_model("llama3-70b"), ["h100-sxm"], 8, 1024, 256, concurrency=8, max_tpot_s=0.03)
    (row,) = plan_serving(req)
    others = {t: why for t, why in row.considered}
    assert row.fits and row.meets_target and others[1] == "does not fit"
    acc = catalog.get("h100-sxm")
    for t in tensor_degrees(req.model, acc, 8):
        alt = estimate(req, acc, t)
        if alt.fits and alt.tpot_s <= 0.03:
            assert alt.output_tokens_per_s <= row.output_tokens_per_s * (1 + 1e-9)


def test_a_latency_target_alone_sets_the_concurrency():
    req = ServeRequest(LLAMA8B, ["h100-sxm"], 1, 512, 256, max_tpot_s=0.05)
    (row,) = plan_serving(req)
    assert row.tpot_s <= 0.05 and row.mode == "concurrency"
    assert estimate(req, catalog.get("h100-sxm"), 1, row.per_replica + 1).tpot_s > 0.05  # one more misses it


# ------------------------------------------------------------------------------------------ cost and energy


def test_cost_and_energy_per_million_output_tokens():
    row = _one("h100-sxm", concurrency=16, batch=None)
    hours_per_million = 1e6 / row.output_tokens_per_s / 3600
    assert row.usd_per_million_output_tokens() == pytest.approx(4.92 * hours_per_million)
    assert row.kwh_per_million_output_tokens() == pytest.approx((0.7 * hours_per_million,) * 2)
    ranged = _one("tpu-v7", concurrency=16, batch=None)
    low, high = ranged.kwh_per_million_output_tokens()
    assert low < high and high / low == pytest.approx(1000 / 600)
    d = ranged.as_dict()
    assert d["kwh_per_million_output_tokens"] is None and d["kwh_per_million_output_tokens_range"] == [low, high]
    assert d["power_basis"] == "estimated" and _one("tpu-v5p").kwh_per_million_output_tokens() is None


def test_training_energy_is_a_range_where_power_is_one():
    from chipwise.plan.planner import PlanRequest, plan

    rows = {r.accelerator.id: r for r in plan(PlanRequest(load_model("125m"), ["trn1", "h100-sxm"], 8, 1024, 16,
                                                          tokens=1e9, baseline="h100-sxm"))}
    trn1 = rows["trn1"].as_dict(rows["h100-sxm"])
    assert trn1["energy_kwh"] is None and trn1["tokens_per_kwh"] is None  # no invented midpoint
    low, high = trn1["energy_kwh_range"]
    assert low < high and high / low == pytest.approx(290 / 250)
    assert trn1["energy_kwh_range"] == pytest.approx([trn1["chip_hours"] * w / 1000 for w in (250, 290)])
    lo, hi = trn1["tokens_per_kwh_vs_baseline_range"]
    assert lo < hi and trn1["tokens_per_kwh_vs_baseline"] is None
    h100 = rows["h100-sxm"].as_dict(rows["h100-sxm"])  # a point figure: one number, as before
    assert h100["energy_kwh"] == pytest.approx(h100["chip_hours"] * 0.7) and h100["power_watts_per_chip"] == 700


# ------------------------------------------------------------------------------------------ validation


def test_validation_errors_come_from_the_published_yaml():
    runs = {r["id"]: r for r in published_serving_runs()}
    cases, medians = validate()
    assert [c.id for c in cases] == list(runs)
    for c in cases:
        assert runs[c.id]["source"].strip() and c.estimate.tensor == runs[c.id].get("tensor", 1)
        for metric, published in runs[c.id]["published"].items():
            assert c.error(metric) == pytest.approx(c.predicted(metric) / published - 1)
    counted = [c for c in cases if not c.loose]
    for metric in ("ttft_s", "tpot_s"):
        errors = [abs(c.predicted(metric) / runs[c.id]["published"][metric] - 1) for c in counted]
        assert len(errors) >= 5 and medians[metric] == pytest.approx(statistics.median(errors))
        assert medians[metric] <= 0.25  # the target


def test_docs_carry_the_generated_tables():
    text = DOCS.read_text()
    assert markdown_table(*validate()) in text
    assert tables() in text and power_table() in text


def test_every_fabric_in_the_catalog_has_an_all_reduce_latency():
    names = {a.fabric.name for a in catalog.load_catalog().values() if a.fabric.kind}
    assert names <= set(A.ALLREDUCE_LATENCY_S)
    assert set(A.SERVING) == set(catalog.PLATFORMS)


# ------------------------------------------------------------------------------------------ command line

SERVE = ["plan", "--serve", "--model", "llama3-8b", "--accelerator", "h100-sxm,inf2", "--chips", "2",
         "--input-len", "512", "--output-len", "128"]


def test_serve_json_has_every_field(capsys):
    assert main([*SERVE, "--concurrency", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    fields = ("accelerator chips tensor_parallel ttft_s tpot_s output_tokens_per_s output_tokens_per_s_per_chip "
              "max_batch memory_per_chip_gib fits usd_per_million_output_tokens kwh_per_million_output_tokens").split()
    assert {r["accelerator"] for r in rows} == {"h100-sxm", "inf2"}
    for r in rows:
        assert all(f in r for f in fields), [f for f in fields if f not in r]
        assert r["output_tokens_per_s_per_chip"] == pytest.approx(r["output_tokens_per_s"] / 2)
    inf2 = next(r for r in rows if r["accelerator"] == "inf2")
    assert inf2["kwh_per_million_output_tokens"] is None and len(inf2["kwh_per_million_output_tokens_range"]) == 2


def test_serve_table(capsys):
    assert main([*SERVE, "--batch", "4", "--weights-dtype", "fp8"]) == 0
    out = flat(capsys.readouterr().out)
    assert "MODELLED" in out and "h100-sxm" in out and "power 250-290 W (estimated)" in out
    assert re.search(r"inf2 .*\d-\d", out)  # inf2's energy printed as a range


@pytest.mark.parametrize("extra, message", [
    (["--batch", "100000"], "the KV cache of"),
    (["--batch", "2", "--concurrency", "2"], "not allowed with"),
    (["--batch", "1", "--accelerator", "h100"], "unknown accelerator id 'h100'"),
    (["--batch", "1", "--model", "llama3-405b"], "the model is larger than the chips' memory"),
    (["--batch", "1", "--seq-len", "2048"], "--seq-len belong to a training plan"),
    (["--batch", "0"], "--batch must be positive"),
    ([], "give --batch B"),
])
def test_serve_refuses_impossible_requests_in_one_line(extra, message, capsys):
    assert main([*SERVE, *extra]) == 2
    assert message in one_line_error(capsys)


def test_training_plan_needs_its_sizes_and_no_serving_flags(capsys):
    base = ["plan", "--model", "1b", "--accelerator", "h100-sxm", "--chips", "16"]
    assert main(base) == 2
    assert "needs --seq-len and --global-batch" in one_line_error(capsys)
    assert main([*base, "--seq-len", "2048", "--global-batch", "32", "--input-len", "5"]) == 2
    assert "--input-len plan serving: add --serve" in one_line_error(capsys)


def test_the_yaml_cases_are_the_reference_cases():
    ids = [r["id"] for r in yaml.safe_load((Path(__file__).parents[1] / "src/chipwise/plan/published_serving_runs.yaml")
                                           .read_text())["runs"]]
    assert ids == [f"S{i}" for i in range(1, 8)]
    with pytest.raises(ConfigError):
        plan_serving(ServeRequest(LLAMA8B, ["h100-sxm"], 1, 8, 8, batch=1, weights_dtype="int3"))
