"""The accelerator catalog: the one source of truth for peak FLOP/s, memory, fabric, power and price.

The figures live in ``accelerators.yaml`` next to this file, one entry per CHIP (not per JAX device),
each numeric figure with its source and the date it was read. The trainer's MFU and the planner both
read them from here; nothing else in chipwise hard-codes a peak or a chip's abilities.

    acc = find_by_device_kind(jax.devices()[0].device_kind)   # None: unknown chip, MFU unknown
    acc = get("trn2")                                          # by id; unknown id -> ConfigError
    peak = acc.peak_tflops_per_device("bf16")                  # chip peak / JAX devices per chip
    cat = load_catalog({"h100-sxm": {"price_per_chip_hour": 2.10}})   # negotiated price, validated

Units: TFLOP/s dense (no sparsity); HBM in GiB (2**30 bytes); HBM bandwidth in TB/s (10**12 B/s);
fabric and scale-out bandwidth in GB/s (10**9 B/s) per chip, fabric one-way (see the YAML header).

The dataclasses below are the schema: an entry is checked against their type hints (``X | None`` may be
null, a field with a default may be left out), so a new field is declared once, here.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import functools
import math
import re
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from chipwise.catalog.power import (POWER_BASES, POWER_FIGURES, PowerRange, apply_power_override, check_power,
                                    power_range)
from chipwise.config import check_typed_value
from chipwise.errors import ConfigError

__all__ = ["Accelerator", "Fabric", "LibtpuTopology", "PowerRange", "catalog_from_entries", "find_by_device_kind",
           "get", "load_catalog"]

PLATFORMS = ("cpu", "gpu", "tpu", "neuron")
# How the chips of a fabric domain are wired, as far as a collective's bandwidth cares (the planner's
# plan/assumptions.py FABRIC_EFFICIENCY has one figure per kind): every chip through a switch (NVSwitch,
# NeuronSwitch), a torus (TPU ICI, NeuronLink), or a ring.
FABRIC_KINDS = ("switched", "torus", "ring")
_DTYPES = {
    "bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "float8": "fp8", "fp32": "fp32", "float32": "fp32", "f32": "fp32",
}


@dataclass(frozen=True)
class Fabric:
    """The fast chip-to-chip fabric (NVLink, ICI, NeuronLink)."""

    name: str | None
    kind: str | None  # one of FABRIC_KINDS; null only where there is no chip-to-chip fabric (the CPU)
    gbps_per_chip: float | None  # GB/s per chip, one-way (each direction), all links summed
    topology: str | None  # for people; the planner reads `kind`
    domain_chips: int | None  # chips reachable over this fabric (NVLink node, TPU pod, UltraServer)


@dataclass(frozen=True)
class LibtpuTopology:
    """How libtpu names this TPU's slices: "<prefix>:AxB" for a 2D torus, "<prefix>:AxBxC" for a 3D one."""

    prefix: str  # e.g. "v5e"
    dims: int  # torus dimensions a slice name lists


@dataclass(frozen=True)
class Accelerator:
    """One chip. All figures are per CHIP unless the name says per device; None = not published."""

    id: str
    name: str
    vendor: str
    platform: str  # JAX platform string: cpu, gpu, tpu, neuron
    device_kinds: tuple[str, ...]  # regexes, full match, case-insensitive, on jax Device.device_kind
    devices_per_chip: int  # JAX devices per chip (trn1 2, trn2 4 at LNC=2, tpu-v7 2)
    bf16_tflops: float | None  # dense
    fp8_tflops: float | None  # dense
    fp32_tflops: float | None  # only where a source gives a true fp32 matmul peak
    hbm_gib: float | None
    hbm_tbps: float | None
    fabric: Fabric
    scaleout_gbps_per_chip: float | None  # data-centre network, GB/s per chip
    chips_per_instance: int | None
    power_watts: float | None  # a point figure; None where the catalog has a range or nothing (power_range())
    price_per_chip_hour: float | None  # USD, a default: a user's own price (override) wins
    sources: dict[str, dict[str, str]]  # field -> {"source": ..., "read": "YYYY-MM-DD"}; treat as read-only
    trains: bool = True  # False for an inference-only chip: the planner refuses to plan training on it
    libtpu_topology: LibtpuTopology | None = None  # how libtpu names this TPU's slices (plan --aot); None: unknown
    power_watts_low: float | None = None  # a range instead of power_watts, where no one figure is published
    power_watts_high: float | None = None
    power_basis: str | None = None  # one of POWER_BASES: how the power figure(s) were obtained
    power_unknown: str | None = None  # why no power figure is given (required then)
    cores: int | None = None  # CPUs: physical cores per chip (socket), the peaks' cores x FLOPs/cycle x clock
    clock_ghz: float | None = None  # CPUs: the clock those peaks are derived at
    notes: str = ""

    def power_range(self) -> PowerRange | None:
        """Watts per chip as (low, high, basis): equal ends for a point figure; None: not published."""
        return power_range({k: getattr(self, k) for k in (*POWER_FIGURES, "power_basis")})

    def peak_tflops_per_device(self, dtype: str = "bf16") -> float | None:
        """Dense peak TFLOP/s of ONE JAX device: the chip peak / devices_per_chip.

        dtype: "bf16" | "fp8" | "fp32" (numpy/JAX names such as "bfloat16", "float8_e4m3fn",
        "float32" are accepted). Returns None where the figure is not published: always on the CPU
        (the trainer measures its peak), fp8 on chips without it, and fp32 everywhere except the
        Neuron chips, whose docs give a real fp32 matmul peak. fp32 never falls back to the bf16
        peak: on GPUs an fp32 matmul may run as TF32 and on TPUs as several bf16 passes, so any
        such "peak" would be a guess.
        """
        name = str(dtype).lower()
        key = "fp8" if name.startswith("float8") else _DTYPES.get(name)
        if key is None:
            raise ConfigError(f"unknown dtype {dtype!r} for a peak; use one of bf16, fp8, fp32")
        chip = {"bf16": self.bf16_tflops, "fp8": self.fp8_tflops, "fp32": self.fp32_tflops}[key]
        return None if chip is None else chip / self.devices_per_chip

    def matches(self, device_kind: str) -> bool:
        """True if JAX's device_kind string is this chip (full, case-insensitive match)."""
        kind = device_kind.strip()
        return any(re.fullmatch(p, kind, re.IGNORECASE) for p in self.device_kinds)


# ---------------------------------------------------------------------------------------------
# Validation against the schema: the dataclasses' type hints


@functools.cache
def _schema(cls: type) -> dict[str, tuple[Any, bool]]:
    """Field name -> (the type a non-null value must have, whether it may be null): (X, True) for `X | None`."""
    schema = {}
    for name, hint in typing.get_type_hints(cls).items():
        others = [a for a in typing.get_args(hint) if a is not type(None)]
        schema[name] = (others[0], True) if len(others) < len(typing.get_args(hint)) else (hint, False)
    return schema


def _figures(cls: type = Accelerator, prefix: str = "") -> list[str]:
    """Every numeric field ("fabric.gbps_per_chip" for nested ones): each non-null one needs a source."""
    out = []
    for name, (tp, _) in _schema(cls).items():
        if dataclasses.is_dataclass(tp):
            out += _figures(tp, f"{prefix}{name}.")
        elif tp in (int, float):
            out.append(prefix + name)
    return out


_FIGURES = _figures()
_CHOICES = {"platform": PLATFORMS, "fabric.kind": FABRIC_KINDS, "power_basis": POWER_BASES}
# What a scalar of each type must be in the YAML, and how to fix one that is not.
_WANT = {
    str: ("a non-empty string", "quote it as text"),
    int: ("a whole number", "write a whole number or null"),
    float: ("a number", "write a number or null"),
    bool: ("true or false", "write true or false"),
}


def _fail(acc_id: str, field: str, problem: str, fix: str) -> ConfigError:
    msg = f"accelerator catalog: {acc_id}.{field}: {problem}; {fix}"
    return ConfigError(" ".join(msg.split()))  # always one line


def _check_section(acc_id: str, cls: type, values: Mapping, prefix: str = "") -> None:
    """One YAML mapping against the dataclass `cls`: no unknown fields, the required ones present, each typed."""
    schema = _schema(cls)
    for name in values:
        if name not in schema:
            what = prefix[:-1] or "catalog"
            raise _fail(acc_id, f"{prefix}{name}", f"is not a {what} field", f"use one of {', '.join(schema)}")
    for f in dataclasses.fields(cls):
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(acc_id, prefix + f.name, "is missing", "add it (write null if not published)")
    for name, value in values.items():
        _check_value(acc_id, prefix + name, value, *schema[name])


def _check_value(acc_id: str, key: str, value: Any, tp: Any, nullable: bool) -> None:
    if value is None:
        if not nullable:
            raise _fail(acc_id, key, "is null", "give a value (this field cannot be null)")
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _fail(acc_id, key, "must be a mapping", f"write {{{', '.join(_schema(tp))}}}")
        _check_section(acc_id, tp, value, key + ".")
    elif key == "device_kinds":
        _check_regexes(acc_id, value)
    elif key != "sources":  # sources are checked against the figures once the whole entry is known
        try:
            checked = check_typed_value(key, value, tp)
        except ConfigError:
            checked = None
        # The validator converts loose input ("3e-4" to a number, 2.0 to an int, 7 to text), as `--set` needs;
        # the catalog's YAML is typed, so a value it had to convert is a mistake. Only an int may stand for a float
        # (and is kept as written).
        as_is = type(checked) is type(value) or (tp is float and type(value) is int)
        if checked is None or not as_is or (tp is str and not value.strip()):
            want, fix = _WANT[tp]
            raise _fail(acc_id, key, f"must be {want}, got {value!r}", fix)
        if tp in (int, float) and not 0 < value < math.inf:  # NaN fails both; .inf is no figure either
            raise _fail(acc_id, key, f"must be positive and finite, got {value!r}",
                        "write a positive figure, or null if unknown")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise _fail(acc_id, key, f"is {value!r}", f"use one of {', '.join(_CHOICES[key])}")


def _check_regexes(acc_id: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise _fail(acc_id, "device_kinds", f"must be a list of regex strings, got {value!r}",
                    'write e.g. ["NVIDIA B200"]')
    for pattern in value:
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise _fail(acc_id, "device_kinds", f"regex {pattern!r} does not compile ({e})",
                        "fix the regular expression") from None
        if compiled.fullmatch(""):
            raise _fail(acc_id, "device_kinds", f"regex {pattern!r} matches the empty string",
                        "match only real device_kind strings")


def _check_sources(acc_id: str, entry: Mapping[str, Any]) -> None:
    sources = entry["sources"]
    if not isinstance(sources, Mapping):
        raise _fail(acc_id, "sources", "must be a mapping {field: {source, read}}",
                    "see accelerators.yaml for the form")
    for key, src in sources.items():
        if key not in _FIGURES:
            raise _fail(acc_id, f"sources.{key}", "names no numeric field", f"use one of {', '.join(_FIGURES)}")
        if not isinstance(src, Mapping) or not isinstance(src.get("source"), str) or not src["source"].strip():
            raise _fail(acc_id, f"sources.{key}", "needs a non-empty 'source' text",
                        'write {source: "...", read: "YYYY-MM-DD"}')
        try:
            _dt.date.fromisoformat(str(src.get("read")))  # str(): YAML reads an unquoted date as a date
        except ValueError:
            raise _fail(acc_id, f"sources.{key}.read", f"is not a date, got {src.get('read')!r}",
                        'write the date read as "YYYY-MM-DD"') from None
    for key in _FIGURES:
        section, _, name = key.rpartition(".")  # "fabric", "gbps_per_chip"; a top-level field has no section
        value = (entry.get(section) or {}).get(name) if section else entry.get(key)
        if value is not None and key not in sources:
            raise _fail(acc_id, key, f"figure {value!r} has no source",
                        f"add sources.{key}: {{source: ..., read: YYYY-MM-DD}}")


def _make(cls: type, values: Mapping) -> Any:
    """A validated mapping as the dataclass `cls`, nested sections included."""
    kwargs = {}
    for name, value in values.items():
        tp, _ = _schema(cls)[name]
        kwargs[name] = _make(tp, value) if value is not None and dataclasses.is_dataclass(tp) else value
    return cls(**kwargs)


def _build(entries: Any) -> dict[str, Accelerator]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError("accelerator catalog: 'accelerators' must be a non-empty list of entries; "
                          "see accelerators.yaml")
    catalog: dict[str, Accelerator] = {}
    for i, entry in enumerate(entries):
        acc_id = entry.get("id") if isinstance(entry, Mapping) else None
        if not isinstance(acc_id, str) or not acc_id:
            raise ConfigError(f"accelerator catalog: entry #{i} has no string 'id'; give every entry an id")
        _check_section(acc_id, Accelerator, entry)
        fabric = entry["fabric"]
        if fabric["gbps_per_chip"] is not None and fabric["kind"] is None:  # the planner would see no bandwidth
            raise _fail(acc_id, "fabric.kind", "is null but fabric.gbps_per_chip is given",
                        f"say how the chips are wired: one of {', '.join(FABRIC_KINDS)}")
        _check_sources(acc_id, entry)
        check_power(entry, lambda field, problem, fix: _fail(acc_id, field, problem, fix))
        if acc_id in catalog:
            raise _fail(acc_id, "id", "appears twice", "give every chip a unique id")
        sources = {k: {"source": v["source"], "read": str(v["read"])} for k, v in entry["sources"].items()}
        kinds = tuple(entry["device_kinds"])
        catalog[acc_id] = _make(Accelerator, {**entry, "device_kinds": kinds, "sources": sources})
    return catalog


# ---------------------------------------------------------------------------------------------
# Loading and overrides


@functools.lru_cache(maxsize=1)
def _default_entries() -> tuple[dict, ...]:
    text = resources.files(__name__).joinpath("accelerators.yaml").read_text()
    return tuple(yaml.safe_load(text)["accelerators"])


@functools.lru_cache(maxsize=1)
def _default_catalog() -> Mapping[str, Accelerator]:
    return MappingProxyType(_build(copy.deepcopy(list(_default_entries()))))


def _apply_overrides(entries: list[dict], overrides: Any, origin: str) -> None:
    """Merge {id: {field: value}} into the raw entries; _build then checks them like the shipped ones."""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"accelerator overrides ({origin}) must be a mapping {{id: {{field: value}}}}; "
                          "e.g. h100-sxm: {price_per_chip_hour: 2.1}")
    by_id = {e["id"]: e for e in entries}
    settable = [f for f in _schema(Accelerator) if f != "id"]
    today = _dt.date.today().isoformat()
    for acc_id, changes in overrides.items():
        if acc_id not in by_id:
            raise ConfigError(f"accelerator overrides ({origin}): unknown id {acc_id!r}; valid ids: {', '.join(by_id)}")
        if not isinstance(changes, Mapping):
            raise _fail(acc_id, "(override)", f"must be a mapping of field: value, got {changes!r}",
                        "write e.g. {price_per_chip_hour: 2.1}")
        entry = by_id[acc_id]
        for field, value in changes.items():
            if field not in settable:
                fix = "the id cannot be overridden" if field == "id" else f"use one of {', '.join(settable)}"
                raise _fail(acc_id, str(field), "is not a field an override can set", fix)
            if field == "sources":
                continue  # merged below, after the figures, so that a source the override names wins
            old = entry.get(field)
            merge = isinstance(value, Mapping) and isinstance(old, Mapping)  # a section: only the fields given change
            entry[field] = {**old, **value} if merge else value
            for key in [f"{field}.{sub}" for sub in value] if isinstance(value, Mapping) else [field]:
                if key in _FIGURES:
                    entry["sources"][key] = {"source": f"user override ({origin})", "read": today}
        apply_power_override(entry, changes)
        given = changes.get("sources", {})
        entry["sources"] = {**entry["sources"], **given} if isinstance(given, Mapping) else given


def load_catalog(overrides: Mapping | str | Path | None = None) -> dict[str, Accelerator]:
    """The catalog as {id: Accelerator}, validated; raises ConfigError naming the id and field.

    overrides: a YAML file path or a dict {id: {field: value}} (e.g. a negotiated price, measured
    power); the fields of a section nest ({"fabric": {"gbps_per_chip": 400}}) and only those given
    change. Overridden figures are validated like the shipped ones and sourced to the override.
    Unknown ids or fields raise ConfigError.
    """
    if overrides is None:
        return dict(_default_catalog())
    origin = "dict"
    if isinstance(overrides, (str, Path)):
        origin, what = str(overrides), f"accelerator overrides file {overrides}"
        try:
            overrides = yaml.safe_load(Path(overrides).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {what}: {e.strerror or e}; check the path") from None
        except yaml.YAMLError as e:
            raise ConfigError(" ".join(f"{what} is not valid YAML ({e}); fix the syntax".split())) from None
        if overrides is None:  # an empty file overrides nothing
            return dict(_default_catalog())
    entries = copy.deepcopy(list(_default_entries()))
    _apply_overrides(entries, overrides, origin)
    return _build(entries)


def catalog_from_entries(entries: list[dict]) -> dict[str, Accelerator]:
    """Validate and build a catalog from raw entries (the YAML's `accelerators` list); for tests and tools."""
    return _build(copy.deepcopy(entries))


def find_by_device_kind(device_kind: str, catalog: Mapping[str, Accelerator] | None = None) -> Accelerator | None:
    """The chip whose device_kinds fully match JAX's device_kind string, or None if none does.

    Never falls back to a similar chip: an unknown device means MFU is unknown (or measured).
    Two chips matching the same string is a catalog error and raises ConfigError.
    """
    if catalog is None:
        return _find_default(device_kind)
    hits = [acc for acc in catalog.values() if acc.matches(device_kind)]
    if len(hits) > 1:
        ids = ", ".join(a.id for a in hits)
        raise ConfigError(f"accelerator catalog: device_kind {device_kind!r} matches several chips ({ids}); "
                          "make their device_kinds regexes disjoint")
    return hits[0] if hits else None


@functools.lru_cache(maxsize=64)
def _find_default(device_kind: str) -> Accelerator | None:
    return find_by_device_kind(device_kind, _default_catalog())


def get(id: str, catalog: Mapping[str, Accelerator] | None = None) -> Accelerator:  # noqa: A002 (public API name)
    """The chip with this id; an unknown id raises ConfigError listing the valid ids."""
    cat = _default_catalog() if catalog is None else catalog
    try:
        return cat[id]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown accelerator id {id!r}; valid ids: {', '.join(cat)}") from None
