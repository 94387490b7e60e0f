"""A CPU's peak derived from its instruction set (cpu_peak.py), and MFU quoted against it with the measured matmul
beside it (efficiency.py)."""

import jax
import jax.numpy as jnp
import pytest

from chipwise import cpu_peak, efficiency
from chipwise.config import HardwareConfig

SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
cpu MHz\t\t: 2400.000
siblings\t: 4
cpu cores\t: 2
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC_ZEN3 = """processor\t: 0
model name\t: AMD EPYC 7R13 Processor
cpu MHz\t\t: 2650.000
flags\t\t: fpu sse2 avx fma avx2 sha_ni
"""
EPYC_ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512bw avx512_bf16
"""
EPYC_ZEN5 = EPYC_ZEN4.replace("cpu family\t: 25", "cpu family\t: 26").replace("9R14 96-Core", "9R45")
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 sve bf16 i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_amx_xeon_peaks_per_dtype():
    peak = cpu_peak.detect(SAPPHIRE_RAPIDS, cores=2)
    assert peak.ghz == pytest.approx(2.4)
    by_dtype = {p.dtype: p for p in peak.peaks}
    assert by_dtype["bfloat16"].isa == "AMX-BF16" and by_dtype["float32"].isa == "AVX-512"
    assert by_dtype["bfloat16"].tflops == pytest.approx(2 * 1024 * 2.4e9 / 1e12)
    assert by_dtype["float32"].tflops == pytest.approx(2 * 64 * 2.4e9 / 1e12)
    assert peak.best.dtype == "bfloat16" and "AMX-BF16" in peak.describe() and "AVX-512" in peak.describe()


def test_avx2_epyc_and_graviton3():
    epyc = cpu_peak.detect(EPYC_ZEN3, cores=4)
    assert [(p.dtype, p.isa) for p in epyc.peaks] == [("float32", "AVX2+FMA")]
    assert epyc.best.tflops == pytest.approx(4 * 32 * 2.65e9 / 1e12)
    graviton = cpu_peak.detect(GRAVITON3, cores=4, ghz=2.6)  # Arm's /proc/cpuinfo gives no clock
    assert {p.dtype: p.flops_per_cycle for p in graviton.peaks} == {"bfloat16": 64, "float32": 32}
    assert "Graviton3" in graviton.describe()


def test_unknown_instruction_set_or_clock_derives_nothing():
    assert cpu_peak.detect("processor\t: 0\nflags\t\t: fpu sse2\ncpu MHz\t\t: 2000.0\n") is None
    assert cpu_peak.detect(GRAVITON3, cores=4) is None  # no clock: no guess


def test_hardware_threads_are_not_counted_as_cores():
    logical = cpu_peak.physical_cores("") * 1  # without siblings / cpu cores: every logical CPU
    assert cpu_peak.physical_cores(SAPPHIRE_RAPIDS) == max(1, logical // 2)  # 2 threads a core


def test_this_machine_names_the_instruction_set_it_found(monkeypatch):
    flags = set((cpu_peak._first(r"^(?:flags|Features)\s*:\s*(.*)$", cpu_peak._cpuinfo()) or "").split())
    peak = cpu_peak.detect()
    if flags & {"avx2", "avx512f", "asimd"} and cpu_peak.clock_ghz(cpu_peak._cpuinfo()):
        assert peak is not None and peak.best.isa in peak.describe()
    hw = efficiency.resolve_hardware(jax.devices()[:1], jnp.float32, HardwareConfig())
    if peak is not None:
        assert hw.peak.kind == "derived" and "derived from the instruction set" in hw.peak.source
        assert "achievable here (measured): best float32" in hw.peak.source
        assert hw.peak.tflops_per_device == pytest.approx(peak.best.tflops / len(jax.devices()[:1]))
    # Where nothing is known, the measured matmul is the peak, labelled so.
    monkeypatch.setattr(cpu_peak, "detect", lambda: None)
    hw = efficiency.resolve_hardware(jax.devices()[:1], jnp.float32, HardwareConfig())
    assert hw.peak.kind == "measured" and "measured here" in hw.peak.source
    assert 1e-4 < hw.peak.tflops_per_device < 100  # some GFLOP/s to a few TFLOP/s: a real CPU figure
    assert "6N+causal" in efficiency.mfu_label(hw)


def test_zen4_runs_avx512_on_256_bit_units_and_zen5_does_not():
    zen4 = {p.dtype: p for p in cpu_peak.detect(EPYC_ZEN4, cores=2).peaks}
    assert (zen4["float32"].flops_per_cycle, zen4["bfloat16"].flops_per_cycle) == (32, 64)
    assert zen4["float32"].isa == "AVX-512 on Zen 4's 256-bit units"
    assert zen4["float32"].tflops == pytest.approx(2 * 32 * 2.6e9 / 1e12)
    zen5 = {p.dtype: p for p in cpu_peak.detect(EPYC_ZEN5, cores=2).peaks}
    assert (zen5["float32"].flops_per_cycle, zen5["bfloat16"].flops_per_cycle) == (64, 128)
    assert zen5["float32"].isa == "AVX-512"
    intel = {p.dtype: p.flops_per_cycle for p in cpu_peak.detect(SAPPHIRE_RAPIDS, cores=2).peaks}
    assert intel == {"bfloat16": 1024, "float32": 64}  # no vendor_id: the full width


def test_the_catalogs_genoa_socket_is_what_cpu_peak_derives():
    """The catalog's EPYC 9R14 (Zen 4) figures and cpu_peak's rules are two statements of one fact: they agree."""
    from chipwise import catalog

    genoa = catalog.get("epyc-9r14")
    derived = {p.dtype: p.tflops for p in cpu_peak.detect(EPYC_ZEN4, cores=genoa.cores, ghz=genoa.clock_ghz).peaks}
    assert derived["float32"] == pytest.approx(genoa.fp32_tflops, abs=0.01)
    assert derived["bfloat16"] == pytest.approx(genoa.bf16_tflops, abs=0.01)
