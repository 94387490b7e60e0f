"""A run's set-up before its first step: devices, mesh, attention, hardware facts and data, every one of them
checked before the run directory is touched; and the description of what ran (run_info.json, the header)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from chipwise import data, efficiency, flops, provenance
from chipwise.config import Config
from chipwise.config_checks import pipeline_microbatches
from chipwise.distributed import agree, barrier, is_leader
from chipwise.errors import ConfigError
from chipwise.sharding import data_parallel_size, make_mesh, platform_rules
from chipwise.train.compiled_step import check_batch_fits, compute_dtype, select_attention


@dataclass
class RunSetup:
    devices: list
    platform: str
    mesh: Any
    rules: tuple  # the platform's logical-axis rules
    dtype: Any  # compute dtype
    attention: Any  # attention.AttentionChoice
    hardware: efficiency.Hardware
    flops: flops.FlopsPerToken


def prepare_devices(cfg: Config) -> RunSetup:
    """Everything about the devices the run needs; a config they cannot run fails here (ConfigError)."""
    devices = jax.devices()
    platform = devices[0].platform
    mesh = make_mesh(cfg.mesh, devices)
    check_batch_fits(cfg.train, mesh)
    dtype = compute_dtype(cfg.train.dtype, platform)
    choice = select_attention(cfg, platform, dtype, mesh)
    check_memory_fits(cfg, mesh, devices)
    barrier("measure-peak")  # processes sharing a CPU measure it together, so each sees its share
    hardware = efficiency.resolve_hardware(devices, dtype, cfg.hardware)
    return RunSetup(devices, platform, mesh, platform_rules(platform)["rules"], dtype, choice, hardware,
                    flops.training_flops_per_token(cfg.model, cfg.train.seq_len))


def _host_memory_available() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory_fits(cfg: Config, mesh, devices) -> None:
    """Refuse a run whose estimated memory (plan/memory.py, the planner's own model) exceeds what the devices
    have, before anything is allocated: the OS would otherwise kill it with no message. The estimate is a model,
    not a measurement, so only a clear excess is refused."""
    from chipwise.plan.memory import training_memory

    t, local = cfg.train, [d for d in devices if d.process_index == jax.process_index()]
    dp, stages = data_parallel_size(mesh), mesh.shape["pipeline"]
    # What the planner calls micro-batches: the pipeline's (each accumulation step's), or accumulation's.
    micro = pipeline_microbatches(t, stages) if stages > 1 else t.grad_accum
    micro_seqs = t.batch_size / t.grad_accum / (micro if stages > 1 else 1) / dp
    per_device = training_memory(cfg.model, t.seq_len, micro_seqs, fsdp=mesh.shape["fsdp"],
                                 tensor=mesh.shape["tensor"], pipeline=stages, microbatches=micro, remat=t.remat,
                                 data=mesh.shape["data"], context=mesh.shape["context"],
                                 shard_optimizer=t.shard_optimizer, param_dtype=t.param_dtype,
                                 moments_dtype=t.moments_dtype, loss_chunk_tokens=t.loss_chunk_tokens).total
    if devices[0].platform == "cpu":  # every CPU device of this process shares the host's memory
        need, have, where = per_device * len(local), _host_memory_available(), "host memory available"
    else:
        stats = local[0].memory_stats() or {}
        need, have, where = per_device, stats.get("bytes_limit"), f"memory of one {local[0].device_kind}"
    if have and need > have:
        raise ConfigError(f"this run needs about {need / 2**30:,.1f} GiB (estimated: train.batch_size "
                          f"{t.batch_size} x seq_len {t.seq_len}, model {flops.param_count(cfg.model) / 1e6:,.1f}M "
                          f"parameters) but {where} is {have / 2**30:,.1f} GiB; lower train.batch_size, raise "
                          f"train.grad_accum or use train.remat=full")


def prepare_data_everywhere(cfg: Config, log: Callable[[str], None]) -> data.PreparedData:
    """Process 0 builds the tokenizer and token cache first; the others then find it where the cache is shared,
    and must in any case end up with the very same tokens."""
    if is_leader():
        prepared = data.prepare_data(cfg.data, cfg.model.vocab_size, log=log)
    barrier("data-prepared")
    if not is_leader():
        prepared = data.prepare_data(cfg.data, cfg.model.vocab_size, log=log)
    agree(f"{prepared.tokenizer_fingerprint}:{len(prepared.train_tokens)}", "the tokenizer and tokens")
    return prepared


def describe(s: RunSetup, cfg: Config, prepared: data.PreparedData, compile_s: float | None) -> dict:
    """run_info.json: what exactly ran, and against which peak, price and power it is measured."""
    hw, m = s.hardware, cfg.model
    return {
        "devices": f"{hw.num_devices} x {hw.device_kind} ({hw.platform})",
        "chips": hw.num_chips,
        "mesh": dict(s.mesh.shape),
        "compute_dtype": jnp.dtype(s.dtype).name,
        "attention": s.attention.name,
        "attention_fallback": s.attention.fallback_reason,
        "params": flops.param_count(m),
        "flops_per_token": s.flops.total,
        "flops_convention": flops.CONVENTION,
        "peak": hw.peak.describe(),
        "peak_kind": hw.peak.kind,
        "price_per_chip_hour": hw.price_per_chip_hour, "price_source": hw.price_source,
        "power_watts_per_chip": hw.power_watts_per_chip, "power_source": hw.power_source,
        "power_watts_range": list(hw.power_watts_range) if hw.power_watts_range else None,
        "data": prepared.description,
        "compile_time_s": compile_s,
        "jax": jax.__version__,
        "provenance": provenance.collect(s.devices),  # versions, git commit, devices: what exactly ran
    }


def header_lines(run_dir, info: dict) -> list[str]:
    compiled = info["compile_time_s"]  # None: nothing to train, nothing compiled (chipwise import)
    return [f"[bold]chipwise[/bold] run {run_dir}",
            f"  devices   {info['devices']}, mesh {info['mesh']}, compute {info['compute_dtype']}, "
            f"attention {info['attention']}",
            f"  model     {info['params'] / 1e6:.2f}M parameters, "
            f"{info['flops_per_token'] / 1e6:.1f} MFLOP per token ({info['flops_convention']})",
            f"  peak      {info['peak']}",
            f"  data      {info['data']}",
            f"  compile   {compiled:.1f} s" if compiled is not None else "  compile   no train step (none to run)"]
