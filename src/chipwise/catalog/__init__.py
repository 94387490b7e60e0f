"""The accelerator catalog: the one source of truth for peak FLOP/s, memory, fabric, power and price.

The figures live in ``accelerators.yaml`` next to this file, one entry per CHIP (not per JAX device),
each numeric figure with its source and the date it was read. The trainer's MFU and the planner both
read them from here; nothing else in chipwise hard-codes a peak.

    acc = find_by_device_kind(jax.devices()[0].device_kind)   # None: unknown chip, MFU unknown
    acc = get("trn2")                                          # by id; unknown id -> ConfigError
    peak = acc.peak_tflops_per_device("bf16")                  # chip peak / JAX devices per chip
    cat = load_catalog({"h100-sxm": {"price_per_chip_hour": 2.10}})   # negotiated price, validated

Units: TFLOP/s dense (no sparsity); HBM in GiB (2**30 bytes); HBM bandwidth in TB/s (10**12 B/s);
fabric and scale-out bandwidth in GB/s (10**9 B/s) per chip, fabric one-way (see the YAML header).
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from chipwise.errors import ConfigError

__all__ = ["Accelerator", "Fabric", "catalog_from_entries", "find_by_device_kind", "get", "load_catalog"]

PLATFORMS = ("cpu", "gpu", "tpu", "neuron")

# Field schema: name -> (kind, nullable). "number" is int or float > 0, "int" an int > 0.
# Every non-null "number"/"int" figure needs an entry in `sources` (fabric ones as "fabric.<name>").
_FIELDS: dict[str, tuple[str, bool]] = {
    "id": ("str", False),
    "name": ("str", False),
    "vendor": ("str", False),
    "platform": ("str", False),
    "device_kinds": ("regex_list", False),
    "devices_per_chip": ("int", False),
    "bf16_tflops": ("number", True),
    "fp8_tflops": ("number", True),
    "fp32_tflops": ("number", True),
    "hbm_gib": ("number", True),
    "hbm_tbps": ("number", True),
    "fabric": ("fabric", False),
    "scaleout_gbps_per_chip": ("number", True),
    "chips_per_instance": ("int", True),
    "power_watts": ("number", True),
    "price_per_chip_hour": ("number", True),
    "sources": ("sources", False),
    "notes": ("str", True),
}
_OPTIONAL = {"notes"}
_FABRIC_FIELDS: dict[str, tuple[str, bool]] = {
    "name": ("str", True),
    "gbps_per_chip": ("number", True),
    "topology": ("str", True),
    "domain_chips": ("int", True),
}
_NUMERIC = [f for f, (k, _) in _FIELDS.items() if k in ("number", "int")] + [
    f"fabric.{f}" for f, (k, _) in _FABRIC_FIELDS.items() if k in ("number", "int")
]
_DTYPES = {
    "bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "float8": "fp8", "fp32": "fp32", "float32": "fp32", "f32": "fp32",
}


@dataclass(frozen=True)
class Fabric:
    """The fast chip-to-chip fabric (NVLink, ICI, NeuronLink)."""

    name: str | None
    gbps_per_chip: float | None  # GB/s per chip, one-way (each direction), all links summed
    topology: str | None
    domain_chips: int | None  # chips reachable over this fabric (NVLink node, TPU pod, UltraServer)


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
    power_watts: float | None
    price_per_chip_hour: float | None  # USD, a default: a user's own price (override) wins
    sources: dict[str, dict[str, str]]  # field -> {"source": ..., "read": "YYYY-MM-DD"}; treat as read-only
    notes: str = ""

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
# Validation


def _fail(acc_id: str, field: str, problem: str, fix: str) -> ConfigError:
    msg = f"accelerator catalog: {acc_id}.{field}: {problem}; {fix}"
    return ConfigError(" ".join(msg.split()))  # always one line


def _check_value(acc_id: str, field: str, value: Any, kind: str, nullable: bool) -> None:
    if value is None:
        if not nullable:
            raise _fail(acc_id, field, "is null", "give a value (this field cannot be null)")
        return
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise _fail(acc_id, field, f"must be a non-empty string, got {value!r}", "quote it as text")
    elif kind in ("number", "int"):
        ok_type = (int,) if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type):
            want = "a whole number" if kind == "int" else "a number"
            raise _fail(acc_id, field, f"must be {want}, got {value!r}", f"write {want} or null")
        if not value > 0:
            raise _fail(
                acc_id, field,
                f"must be positive, got {value!r}",
                "write a positive figure, or null if unknown",
            )


def _check_regexes(acc_id: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise _fail(
            acc_id, "device_kinds",
            f"must be a list of regex strings, got {value!r}",
            'write e.g. ["NVIDIA B200"]',
        )
    for pattern in value:
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise _fail(
                acc_id, "device_kinds",
                f"regex {pattern!r} does not compile ({e})",
                "fix the regular expression",
            ) from None
        if compiled.fullmatch(""):
            raise _fail(
                acc_id, "device_kinds",
                f"regex {pattern!r} matches the empty string",
                "match only real device_kind strings",
            )


def _check_sources(acc_id: str, entry: Mapping[str, Any]) -> None:
    sources = entry["sources"]
    if not isinstance(sources, Mapping):
        raise _fail(
            acc_id, "sources",
            "must be a mapping {field: {source, read}}",
            "see accelerators.yaml for the form",
        )
    for key, src in sources.items():
        if key not in _NUMERIC:
            raise _fail(acc_id, f"sources.{key}", "names no numeric field", f"use one of {', '.join(_NUMERIC)}")
        if not isinstance(src, Mapping) or not isinstance(src.get("source"), str) or not src["source"].strip():
            raise _fail(
                acc_id, f"sources.{key}",
                "needs a non-empty 'source' text",
                'write {source: "...", read: "YYYY-MM-DD"}',
            )
        read = src.get("read")
        if not isinstance(read, _dt.date):
            try:
                _dt.date.fromisoformat(str(read))
            except ValueError:
                raise _fail(
                    acc_id, f"sources.{key}.read",
                    f"is not a date, got {read!r}",
                    'write the date read as "YYYY-MM-DD"',
                ) from None
    fabric = entry["fabric"]
    for key in _NUMERIC:
        value = fabric.get(key[7:]) if key.startswith("fabric.") else entry.get(key)
        if value is not None and key not in sources:
            raise _fail(
                acc_id, key,
                f"figure {value!r} has no source",
                f"add sources.{key}: {{source: ..., read: YYYY-MM-DD}}",
            )


def _validate_entry(entry: Any, index: int) -> None:
    acc_id = entry.get("id") if isinstance(entry, Mapping) else None
    if not isinstance(acc_id, str) or not acc_id:
        raise ConfigError(f"accelerator catalog: entry #{index} has no string 'id'; give every entry an id")
    for field in entry:
        if field not in _FIELDS:
            raise _fail(acc_id, field, "is not a catalog field", f"use one of {', '.join(_FIELDS)}")
    for field, (kind, nullable) in _FIELDS.items():
        if field not in entry:
            if field in _OPTIONAL:
                continue
            raise _fail(acc_id, field, "is missing", "add it (write null if not published)")
        value = entry[field]
        if kind == "regex_list":
            _check_regexes(acc_id, value)
        elif kind == "fabric":
            if not isinstance(value, Mapping):
                raise _fail(
                    acc_id, "fabric",
                    "must be a mapping",
                    "write {name, gbps_per_chip, topology, domain_chips}",
                )
            for sub in value:
                if sub not in _FABRIC_FIELDS:
                    raise _fail(
                        acc_id, f"fabric.{sub}",
                        "is not a fabric field",
                        f"use one of {', '.join(_FABRIC_FIELDS)}",
                    )
            for sub, (sub_kind, sub_null) in _FABRIC_FIELDS.items():
                if sub not in value:
                    raise _fail(acc_id, f"fabric.{sub}", "is missing", "add it (write null if not published)")
                _check_value(acc_id, f"fabric.{sub}", value[sub], sub_kind, sub_null)
        elif kind != "sources":
            _check_value(acc_id, field, value, kind, nullable)
    if entry["platform"] not in PLATFORMS:
        raise _fail(acc_id, "platform", f"is {entry['platform']!r}", f"use one of {', '.join(PLATFORMS)}")
    _check_sources(acc_id, entry)


def _build(entries: Any) -> dict[str, Accelerator]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            "accelerator catalog: 'accelerators' must be a non-empty list of entries; see accelerators.yaml"
        )
    catalog: dict[str, Accelerator] = {}
    for i, entry in enumerate(entries):
        _validate_entry(entry, i)
        if entry["id"] in catalog:
            raise _fail(entry["id"], "id", "appears twice", "give every chip a unique id")
        fields = {k: v for k, v in entry.items() if k not in ("fabric", "sources", "device_kinds")}
        sources = {k: {"source": v["source"], "read": str(v["read"])} for k, v in entry["sources"].items()}
        catalog[entry["id"]] = Accelerator(
            **fields,
            device_kinds=tuple(entry["device_kinds"]),
            fabric=Fabric(**entry["fabric"]),
            sources=sources,
        )
    return catalog


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def _read_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}; check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(" ".join(f"{what} {path} is not valid YAML ({e}); fix the syntax".split())) from None


@functools.lru_cache(maxsize=1)
def _default_entries() -> tuple[dict, ...]:
    text = resources.files(__name__).joinpath("accelerators.yaml").read_text()
    data = yaml.safe_load(text)
    return tuple(data["accelerators"])


@functools.lru_cache(maxsize=1)
def _default_catalog() -> Mapping[str, Accelerator]:
    return MappingProxyType(_build(copy.deepcopy(list(_default_entries()))))


def _apply_overrides(entries: list[dict], overrides: Any, origin: str) -> None:
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            f"accelerator overrides ({origin}) must be a mapping {{id: {{field: value}}}}; "
            "e.g. h100-sxm: {price_per_chip_hour: 2.1}"
        )
    by_id = {e["id"]: e for e in entries}
    today = _dt.date.today().isoformat()
    for acc_id, changes in overrides.items():
        if acc_id not in by_id:
            raise ConfigError(f"accelerator overrides ({origin}): unknown id {acc_id!r}; valid ids: {', '.join(by_id)}")
        if not isinstance(changes, Mapping):
            raise _fail(
                acc_id, "(override)",
                f"must be a mapping of field: value, got {changes!r}",
                "write e.g. {price_per_chip_hour: 2.1}",
            )
        entry = by_id[acc_id]
        for field, value in changes.items():
            if field not in _FIELDS or field == "id":
                settable = ", ".join(f for f in _FIELDS if f != "id")
                fix = "the id cannot be overridden" if field == "id" else f"use one of {settable}"
                raise _fail(acc_id, str(field), "is not a field an override can set", fix)
            if field == "fabric":
                if not isinstance(value, Mapping):
                    raise _fail(
                        acc_id, "fabric",
                        "override must be a mapping",
                        "write e.g. {fabric: {gbps_per_chip: 400}}",
                    )
                for sub, sub_value in value.items():
                    if sub not in _FABRIC_FIELDS:
                        raise _fail(
                            acc_id, f"fabric.{sub}",
                            "is not a fabric field",
                            f"use one of {', '.join(_FABRIC_FIELDS)}",
                        )
                    entry["fabric"][sub] = sub_value
                    _note_override_source(entry, f"fabric.{sub}", changes, origin, today)
            elif field == "sources":
                if not isinstance(value, Mapping):
                    raise _fail(
                        acc_id, "sources",
                        "override must be a mapping",
                        "write {field: {source: ..., read: YYYY-MM-DD}}",
                    )
                entry["sources"].update(value)
            else:
                entry[field] = value
                _note_override_source(entry, field, changes, origin, today)


def _note_override_source(entry: dict, key: str, changes: Mapping, origin: str, today: str) -> None:
    """An overridden figure is sourced to the override unless the override names its own source."""
    given = changes.get("sources")
    if key in _NUMERIC and not (isinstance(given, Mapping) and key in given):
        entry["sources"][key] = {"source": f"user override ({origin})", "read": today}


def load_catalog(overrides: Mapping | str | Path | None = None) -> dict[str, Accelerator]:
    """The catalog as {id: Accelerator}, validated; raises ConfigError naming the id and field.

    overrides: a YAML file path or a dict {id: {field: value}} (e.g. a negotiated price, measured
    power); fabric fields nest ({"fabric": {"gbps_per_chip": 400}}). Overridden figures are validated
    like the shipped ones and sourced to the override. Unknown ids or fields raise ConfigError.
    """
    if overrides is None:
        return dict(_default_catalog())
    origin = "dict"
    if isinstance(overrides, (str, Path)):
        origin = str(overrides)
        overrides = _read_yaml(Path(overrides), "accelerator overrides file")
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
        raise ConfigError(
            f"accelerator catalog: device_kind {device_kind!r} matches several chips ({ids}); "
            "make their device_kinds regexes disjoint"
        )
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
