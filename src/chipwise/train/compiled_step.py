"""How a compiled train step is assembled, once for everyone who runs one: the trainer, the planner's TPU
ahead-of-time check (plan/aot.py), the CPU calibration (plan/calibration.py) and benchmarks/train_step.py.

    compute dtype for the platform -> attention for the platform -> build_steps -> lower and compile

so that what the planner compiles and what the benchmark times is exactly what `chipwise train` runs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from chipwise import attention
from chipwise.config import Config, TrainConfig
from chipwise.config_checks import pipeline_microbatches
from chipwise.errors import ConfigError
from chipwise.sharding import data_parallel_size, platform_rules, use_mesh
from chipwise.train.step import Steps, build_steps


def compute_dtype(dtype: str, platform: str):
    """`train.dtype` on `platform`: "auto" is the platform's default (sharding.PLATFORM_RULES)."""
    name = platform_rules(platform)["compute_dtype"] if dtype == "auto" else dtype
    return jnp.dtype(name).type


def with_platform_defaults(cfg: Config, platform: str) -> Config:
    """`cfg` with what it leaves to the platform decided (sharding.PLATFORM_RULES): today model.scan_layers (always
    stacked under a pipeline, which splits the stack into stages)."""
    if cfg.model.scan_layers is not None:
        return cfg
    scan = cfg.mesh.pipeline > 1 or platform_rules(platform)["scan_layers"]
    model = dataclasses.replace(cfg.model, scan_layers=scan)
    return dataclasses.replace(cfg, model=model)


def check_batch_fits(t: TrainConfig, mesh) -> None:
    """The global batch, and each micro-batch of it, must split evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh)
    if t.batch_size % dp:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by the data-parallel size "
                          f"mesh.data x mesh.fsdp = {dp}")
    if (t.batch_size // t.grad_accum) % dp:
        raise ConfigError(f"each micro-batch (train.batch_size / train.grad_accum = "
                          f"{t.batch_size // t.grad_accum}) must be divisible by the data-parallel size {dp}")
    if mesh.shape["pipeline"] > 1:
        micro = pipeline_microbatches(t, mesh.shape["pipeline"])
        if (t.batch_size // t.grad_accum // micro) % dp:
            raise ConfigError(f"each pipeline micro-batch (train.batch_size / train.grad_accum / "
                              f"train.pipeline_microbatches = {t.batch_size // t.grad_accum // micro}) must be "
                              f"divisible by the data-parallel size {dp}; use fewer pipeline micro-batches")


def select_attention(cfg: Config, platform: str, dtype, mesh) -> attention.AttentionChoice:
    """The platform's attention for this shape, or the context-parallel one where `mesh` splits the sequence."""
    from chipwise.train.context import choice_for

    m = cfg.model
    preferred = attention.select(platform, seq_len=cfg.train.seq_len, head_dim=m.head_dim, num_heads=m.num_heads,
                                 num_kv_heads=m.num_kv_heads, dtype=dtype,
                                 document_masking=cfg.data.document_masking)
    return choice_for(mesh.shape["context"], cfg.train.seq_len, preferred)


@dataclass
class TrainStep:
    steps: Steps  # the jitted init / train / eval functions and their shardings
    attention: attention.AttentionChoice  # which implementation, and why a preferred one was declined
    dtype: Any  # the compute dtype (a numpy scalar type)
    abstract_state: Any  # the train state as ShapeDtypeStructs with their shardings (a restore target)
    mesh: Any
    rules: tuple  # the platform's logical-axis rules, active while the step is traced
    batch_shape: tuple  # (global batch, seq_len + 1) tokens
    train: Any = None  # after compile(): the compiled step, (state, tokens, poison) -> (state, metrics)
    compile_s: float | None = None  # lowering + compilation, seconds

    def compile(self) -> "TrainStep":
        """Lower and compile the train step for abstract inputs (nothing is allocated)."""
        t = self.steps
        with use_mesh(self.mesh, self.rules):
            tokens = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=t.batch_sharding)
            no_fault = jax.ShapeDtypeStruct((), jnp.float32)  # the step's NaN-injection input (0.0 in real runs)
            t0 = time.perf_counter()
            self.train = t.train.lower(self.abstract_state, tokens, no_fault).compile()
            self.compile_s = time.perf_counter() - t0
        return self


def build_train_step(cfg: Config, mesh, platform: str, choice: attention.AttentionChoice | None = None,
                     eos_id: int = 0) -> TrainStep:
    """The train step of `cfg` for `mesh` (real devices, or an abstract TPU topology), ready to compile.

    `platform` picks the attention and the compute dtype; it need not be this process's (plan --aot builds for
    "tpu" on a CPU). Pass `choice` where the attention was already selected (the trainer reports it first).
    Callers compile it with `.compile()`; the trainer does so only once its checkpoint has been accepted.
    `eos_id` ends documents for data.document_masking (the tokenizer's; a trained one's is 0).
    """
    cfg = with_platform_defaults(cfg, platform)
    check_batch_fits(cfg.train, mesh)
    dtype = compute_dtype(cfg.train.dtype, platform)
    choice = choice or select_attention(cfg, platform, dtype, mesh)
    rules = platform_rules(platform)["rules"]
    steps = build_steps(cfg, mesh, choice.fn, dtype, eos_id)  # outside the mesh context: it runs eager set-up code
    with use_mesh(mesh, rules):
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(steps.init), steps.state_shardings)
    return TrainStep(steps, choice, dtype, state, mesh, rules, (cfg.train.batch_size, cfg.train.seq_len + 1))
