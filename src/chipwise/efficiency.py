"""Peaks, MFU, dollars and energy for the devices a run is on. Figures come from the catalog; nothing is guessed.

Every peak carries its provenance: the catalog entry it came from, a measurement made here, or the user's own
figure. A device the catalog does not know gets no peak (MFU unknown) unless one is measured or given, and is
never lent another chip's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from chipwise import catalog, cpu_peak
from chipwise.config import HardwareConfig
from chipwise.flops import CONVENTION
from chipwise.sharding import platform_rules


@dataclass(frozen=True)
class Peak:
    tflops_per_device: float | None
    source: str  # e.g. "catalog h100-sxm dense bf16", "measured here: fp32 matmul", "user-given", "unknown: ..."
    kind: str  # catalog | derived (a CPU's, from its instruction set) | measured | user | unknown

    def describe(self) -> str:
        if self.tflops_per_device is None:
            return self.source
        return f"{self.tflops_per_device:.4g} TFLOP/s per device ({self.source})"


@dataclass(frozen=True)
class Hardware:
    """What the run is on: the device kind, its catalog entry (if any), its peak, price and power."""
    platform: str
    device_kind: str
    num_devices: int
    devices_per_chip: int
    accelerator: catalog.Accelerator | None
    peak: Peak
    price_per_chip_hour: float | None
    price_source: str
    power_watts_per_chip: float | None  # one figure (the user's, or the catalog's where it has one)
    power_source: str
    # (low, high) watts: equal ends for one figure; the catalog's range where it publishes no one figure
    power_watts_range: tuple[float, float] | None = None

    @property
    def num_chips(self) -> float:
        return self.num_devices / self.devices_per_chip


def measure_matmul_tflops(dtype=jnp.float32, size: int = 1024, seconds: float = 0.6) -> float:
    """Best observed throughput of a square matmul on the default device (all of this process's CPU cores), in the
    form the train step's dots take there (dots.py: on CPUs a bf16 dot returns fp32, which reaches AMX)."""
    a = jnp.ones((size, size), dtype)
    result = platform_rules(jax.default_backend())["dot_result"] if jnp.dtype(dtype) == jnp.bfloat16 else None
    f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=result))
    f(a, a).block_until_ready()  # compile
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e12


def resolve_hardware(devices, compute_dtype, hw: HardwareConfig) -> Hardware:
    device = devices[0]
    kind = device.device_kind
    acc = catalog.find_by_device_kind(kind)
    # A CPU is one chip however many XLA devices it is split into (tests simulate 8 on one CPU), and each
    # process of a multi-process run has its own: its devices are the ones on this process's chip.
    if device.platform == "cpu":
        per_chip = sum(1 for d in devices if d.process_index == device.process_index)
    else:
        per_chip = acc.devices_per_chip if acc else 1
    dtype_name = jnp.dtype(compute_dtype).name
    if hw.peak_tflops is not None:
        peak = Peak(hw.peak_tflops, "user-given hardware.peak_tflops", "user")
    elif acc is not None and acc.peak_tflops_per_device("bf16") is not None:
        # MFU is quoted against the dense bf16 peak whatever the compute dtype (the usual convention).
        peak = Peak(acc.peak_tflops_per_device("bf16"), f"catalog {acc.id} dense bf16 peak", "catalog")
    elif device.platform == "cpu" and (derived := cpu_peak.detect()) is not None:
        # Against what the chip can do, as for accelerators; the framework's best matmul goes beside it.
        achievable = ""
        if hw.measure_peak:
            achievable = (f"; achievable here (measured): best {dtype_name} 1024^3 matmul, "
                          f"{measure_matmul_tflops(compute_dtype) * 1e3:.0f} GFLOP/s per chip")
        peak = Peak(derived.best.tflops / per_chip, derived.describe() + achievable, "derived")
    elif hw.measure_peak:
        whole = measure_matmul_tflops(compute_dtype)
        peak = Peak(whole / per_chip, f"measured here: best {dtype_name} 1024^3 matmul, "
                                      f"{whole * 1e3:.0f} GFLOP/s per chip", "measured")
    else:
        peak = Peak(None, f"unknown: device kind {kind!r} has no peak in the catalog "
                          f"(set hardware.peak_tflops or hardware.measure_peak)", "unknown")
    price, price_src = _pick(hw.price_per_hour, acc and acc.price_per_chip_hour, acc)
    power, power_src = _pick(hw.power_watts, acc and acc.power_watts, acc)
    watts = acc.power_range() if acc is not None and hw.power_watts is None else None
    if watts is not None and watts.basis not in ("official", "measured"):
        power_src = f"catalog {acc.id}, {watts.basis}" + ("" if watts.is_point else " range")
    span = (power, power) if power is not None else (watts.low, watts.high) if watts else None
    return Hardware(device.platform, kind, len(devices), per_chip, acc, peak, price, price_src, power, power_src, span)


def _pick(user_value, catalog_value, acc):
    if user_value is not None:
        return user_value, "config"
    if catalog_value is not None:
        return catalog_value, f"catalog {acc.id}"
    return None, "unknown"


def mfu(tflops_per_device: float, peak: Peak) -> float | None:
    return None if not peak.tflops_per_device else tflops_per_device / peak.tflops_per_device


def dollars_per_million_tokens(hw: Hardware, tokens_per_s: float) -> float | None:
    if hw.price_per_chip_hour is None or tokens_per_s <= 0:
        return None
    return hw.price_per_chip_hour * hw.num_chips / 3600.0 / tokens_per_s * 1e6


def kwh_per_million_tokens(hw: Hardware, tokens_per_s: float) -> float | None:
    """Energy at the chips' rated power (modelled: chips rarely draw exactly their rating)."""
    if hw.power_watts_per_chip is None or tokens_per_s <= 0:
        return None
    return hw.power_watts_per_chip * hw.num_chips / 1000.0 / 3600.0 / tokens_per_s * 1e6


def kwh_per_million_tokens_range(hw: Hardware, tokens_per_s: float) -> list[float] | None:
    """(low, high) energy at the chips' power, a range where the catalog gives the power as one."""
    if hw.power_watts_range is None or tokens_per_s <= 0:
        return None
    return [w * hw.num_chips / 1000.0 / 3600.0 / tokens_per_s * 1e6 for w in hw.power_watts_range]


def mfu_label(hw: Hardware) -> str:
    return f"measured throughput / {hw.peak.describe()}; FLOPs {CONVENTION}"


def peak_memory_bytes(devices) -> int | None:
    """Largest peak allocation over this process's devices, where the backend reports it (GPU, TPU; not CPU)."""
    peaks = []
    for d in devices:
        if d.process_index != jax.process_index():  # another host's device: only that host can ask
            continue
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without the API raise various errors
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None
