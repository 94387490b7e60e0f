"""A chip's power as the catalog knows it: a point figure, or a range where only estimates exist or sources
disagree, each labelled with how it was obtained. Energy computed from a range stays a range: a midpoint would be
a figure nobody published.

    watts = acc.power_range()            # PowerRange(low, high, basis) or None (then acc.power_unknown says why)
    watts.scale(chip_hours / 1000)       # kWh over that time, as a (low, high) pair
    format_range(4.1, 6.2, ".2f")        # "4.10-6.20"; equal ends print once: "4.10"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

# How a power figure was obtained: a vendor's own statement (a TDP or a datasheet maximum), a measurement (the
# vendor's or a third party's), an estimate (an analyst's, or derived from a vendor's ratio against a chip with a
# known figure; the source says how), or the user's own figure (an override).
POWER_BASES = ("official", "measured", "estimated", "user")
POWER_FIGURES = ("power_watts", "power_watts_low", "power_watts_high")


@dataclass(frozen=True)
class PowerRange:
    """Watts per chip, low to high (equal for a point figure), and how they were obtained."""

    low: float
    high: float
    basis: str

    @property
    def is_point(self) -> bool:
        return self.low == self.high

    def scale(self, factor: float) -> tuple[float, float]:
        """(low, high) of watts x factor: e.g. kWh = watts x hours / 1000."""
        return self.low * factor, self.high * factor

    def describe(self) -> str:
        return f"{format_range(self.low, self.high, ',.0f')} W ({self.basis})"


def power_range(values: Mapping[str, Any]) -> PowerRange | None:
    """The PowerRange of a validated entry (or Accelerator fields as a mapping); None where no figure is given."""
    point, low, high = (values.get(k) for k in POWER_FIGURES)
    if point is not None:
        return PowerRange(point, point, values.get("power_basis") or "official")
    if low is not None and high is not None:
        return PowerRange(low, high, values.get("power_basis") or "estimated")
    return None


def check_power(entry: Mapping[str, Any], fail: Callable[[str, str, str], Exception]) -> None:
    """The power rules the field types cannot say; `fail(field, problem, fix)` makes the one-line error.

    A point or a range, not both (a range is given exactly where no one point is published); both ends of a range,
    low below high; every figure labelled with its basis; no figure, then a reason.
    """
    point, low, high = (entry.get(k) for k in POWER_FIGURES)
    if (low is None) != (high is None):
        raise fail("power_watts_low", "and power_watts_high must be given together",
                   "give both ends of the range, or neither")
    if point is not None and low is not None:
        raise fail("power_watts", "is given with a range (power_watts_low/high)",
                   "give one point figure or a range, not both")
    if low is not None and not low < high:
        raise fail("power_watts_low", f"({low}) must be below power_watts_high ({high})",
                   "order the range low to high; a single figure goes in power_watts")
    basis = entry.get("power_basis")
    if basis is not None and basis not in POWER_BASES:
        raise fail("power_basis", f"is {basis!r}", f"use one of {', '.join(POWER_BASES)}")
    if (point is not None or low is not None) and basis is None:
        raise fail("power_basis", "is missing for a power figure", f"say how it was obtained: {', '.join(POWER_BASES)}")
    if point is None and low is None and not entry.get("power_unknown"):
        raise fail("power_unknown", "is missing and no power figure is given",
                   "give power_watts (or a range), or say in power_unknown why none is published")


def apply_power_override(entry: dict, changes: Mapping[str, Any]) -> None:
    """A user's power figure replaces the catalog's whole: the catalog's other form (point or range) and its reason
    for having none are cleared, and the basis is the user's unless the override names one."""
    if not any(k in changes for k in POWER_FIGURES):
        return
    for key in POWER_FIGURES:
        if key not in changes:
            entry[key] = None
            entry["sources"].pop(key, None)
    entry["power_unknown"] = changes.get("power_unknown")
    entry["power_basis"] = changes.get("power_basis", "user")


def format_range(low: float | None, high: float | None, spec: str, unknown: str = "n/a") -> str:
    """'low-high' in `spec`, or one figure where both ends print the same; `unknown` where there is none."""
    if low is None or high is None:
        return unknown
    a, b = format(low, spec), format(high, spec)
    return a if a == b else f"{a}-{b}"
