"""A CPU's peak from its instruction set: cores x FLOPs per cycle per core x clock, per dtype.

MFU on a CPU used to be quoted against the framework's own best matmul, a figure of the software, not the chip:
on an Intel Xeon with AMX that put a step at "MFU 87%" while the matrix units sat idle. This module reads what the
CPU can do (/proc/cpuinfo's flags on x86, the core type on Arm) and derives its peak; efficiency.py quotes MFU
against the best dtype's peak (as for accelerators, whose MFU is against dense bf16) and shows the framework's
measured matmul beside it as "achievable here". Facts per instruction set are data, with where they come from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# x86: per core per cycle, the first rule whose flags the CPU has gives each dtype's peak.
X86_RULES = (
    # Intel AMX: a TMUL tile multiply of bf16 is 1,024 FLOPs per cycle per core (Intel's AMX figures: 2,048 int8
    # ops, 1,024 bf16 FLOPs per cycle per core, Sapphire Rapids and later).
    dict(isa="AMX-BF16", flags=("amx_bf16", "amx_tile"), dtype="bfloat16", flops_per_cycle=1024),
    # AVX512-BF16: VDPBF16PS, 16 fp32 lanes x 2 bf16 products (4 FLOPs a lane) on 2 FMA ports.
    dict(isa="AVX512-BF16", flags=("avx512_bf16",), dtype="bfloat16", flops_per_cycle=128),
    # AVX-512: 2 FMA ports x 16 fp32 lanes x 2 FLOPs (server Xeons and Zen 5 EPYC; a part with one port has half).
    dict(isa="AVX-512", flags=("avx512f",), dtype="float32", flops_per_cycle=64),
    # AVX2 + FMA: 2 FMA ports x 8 fp32 lanes x 2 FLOPs.
    dict(isa="AVX2+FMA", flags=("avx2", "fma"), dtype="float32", flops_per_cycle=32),
)
# x86 cores that run 512-bit instructions on 256-bit units, two halves each, so the AVX-512 rules above give them
# twice what they reach: (vendor_id, cpu family) -> the core's name. AMD's Zen 4 (family 19h with AVX-512:
# Genoa, Bergamo, Siena, Ryzen 7000) has 256-bit FP pipes (AMD's Software Optimization Guide for family 19h);
# Zen 5 server and desktop parts (family 1Ah) have 512-bit ones.
HALF_WIDTH_AVX512 = {("AuthenticAMD", "25"): "Zen 4"}

# Arm Neoverse cores by /proc/cpuinfo "CPU part": (name, fp32 FLOPs/cycle, bf16 FLOPs/cycle or None). fp32 is the
# number of 128-bit FMA pipes x 4 lanes x 2 (Arm's Neoverse software optimisation guides); bf16 is BFDOT on the same
# pipes (2 products a lane, 2x fp32), where the core has the BF16 extension.
ARM_CORES = {
    "0xd0c": ("Neoverse N1 (Graviton2)", 16, None),
    "0xd40": ("Neoverse V1 (Graviton3)", 32, 64),
    "0xd49": ("Neoverse N2", 16, 32),
    "0xd4f": ("Neoverse V2 (Graviton4)", 32, 64),
}


@dataclass(frozen=True)
class DtypePeak:
    dtype: str
    isa: str
    flops_per_cycle: int
    tflops: float


@dataclass(frozen=True)
class CpuPeak:
    cores: int
    ghz: float
    peaks: tuple[DtypePeak, ...]  # best first

    @property
    def best(self) -> DtypePeak:
        return self.peaks[0]

    def describe(self) -> str:
        best = self.best
        others = "".join(f"; {p.dtype}: {p.flops_per_cycle:,} FLOPs/cycle ({p.isa}), {p.tflops:.3g} TFLOP/s"
                         for p in self.peaks[1:])
        return (f"derived from the instruction set: {self.cores} cores x {best.flops_per_cycle:,} {best.dtype} "
                f"FLOPs/cycle ({best.isa}) x {self.ghz:.2f} GHz = {best.tflops:.3g} TFLOP/s{others}")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _first(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text, re.M)
    return found.group(1).strip() if found else None


def clock_ghz(cpuinfo: str) -> float | None:
    """The highest clock the OS reports: cpufreq's maximum where there is one, else /proc/cpuinfo's "cpu MHz" (on
    VMs the nominal clock; turbo may run above it)."""
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(max_freq.read_text()) / 1e6
    except (OSError, ValueError):
        pass
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
    return max(mhz) / 1e3 if mhz and max(mhz) > 0 else None


def physical_cores(cpuinfo: str) -> int:
    """Cores this process may use, not hardware threads: two threads of one core share its vector units."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    siblings, cores = _first(r"^siblings\s*:\s*(\d+)", cpuinfo), _first(r"^cpu cores\s*:\s*(\d+)", cpuinfo)
    threads_per_core = int(siblings) // int(cores) if siblings and cores and int(cores) else 1
    return max(1, logical // max(1, threads_per_core))


def flops_per_cycle(cpuinfo: str) -> dict[str, tuple[str, int]]:
    """{dtype: (instruction set, FLOPs per cycle per core)} for what this CPU has; empty if nothing is known."""
    flags = set((_first(r"^(?:flags|Features)\s*:\s*(.*)$", cpuinfo) or "").split())
    found: dict[str, tuple[str, int]] = {}
    half = HALF_WIDTH_AVX512.get((_first(r"^vendor_id\s*:\s*(\S+)", cpuinfo), _first(r"^cpu family\s*:\s*(\d+)",
                                                                                      cpuinfo)))
    for rule in X86_RULES:
        if set(rule["flags"]) <= flags and rule["dtype"] not in found:
            if half and rule["isa"].startswith(("AVX-512", "AVX512")):
                found[rule["dtype"]] = (f"{rule['isa']} on {half}'s 256-bit units", rule["flops_per_cycle"] // 2)
            else:
                found[rule["dtype"]] = (rule["isa"], rule["flops_per_cycle"])
    part = _first(r"^CPU part\s*:\s*(\S+)", cpuinfo)
    if part in ARM_CORES:
        name, fp32, bf16 = ARM_CORES[part]
        found["float32"] = (f"{name}, NEON/SVE FMA", fp32)
        if bf16 and "bf16" in flags:
            found["bfloat16"] = (f"{name}, BFDOT", bf16)
    if "bfloat16" in found and "float32" in found and found["bfloat16"][1] < found["float32"][1]:
        del found["bfloat16"]  # never quote a bf16 peak below the fp32 one the same units reach
    return found


def detect(cpuinfo: str | None = None, cores: int | None = None, ghz: float | None = None) -> CpuPeak | None:
    """This CPU's derived peak, or None where its instruction set or clock is not known (never a guess)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    units = flops_per_cycle(text)
    ghz = ghz or clock_ghz(text)
    if not units or not ghz:
        return None
    cores = cores or physical_cores(text)
    peaks = [DtypePeak(dtype, isa, per_cycle, cores * per_cycle * ghz / 1e3)
             for dtype, (isa, per_cycle) in units.items()]
    return CpuPeak(cores, ghz, tuple(sorted(peaks, key=lambda p: -p.tflops)))
