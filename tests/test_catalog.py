"""The accelerator catalog: ids, device-kind matching, per-device peaks, overrides, validation."""

import dataclasses
import pickle
from importlib import resources

import pytest
import yaml

from chipwise.catalog import catalog_from_entries, find_by_device_kind, get, load_catalog
from chipwise.errors import ConfigError

IDS = {"cpu", "a100-80g", "h100-sxm", "h200", "b200", "trn1", "trn2", "trn3", "inf2",
       "tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "tpu-v7", "xeon-8488c", "epyc-9r14", "graviton3", "graviton4"}

# device_kind strings real JAX installs report (plus near-misses that must not match a neighbour).
REAL_KINDS = [
    "cpu", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB",
    "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA B200",
    "NVIDIA GB200", "NVIDIA GH200 480GB", "TPU v2", "TPU v3", "TPU v4", "TPU v4 lite", "TPU v5 lite",
    "TPU v5", "TPU v5p", "TPU v6 lite", "TPU7x", "NC_v2", "NC_v3", "NC_v3d",
]


def _raw_entries():
    text = resources.files("chipwise.catalog").joinpath("accelerators.yaml").read_text()
    return yaml.safe_load(text)["accelerators"]


def _one_line_config_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_all_ids_present():
    assert set(load_catalog()) == IDS


@pytest.mark.parametrize("kind,expected", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 SXM5 80GB", "h100-sxm"),
    ("NVIDIA H100 PCIe", None),
    ("NVIDIA H100 NVL", None),
    ("NVIDIA A100-SXM4-80GB", "a100-80g"),
    ("NVIDIA A100-SXM4-40GB", None),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 NVL", None),
    ("NVIDIA B200", "b200"),
    ("NVIDIA GB200", None),
    ("TPU v4", "tpu-v4"),
    ("TPU v4 lite", None),
    ("TPU v5 lite", "tpu-v5e"),
    ("TPU v5", "tpu-v5p"),
    ("TPU v5p", "tpu-v5p"),
    ("TPU v6 lite", "tpu-v6e"),
    ("TPU7x", "tpu-v7"),
    ("NC_v2", "trn1"),
    ("NC_v3d", "trn2"),
    ("NC_v3", None),  # LNC=1: 8 devices per chip, would double the per-device peak
    ("cpu", "cpu"),
    ("some future chip", None),
    ("", None),
])
def test_find_by_device_kind(kind, expected):
    acc = find_by_device_kind(kind)
    assert (acc.id if acc else None) == expected


def test_no_two_chips_match_one_real_device_kind():
    cat = load_catalog()
    for kind in REAL_KINDS:
        hits = [a.id for a in cat.values() if a.matches(kind)]
        assert len(hits) <= 1, (kind, hits)


def test_overlapping_regexes_raise_instead_of_picking_one():
    entries = _raw_entries()
    h200 = next(e for e in entries if e["id"] == "h200")
    h200["device_kinds"] = ["NVIDIA H.*"]  # would also swallow every H100
    cat = catalog_from_entries(entries)
    with pytest.raises(ConfigError) as e:
        find_by_device_kind("NVIDIA H100 80GB HBM3", cat)
    _one_line_config_error(e, "h100-sxm", "h200")


def test_per_device_peaks():
    assert get("trn2").peak_tflops_per_device("bf16") == pytest.approx(667 / 4)
    assert get("tpu-v7").peak_tflops_per_device() == pytest.approx(2307 / 2)
    assert get("tpu-v7").peak_tflops_per_device("fp8") == pytest.approx(4614 / 2)
    assert get("trn1").peak_tflops_per_device("bfloat16") == pytest.approx(190 / 2)
    assert get("h100-sxm").peak_tflops_per_device("float8_e4m3fn") == pytest.approx(1979)
    assert get("cpu").peak_tflops_per_device() is None
    assert get("tpu-v6e").peak_tflops_per_device("fp8") is None
    # fp32 never silently reports the bf16 peak
    assert get("h100-sxm").peak_tflops_per_device("float32") is None
    assert get("trn2").peak_tflops_per_device("fp32") == pytest.approx(181 / 4)
    with pytest.raises(ConfigError):
        get("h100-sxm").peak_tflops_per_device("int4")


def test_gb_figures_converted_to_gib():
    assert get("h100-sxm").hbm_gib == pytest.approx(80e9 / 2**30, abs=0.01)
    assert get("h200").hbm_gib == pytest.approx(141e9 / 2**30, abs=0.01)
    assert get("tpu-v5e").hbm_gib == pytest.approx(16e9 / 2**30, abs=0.01)
    assert get("trn2").hbm_gib == 96  # the Neuron docs give GiB already
    assert get("h100-sxm").scaleout_gbps_per_chip == pytest.approx(3200 / 8 / 8)  # Gbps/instance -> GB/s/chip


def test_get_unknown_id_lists_valid_ids():
    with pytest.raises(ConfigError) as e:
        get("h100")
    _one_line_config_error(e, "h100-sxm", "trn2")


def test_override_changes_price_and_records_source(tmp_path):
    cat = load_catalog({"h100-sxm": {"price_per_chip_hour": 2.1, "fabric": {"domain_chips": 16}}})
    assert cat["h100-sxm"].price_per_chip_hour == 2.1
    assert cat["h100-sxm"].fabric.domain_chips == 16
    assert "override" in cat["h100-sxm"].sources["price_per_chip_hour"]["source"]
    assert cat["trn2"] == get("trn2")
    path = tmp_path / "prices.yaml"
    path.write_text("trn2:\n  price_per_chip_hour: 1.5\n  power_watts: 450\n")
    cat = load_catalog(path)
    assert (cat["trn2"].price_per_chip_hour, cat["trn2"].power_watts) == (1.5, 450)
    assert str(path) in cat["trn2"].sources["power_watts"]["source"]
    assert cat["trn2"].power_basis == "user"
    # the cached default catalog is untouched
    assert get("h100-sxm").price_per_chip_hour == 4.92 and get("trn2").power_watts == 500


@pytest.mark.parametrize("overrides,words", [
    ({"h100-sxm": {"price_per_chip_hour": -1}}, ["h100-sxm", "price_per_chip_hour", "positive"]),
    ({"h100-sxm": {"price_per_chip_hour": "cheap"}}, ["h100-sxm", "price_per_chip_hour"]),
    ({"h100-sxm": {"price_per_chip_hour": True}}, ["h100-sxm", "price_per_chip_hour"]),
    ({"h900": {"price_per_chip_hour": 1.0}}, ["h900", "h100-sxm"]),
    ({"h100-sxm": {"prize": 1.0}}, ["h100-sxm", "prize"]),
    ({"h100-sxm": {"fabric": {"gbps": 1.0}}}, ["h100-sxm", "fabric.gbps"]),
    ({"h100-sxm": {"id": "h101"}}, ["h100-sxm", "id"]),
    ({"h100-sxm": {"device_kinds": ["(unclosed"]}}, ["h100-sxm", "device_kinds"]),
    (["h100-sxm"], ["mapping"]),
])
def test_bad_overrides_raise_one_line_config_error(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_catalog(overrides)
    _one_line_config_error(e, *words)


def test_override_file_errors(tmp_path):
    with pytest.raises(ConfigError):
        load_catalog(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trn2: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_catalog(bad)
    _one_line_config_error(e, "bad.yaml")


def _broken(acc_id, mutate):
    entries = _raw_entries()
    mutate(next(e for e in entries if e["id"] == acc_id))
    return entries


@pytest.mark.parametrize("acc_id,mutate,words", [
    ("trn2", lambda e: e["sources"].pop("bf16_tflops"), ["trn2", "bf16_tflops", "source"]),
    ("b200", lambda e: e["sources"].pop("fabric.gbps_per_chip"), ["b200", "fabric.gbps_per_chip"]),
    ("h200", lambda e: e["sources"]["hbm_tbps"].update(read="yesterday"), ["h200", "hbm_tbps"]),
    ("h200", lambda e: e["sources"].update(hbm_tb={"source": "x", "read": "2026-11-26"}), ["h200", "hbm_tb"]),
    ("h100-sxm", lambda e: e.update(device_kinds=["NVIDIA H100 ("]), ["h100-sxm", "device_kinds"]),
    ("h100-sxm", lambda e: e.update(device_kinds=[".*"]), ["h100-sxm", "device_kinds"]),
    ("tpu-v4", lambda e: e.pop("hbm_gib"), ["tpu-v4", "hbm_gib", "missing"]),
    ("tpu-v4", lambda e: e.update(bf16_tflops="275"), ["tpu-v4", "bf16_tflops"]),
    ("tpu-v4", lambda e: e.update(devices_per_chip=0), ["tpu-v4", "devices_per_chip"]),
    ("tpu-v4", lambda e: e.update(platform="TPU"), ["tpu-v4", "platform"]),
    ("tpu-v4", lambda e: e.update(peak=1), ["tpu-v4", "peak"]),
    ("trn1", lambda e: e.update(id="trn2"), ["trn2", "id"]),
])
def test_broken_catalog_raises_config_error(acc_id, mutate, words):
    with pytest.raises(ConfigError) as e:
        catalog_from_entries(_broken(acc_id, mutate))
    _one_line_config_error(e, *words)


def test_shipped_file_sources_every_figure_with_a_read_date():
    numeric = ["devices_per_chip", "bf16_tflops", "fp8_tflops", "fp32_tflops", "hbm_gib", "hbm_tbps",
               "scaleout_gbps_per_chip", "chips_per_instance", "power_watts", "price_per_chip_hour"]
    for e in _raw_entries():
        figures = {k: e[k] for k in numeric}
        figures.update({f"fabric.{k}": v for k, v in e["fabric"].items() if isinstance(v, (int, float))})
        for key, value in figures.items():
            if value is None:
                continue
            src = e["sources"].get(key)
            assert src and src["source"].strip(), (e["id"], key)
            # the catalog was read on 2026-11-26; power figures and the CPU entries on 2026-12-01
            assert str(src["read"]) in ("2026-11-26", "2026-12-01"), (e["id"], key)


def test_cpu_has_no_published_figures():
    cpu = get("cpu")
    assert (cpu.bf16_tflops, cpu.fp8_tflops, cpu.power_watts, cpu.price_per_chip_hour) == (None,) * 4


def test_load_is_cached_and_returns_a_fresh_dict():
    a, b = load_catalog(), load_catalog()
    assert a is not b and a["trn2"] is b["trn2"]
    a.pop("trn2")
    assert "trn2" in load_catalog()
    # copies and pickles (asdict deep-copies; multiprocessing pickles)
    assert dataclasses.asdict(get("trn2"))["sources"]["bf16_tflops"]["read"] == "2026-11-26"
    assert pickle.loads(pickle.dumps(get("trn2"))) == get("trn2")


# ------------------------------------------------------------------------------------------ fields the code reads


def test_the_schema_is_the_dataclasses():
    """Every dataclass field is in every shipped entry unless it has a default; the planner has an efficiency for
    every fabric kind."""
    from chipwise.catalog import FABRIC_KINDS, Accelerator, Fabric
    from chipwise.plan.assumptions import FABRIC_EFFICIENCY

    optional = {"trains", "libtpu_topology", "notes", "power_watts_low", "power_watts_high", "power_basis",
                "power_unknown", "cores", "clock_ghz"}
    for e in _raw_entries():
        assert {f.name for f in dataclasses.fields(Accelerator)} - optional <= set(e), e["id"]
        assert set(e["fabric"]) == {f.name for f in dataclasses.fields(Fabric)}, e["id"]
    assert set(FABRIC_EFFICIENCY) == set(FABRIC_KINDS)


def test_new_fields_in_the_shipped_catalog():
    cat = load_catalog()
    assert [a.id for a in cat.values() if not a.trains] == ["inf2"]
    assert {a.id: (a.libtpu_topology.prefix, a.libtpu_topology.dims) for a in cat.values() if a.libtpu_topology} == {
        "tpu-v4": ("v4", 3), "tpu-v5e": ("v5e", 2), "tpu-v5p": ("v5p", 3), "tpu-v6e": ("v6e", 2)}
    kinds = {a.id: a.fabric.kind for a in cat.values()}
    assert kinds["cpu"] is None and kinds["inf2"] == "ring" and kinds["trn3"] == "switched"
    assert {kinds[i] for i in ("a100-80g", "h100-sxm", "h200", "b200")} == {"switched"}
    assert {kinds[i] for i in ("tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "tpu-v7", "trn1", "trn2")} == {"torus"}


def test_fields_with_defaults_may_be_left_out():
    entries = _raw_entries()
    v5e = next(e for e in entries if e["id"] == "tpu-v5e")
    del v5e["libtpu_topology"], v5e["sources"]["libtpu_topology.dims"], v5e["notes"]
    acc = catalog_from_entries(entries)["tpu-v5e"]
    assert (acc.trains, acc.libtpu_topology, acc.notes) == (True, None, "")


@pytest.mark.parametrize("acc_id,mutate,words", [
    ("h100-sxm", lambda e: e["fabric"].update(kind="nvswitch"), ["h100-sxm", "fabric.kind", "switched, torus, ring"]),
    ("h100-sxm", lambda e: e["fabric"].update(kind=None), ["h100-sxm", "fabric.kind", "gbps_per_chip"]),
    ("h100-sxm", lambda e: e["fabric"].pop("kind"), ["h100-sxm", "fabric.kind", "missing"]),
    ("h100-sxm", lambda e: e.update(trains="no"), ["h100-sxm", "trains", "true or false"]),
    ("h100-sxm", lambda e: e.update(trains=None), ["h100-sxm", "trains", "null"]),
    ("tpu-v5e", lambda e: e["libtpu_topology"].update(dims=0), ["tpu-v5e", "libtpu_topology.dims", "positive"]),
    ("tpu-v5e", lambda e: e["libtpu_topology"].pop("prefix"), ["tpu-v5e", "libtpu_topology.prefix", "missing"]),
    ("tpu-v5e", lambda e: e["libtpu_topology"].update(rows=4), ["tpu-v5e", "libtpu_topology.rows", "dims"]),
    ("tpu-v5e", lambda e: e.update(libtpu_topology="v5e"), ["tpu-v5e", "libtpu_topology", "mapping"]),
    ("tpu-v5e", lambda e: e["sources"].pop("libtpu_topology.dims"), ["tpu-v5e", "libtpu_topology.dims", "source"]),
    # the shared validator converts loose `--set` input; the typed YAML must already be right
    ("tpu-v4", lambda e: e.update(devices_per_chip=1.0), ["tpu-v4", "devices_per_chip", "whole number"]),
    ("tpu-v4", lambda e: e.update(name=4), ["tpu-v4", "name", "string"]),
    ("tpu-v4", lambda e: e.update(notes=""), ["tpu-v4", "notes", "non-empty"]),
    ("tpu-v4", lambda e: e.update(fabric=None), ["tpu-v4", "fabric", "null"]),
])
def test_broken_new_fields_raise_config_error(acc_id, mutate, words):
    with pytest.raises(ConfigError) as e:
        catalog_from_entries(_broken(acc_id, mutate))
    _one_line_config_error(e, *words)


def test_override_sets_nested_sections_and_sources():
    cat = load_catalog({"tpu-v7": {"libtpu_topology": {"prefix": "tpu7x", "dims": 3}},
                        "h100-sxm": {"sources": {"power_watts": {"source": "measured", "read": "2026-11-30"}},
                                     "power_watts": 650, "trains": False}})
    v7 = cat["tpu-v7"]
    assert (v7.libtpu_topology.prefix, v7.libtpu_topology.dims) == ("tpu7x", 3)
    assert "override" in v7.sources["libtpu_topology.dims"]["source"]
    h100 = cat["h100-sxm"]
    assert (h100.power_watts, h100.trains) == (650, False)
    assert h100.sources["power_watts"]["source"] == "measured"  # the override's own source wins, whatever the order
    with pytest.raises(ConfigError) as e:
        load_catalog({"tpu-v7": {"libtpu_topology": {"dims": 3}}})
    _one_line_config_error(e, "tpu-v7", "libtpu_topology.prefix", "missing")


def test_a_non_finite_figure_is_refused():
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="h100-sxm.price_per_chip_hour: must be positive and finite"):
            load_catalog({"h100-sxm": {"price_per_chip_hour": bad}})


# ------------------------------------------------------------------------------------------ power: a point or a range


def test_every_chip_has_power_or_says_why_not():
    """A point figure or an ordered range, each with its basis and sources; otherwise a reason, never a silent gap."""
    from chipwise.catalog.power import POWER_BASES

    for acc in load_catalog().values():
        watts = acc.power_range()
        if watts is None:
            assert acc.power_unknown and len(acc.power_unknown) > 20, acc.id
            continue
        assert 0 < watts.low <= watts.high and watts.basis in POWER_BASES, acc.id
        assert (acc.power_watts is None) != (acc.power_watts_low is None), acc.id  # one form, not both
        for key in ("power_watts", "power_watts_low", "power_watts_high"):
            if getattr(acc, key) is not None:
                assert acc.sources[key]["source"].strip(), (acc.id, key)
    labels = {a.id: a.power_range() and a.power_range().basis for a in load_catalog().values()}
    assert {labels[i] for i in ("a100-80g", "h100-sxm", "h200", "b200")} == {"official"}
    assert labels["tpu-v4"] == "measured"
    assert {labels[i] for i in ("tpu-v5e", "tpu-v6e", "tpu-v7", "trn1", "trn2", "inf2")} == {"estimated"}
    # where only estimates that disagree exist, the catalog keeps both ends: energy becomes a range
    assert get("tpu-v7").power_range().is_point is False and get("h100-sxm").power_range().is_point


@pytest.mark.parametrize("acc_id,mutate,words", [
    ("tpu-v7", lambda e: e.update(power_watts_low=1200), ["tpu-v7", "power_watts_low", "below"]),
    ("tpu-v7", lambda e: e.update(power_watts_high=None), ["tpu-v7", "power_watts_low", "together"]),
    ("tpu-v7", lambda e: (e.update(power_watts=800), e["sources"].update(power_watts=e["sources"]["power_watts_low"])),
     ["tpu-v7", "power_watts", "range"]),
    ("h100-sxm", lambda e: e.pop("power_basis"), ["h100-sxm", "power_basis", "missing"]),
    ("h100-sxm", lambda e: e.update(power_basis="rumour"), ["h100-sxm", "power_basis", "official"]),
    ("tpu-v5p", lambda e: e.pop("power_unknown"), ["tpu-v5p", "power_unknown", "why"]),
    ("tpu-v7", lambda e: e["sources"].pop("power_watts_high"), ["tpu-v7", "power_watts_high", "source"]),
])
def test_broken_power_raises_one_line_config_error(acc_id, mutate, words):
    with pytest.raises(ConfigError) as e:
        catalog_from_entries(_broken(acc_id, mutate))
    _one_line_config_error(e, *words)


def test_a_users_power_figure_replaces_a_catalog_range():
    cat = load_catalog({"tpu-v7": {"power_watts": 850}, "tpu-v5p": {"power_watts_low": 300, "power_watts_high": 400}})
    v7, v5p = cat["tpu-v7"].power_range(), cat["tpu-v5p"].power_range()
    assert (v7.low, v7.high, v7.basis) == (850, 850, "user") and cat["tpu-v7"].power_watts_low is None
    assert (v5p.low, v5p.high) == (300, 400) and cat["tpu-v5p"].power_unknown is None
    assert "power_watts_low" not in cat["tpu-v7"].sources


def test_cpu_peaks_are_cores_times_the_isa_rate_times_the_clock():
    """The CPU entries' peaks follow from cpu_peak.py's per-cycle figures (the one home for them), except Genoa's,
    whose AVX-512 units are half as wide as the rule assumes (its source says so)."""
    from chipwise import cpu_peak

    rates = {"xeon-8488c": ("AMX-BF16", "AVX-512"), "graviton3": ("0xd40", "0xd40"), "graviton4": ("0xd4f", "0xd4f")}
    x86 = {r["isa"]: r["flops_per_cycle"] for r in cpu_peak.X86_RULES}
    for acc_id, (bf16, fp32) in rates.items():
        acc = get(acc_id)
        arm = cpu_peak.ARM_CORES.get(bf16)
        per_cycle = (arm[2], arm[1]) if arm else (x86[bf16], x86[fp32])
        for peak, rate in zip((acc.bf16_tflops, acc.fp32_tflops), per_cycle):
            assert peak == pytest.approx(acc.cores * rate * acc.clock_ghz / 1e3, rel=0.01), acc_id
    genoa = get("epyc-9r14")
    assert genoa.bf16_tflops == pytest.approx(genoa.cores * x86["AVX512-BF16"] / 2 * genoa.clock_ghz / 1e3, rel=0.01)
    assert all(get(i).platform == "cpu" and get(i).device_kinds == () for i in rates)
