"""What the serving chips cost and draw, and where each figure comes from: one home for `chipwise serve`'s cost
and energy metrics and `chipwise bench-serve`'s dollars and kWh per million output tokens. The user's figures win
over the catalog's (as in training's efficiency report); a chip the catalog does not know has no figures."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pricing:
    """What the serving chips cost and draw, and where each figure came from (for the report)."""

    chips: int
    accelerator: str | None
    price_per_chip_hour: float | None
    price_source: str  # "--price-per-hour", "catalog h100-sxm", or why it is unknown
    power_watts_low: float | None  # per chip; equal ends for one figure, a range where the catalog has only that
    power_watts_high: float | None
    power_source: str


def _catalog_power(acc) -> tuple[float, float, str] | None:
    """(low, high, basis) watts per chip, or None where the catalog has no figure (then acc.power_unknown says why);
    equal ends for a point figure."""
    found = acc.power_range()
    return None if found is None else (found.low, found.high, found.basis)


def resolve_pricing(accelerator: str | None, chips: int, price_per_hour: float | None,
                    power_watts: float | None, chip_catalog=None) -> Pricing | None:
    """The user's figures win over the catalog's (as in training's efficiency report); None: nothing was given."""
    if accelerator is None and price_per_hour is None and power_watts is None:
        return None
    acc = None
    if accelerator is not None:
        from chipwise import catalog

        acc = catalog.get(accelerator, chip_catalog)
    if price_per_hour is not None:
        price, price_src = price_per_hour, "--price-per-hour"
    elif acc is not None and acc.price_per_chip_hour is not None:
        price, price_src = acc.price_per_chip_hour, f"catalog {acc.id}"
    else:
        price = None
        price_src = (f"unknown: catalog {acc.id} has no price; give --price-per-hour" if acc
                     else "unknown: give --accelerator or --price-per-hour")
    watts = _catalog_power(acc) if acc is not None and power_watts is None else None
    if power_watts is not None:
        low = high = power_watts
        power_src = "--power-watts"
    elif watts is not None:
        low, high, basis = watts
        power_src = f"catalog {acc.id}, {basis}"
    else:
        low = high = None
        why = acc.power_unknown if acc is not None else None
        power_src = ("unknown: give --accelerator or --power-watts" if acc is None else
                     f"unknown: catalog {acc.id} has no power figure{f' ({why})' if why else ''}; give --power-watts")
    return Pricing(chips, acc.id if acc else None, price, price_src, low, high, power_src)
