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


def test_a_chip_whose_power_is_a_range_gets_energy_as_a_range():
    """tpu-v7's power is published only as disagreeing estimates (600-1000 W): energy is that range, never a point,
    and the run summary prints it so; a user's own figure is one point again."""
    from rich.console import Console

    from chipwise.report import summary_table

    hw = hardware("TPU7x", platform="tpu", n=8)  # 2 JAX devices per chip: 4 chips
    assert hw.power_watts_per_chip is None and hw.power_watts_range == (600, 1000)
    assert "estimated range" in hw.power_source
    assert efficiency.kwh_per_million_tokens(hw, 1e6 / 3600) is None
    assert efficiency.kwh_per_million_tokens_range(hw, 1e6 / 3600) == pytest.approx([4 * 0.6, 4 * 1.0])
    summary = dict(tokens=1, wall_time_s=1.0, compile_time_s=0.0, data_wait_s=0.0, eval_time_s=0.0,
                   checkpoint_time_s=0.0, final_train_loss=None, first_val_loss=None, final_val_loss=None,
                   tokens_per_s=None, tokens_per_s_per_device=None, tflops_per_device=None, mfu=None, mfu_basis="x",
                   usd_per_million_tokens=None, price_source="unknown", kwh_per_million_tokens=None,
                   kwh_per_million_tokens_range=[2.4, 4.0], power_source=hw.power_source)
    console = Console(width=200, record=True)
    console.print(summary_table(summary))
    assert "2.4-4 kWh per million tokens" in console.export_text()
    mine = hardware("TPU7x", platform="tpu", n=8, power_watts=800.0)
    assert mine.power_watts_per_chip == 800.0 and mine.power_watts_range == (800.0, 800.0)
