from dataclasses import dataclass

import jax.numpy as jnp
import pytest

from chipwise import catalog, efficiency
from chipwise.config import HardwareConfig


@dataclass
class FakeDevice:
    device_kind: str
    platform: str
    process_index: int = 0


def hardware(kind, platform="gpu", n=8, **hw):
    return efficiency.resolve_hardware([FakeDevice(kind, platform)] * n, jnp.bfloat16, HardwareConfig(**hw))


def test_each_process_of_a_cpu_run_is_one_chip():
    one = efficiency.resolve_hardware([FakeDevice("cpu", "cpu")] * 8, jnp.float32, HardwareConfig(peak_tflops=1.0))
    two = efficiency.resolve_hardware([FakeDevice("cpu", "cpu", p) for p in (0, 1) for _ in range(4)], jnp.float32,
                                      HardwareConfig(peak_tflops=1.0))
    assert (one.num_devices, one.num_chips) == (8, 1) and (two.num_devices, two.num_chips) == (8, 2)


def test_known_chip_uses_its_catalog_peak_price_and_power():
    hw = hardware("NVIDIA H100 80GB HBM3")
    h100 = catalog.get("h100-sxm")
    assert hw.peak.kind == "catalog" and hw.peak.tflops_per_device == h100.bf16_tflops
    assert "h100-sxm" in hw.peak.describe()
    assert hw.price_per_chip_hour == h100.price_per_chip_hour and hw.power_watts_per_chip == h100.power_watts
    # 8 chips at 700 W for the hour it takes to make 1e6 tokens at 1e6/3600 tokens/s: 5.6 kWh.
    assert efficiency.kwh_per_million_tokens(hw, 1e6 / 3600) == pytest.approx(8 * 0.7)
    assert efficiency.dollars_per_million_tokens(hw, 1e6 / 3600) == pytest.approx(8 * h100.price_per_chip_hour)


def test_several_devices_per_chip_divide_the_peak():
    hw = hardware("NC_v3d", platform="neuron", n=64)
    trn2 = catalog.get("trn2")
    assert hw.devices_per_chip == 4 and hw.num_chips == 16
    assert hw.peak.tflops_per_device == pytest.approx(trn2.bf16_tflops / 4)


def test_unknown_chip_never_borrows_another_peak():
    hw = hardware("NVIDIA H100 PCIe", measure_peak=False)  # a different, slower chip than the SXM part
    assert hw.peak.tflops_per_device is None and hw.peak.kind == "unknown"
    assert efficiency.mfu(100.0, hw.peak) is None
    assert hw.price_per_chip_hour is None and efficiency.dollars_per_million_tokens(hw, 1000.0) is None


def test_user_figures_win_and_are_labelled():
    hw = hardware("NVIDIA H100 PCIe", peak_tflops=756.0, price_per_hour=2.0, power_watts=350.0)
    assert hw.peak.kind == "user" and "user-given" in hw.peak.describe()
    assert efficiency.mfu(378.0, hw.peak) == pytest.approx(0.5)
    assert hw.price_source == "config" and hw.power_watts_per_chip == 350.0
