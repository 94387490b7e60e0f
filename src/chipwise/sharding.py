"""How logical axis names map onto the device mesh. The model names axes; this module decides placement.

MaxText-style ordered rules: for each logical axis of an array, the first rule whose mesh axes are not yet used
by another dimension of that array, and whose size divides the dimension, wins; otherwise the dimension is
replicated. So activations `(batch, seq, embed)` put `batch` on data x fsdp and leave `embed` whole, while the
parameter `(embed, mlp)` puts `embed` on fsdp and `mlp` on tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from chipwise.config import MeshConfig
from chipwise.errors import ConfigError

# Outermost to innermost: pipeline stages across the slowest links (they pass one activation per micro-batch), tensor
# on neighbouring devices (two all-reduces per layer).
MESH_AXES = ("pipeline", "data", "fsdp", "context", "tensor")

# logical axis -> mesh axes, tried in order (an axis may appear twice: the later rule is its fallback).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("batch", ("data",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("embed", ("fsdp",)),
    ("seq", ("context",)),  # activations' sequence under context parallelism (train/context.py)
    # batch x sequence merged into rows of tokens (model.project): split as the batch and the sequence were
    ("tokens", ("data", "fsdp", "context")),
    ("tokens", ("data", "fsdp")),
    ("tokens", ("data",)),
    ("head_dim", None),
    # The stacked layers of scan_layers: split into pipeline stages (train/pipeline.py); without a pipeline each
    # device holds its share of every layer.
    ("layers", ("pipeline",)),
    ("stages", ("pipeline",)),  # the pipeline's per-stage activations
)

# Per-platform defaults, as data (AXLearn-style). `max_tensor` caps tensor parallelism to the fast domain;
# `compute_dtype` is what train.dtype=auto means there; `dot_result` is the dtype bf16 dots return before they are
# rounded to the compute dtype (dots.py; None: the operands' dtype).
PLATFORM_RULES: dict[str, dict] = {
    # Unrolled on CPUs: XLA:CPU runs the scanned step of the demo model 5-19% slower (docs/benchmarks.md), and a
    # CPU run is small enough for the unrolled program to compile quickly. fp32 by default: XLA:CPU's bf16 step is
    # at best 15% faster (its weight-gradient dots miss AMX) and less exact; a bf16 dot reaches AMX only with an
    # fp32 result, hence dot_result (docs/benchmarks.md).
    "cpu": dict(rules=DEFAULT_RULES, max_tensor=None, why="", compute_dtype="float32", scan_layers=False,
                dot_result="float32"),
    "gpu": dict(rules=DEFAULT_RULES, max_tensor=8, compute_dtype="bfloat16", scan_layers=True, dot_result=None,
                why="tensor parallelism must stay inside one NVLink domain of 8 GPUs"),
    "tpu": dict(rules=DEFAULT_RULES, max_tensor=None, why="", compute_dtype="bfloat16", scan_layers=True,
                dot_result=None),
    # Trainium2 shows 4 JAX devices per chip (LNC=2); tensor parallelism beyond a chip crosses NeuronLink
    # on every layer, which AXLearn's trn2 rule (model=4) also avoids.
    "neuron": dict(rules=DEFAULT_RULES, max_tensor=4, compute_dtype="bfloat16", scan_layers=True, dot_result=None,
                   why="Trainium keeps tensor parallelism inside one chip (4 devices at LNC=2)"),
}


def platform_rules(platform: str) -> dict:
    return PLATFORM_RULES.get(platform, PLATFORM_RULES["cpu"])


def pipeline_stage_layers(num_layers: int, stages: int) -> tuple[int, ...]:
    """Layers per pipeline stage. Where the layers do not divide the stages, the first and last stages (which also
    hold the embedding and the LM head with the loss) give up one layer each, then the second and second-to-last,
    and so on: Llama 3.1 405B's 126 layers over 16 stages are 7, 8 x 14, 7."""
    if not 1 <= stages <= num_layers:
        raise ConfigError(f"pipeline={stages} stages for {num_layers} layers: each stage needs at least one layer; "
                          f"use at most {num_layers} stages")
    per = -(-num_layers // stages)
    counts = [per] * stages
    for i in range(per * stages - num_layers):  # fewer than `stages`: each stage gives up at most one
        counts[i // 2 if i % 2 == 0 else stages - 1 - i // 2] -= 1
    return tuple(counts)


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int, platform: str = "cpu") -> dict[str, int]:
    sizes = {name: getattr(mesh_cfg, name) for name in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if num_devices % fixed:
            raise ConfigError(f"mesh axes {_fmt(sizes)} cannot fill {num_devices} devices: the fixed axes "
                              f"multiply to {fixed}, which does not divide {num_devices}")
        sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh {_fmt(sizes)} needs {math.prod(sizes.values())} devices but {num_devices} are "
                          f"present; make the product {num_devices} or set one axis to -1")
    cap = platform_rules(platform)["max_tensor"]
    if cap is not None and sizes["tensor"] > cap:
        raise ConfigError(f"mesh.tensor={sizes['tensor']} exceeds {cap} on {platform}: "
                          f"{platform_rules(platform)['why']}; use fsdp or data instead")
    return sizes


def _fmt(sizes: dict) -> str:
    return " x ".join(f"{k}={v}" for k, v in sizes.items())


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(mesh_cfg, len(devices), devices[0].platform)
    shape = tuple(sizes[a] for a in MESH_AXES)
    from jax.experimental import mesh_utils

    try:  # each axis over whole physical torus axes where the sizes allow (the best collectives)
        grid = mesh_utils.create_device_mesh(shape, devices)
    except NotImplementedError:  # e.g. data=2 x fsdp=8 x tensor=4 on a v5p 4x4x4: split physical axes
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry the logical names `axes`."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        chosen = None
        for logical, mesh_axes in rules:
            if logical != name or mesh_axes is None:
                continue
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            if not mesh_axes or used & set(mesh_axes):
                continue
            if dim % math.prod(mesh.shape[a] for a in mesh_axes):
                continue  # e.g. one KV head under tensor=2: replicate rather than fail
            chosen = mesh_axes
            break
        if chosen:
            used |= set(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


# (mesh, rules) of the innermost `use_mesh`. A context variable, not a module global: each thread (the calibration
# compiles models on several at once) and each asyncio task sees only the mesh it entered itself.
_active: contextvars.ContextVar[tuple[Mesh | None, tuple]] = contextvars.ContextVar(
    "chipwise_active_mesh", default=(None, DEFAULT_RULES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
    """Activates `mesh` for jax and for `constrain` (trace the step inside this context)."""
    token = _active.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _active.reset(token)


def active_mesh():
    """(mesh, rules) of the enclosing `use_mesh`, or (None, DEFAULT_RULES): for kernels that must shard_map."""
    return _active.get()


def platform_dot_result() -> str | None:
    """The `dot_result` rule of the enclosing `use_mesh`'s platform (None outside one: the bare model's plain dots)."""
    mesh, _ = _active.get()
    devices = getattr(mesh, "devices", None)
    return None if devices is None else platform_rules(devices.flat[0].platform)["dot_result"]


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding hint for an activation; a no-op outside `use_mesh` (as in tests of the bare model)."""
    mesh, rules = _active.get()
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of arrays given a matching pytree of logical-axes tuples."""
    return jax.tree.map(lambda axes, shape: NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules)),
                        axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def add_axis(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, axis: str = "data") -> PartitionSpec:
    """`spec` further split over the mesh axis `axis` (ZeRO-1: the optimizer moments over data), on the first
    dimension whose size the axes already splitting it times `axis` divide; `axis` goes last (minor), so each device's
    slice lies inside its shard under `spec`. Unchanged where `axis` has size 1, is already used, or divides nothing.
    """
    if mesh.shape[axis] == 1:
        return spec
    entries = [(() if e is None else (e,) if isinstance(e, str) else tuple(e))
               for e in tuple(spec) + (None,) * (len(shape) - len(spec))]
    if any(axis in e for e in entries):
        return spec
    for i, (current, dim) in enumerate(zip(entries, shape)):
        if dim % (math.prod(mesh.shape[a] for a in current) * mesh.shape[axis]) == 0:
            entries[i] = (*current, axis)
            return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else e for e in entries))
    return spec


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES, batch_size: int | None = None) -> NamedSharding:
    shape = (batch_size or int(np.prod([mesh.shape[a] for a in MESH_AXES])),) + (1,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), shape, mesh, rules))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
