"""Pipeline parallelism over `mesh.pipeline`: the stacked layers cut into stages, micro-batches flowing through them.

Schedule: GPipe, written for GSPMD (as praxis and MaxText do). One `lax.scan` runs M + S - 1 ticks (M micro-batches,
S stages). At each tick every stage runs its layers on the micro-batch it holds: a `vmap` over stages whose axis is
sharded over `pipeline`, so each device computes only its own stage. Then the activations move one stage on, a roll
over that sharded axis, which XLA compiles to a collective-permute between neighbouring stages. Stage 0 takes
micro-batch t at tick t, and the last stage finishes micro-batch t - (S - 1). After S - 1 ticks of warm-up every
stage is busy; the bubble is (S - 1) / (M + S - 1) of the ticks. The backward pass is the scan's transpose: the same
schedule in reverse. Each device keeps its layers' residuals (what `train.remat` saves) for all M + S - 1 ticks, as
GPipe does; 1F1B would hold fewer but needs a hand-written backward pass.

Uneven splits (sharding.pipeline_stage_layers: the first and last stages hold fewer layers). Shapes are static, so
every stage gets as many layer slots as the most loaded one. A slot without a layer holds zero parameters and passes
its input through (`jnp.where`, no `lax.cond`); its gradient is zero, so AdamW leaves it at zero. The train state
stores the layers in this slotted order, so each device stores only its own stage. `StageLayout` converts between
the slotted order and the plain one (a checkpoint from another pipeline degree; export and sampling).

The embedding, the final norm and the loss run outside the pipeline, on every stage's devices for their data shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chipwise.model import remat_policy
from chipwise.sharding import constrain, pipeline_stage_layers


@dataclass(frozen=True)
class StageLayout:
    """Where each stacked layer sits: `counts[s]` layers on stage s, each stage padded to `per_stage` slots."""
    counts: tuple[int, ...]

    @classmethod
    def of(cls, num_layers: int, stages: int) -> "StageLayout":
        return cls(pipeline_stage_layers(num_layers, stages))

    @property
    def stages(self) -> int:
        return len(self.counts)

    @property
    def per_stage(self) -> int:
        return max(self.counts)

    @property
    def slots(self) -> int:
        return self.stages * self.per_stage

    @property
    def plain(self) -> bool:
        """Whether the slotted order is the plain layer order (the layers divide the stages)."""
        return self.slots == sum(self.counts)

    def slot_layers(self) -> np.ndarray:
        """[slots]: the layer in each slot, stage-major; -1 for an empty slot."""
        out = np.full((self.stages, self.per_stage), -1)
        for s, start in enumerate(np.cumsum((0,) + self.counts[:-1])):
            out[s, : self.counts[s]] = np.arange(start, start + self.counts[s])
        return out.reshape(-1)

    def to_slots(self, stacked):
        """A stacked-layers array [layers, ...] in slotted order [slots, ...], empty slots zero."""
        if self.plain:
            return stacked
        index = self.slot_layers()
        filled = (index >= 0).reshape((-1,) + (1,) * (stacked.ndim - 1))
        xp = np if isinstance(stacked, np.ndarray) else jnp
        return xp.where(filled, stacked[np.maximum(index, 0)], xp.zeros((), stacked.dtype))

    def from_slots(self, slotted):
        """The inverse of `to_slots`: [slots, ...] -> [layers, ...]."""
        if self.plain:
            return slotted
        index = self.slot_layers()
        return slotted[np.flatnonzero(index >= 0)]


def map_stacked(tree, fn: Callable):
    """`fn` applied to every stacked-layers array of a train state or parameter tree (those under a `blocks` key:
    the parameters and the optimizer moments that mirror them)."""
    def apply(path, leaf):
        under_blocks = any(getattr(k, "key", None) == "blocks" for k in path)
        return fn(leaf) if under_blocks and hasattr(leaf, "shape") and len(leaf.shape) >= 1 else leaf

    return jax.tree_util.tree_map_with_path(apply, tree)


def relayout(tree, source: StageLayout, target: StageLayout):
    """A tree's stacked layers from `source`'s slotted order to `target`'s."""
    if source == target:
        return tree
    return map_stacked(tree, lambda a: target.to_slots(source.from_slots(a)))


def restore_target(abstract_state, layout: StageLayout):
    """`abstract_state` (ShapeDtypeStructs with shardings) with its stacked layers in `layout`'s slotted order, for
    reading a checkpoint saved under another pipeline degree. Those arrays are read whole along the layer axis
    (each device all of its share of every layer) until `relayout` puts them in this run's order."""
    def slotted(a):
        spec = jax.sharding.PartitionSpec(None, *tuple(a.sharding.spec)[1:])
        return jax.ShapeDtypeStruct((layout.slots, *a.shape[1:]), a.dtype,
                                    sharding=jax.sharding.NamedSharding(a.sharding.mesh, spec))

    return map_stacked(abstract_state, slotted)


def pipelined_blocks(layout: StageLayout, microbatches: int, attend: Callable, remat: str) -> Callable:
    """`run_blocks(blocks, x, positions) -> x` for Transformer.hidden: the blocks' slotted layers as a GPipe
    pipeline over `layout.stages` stages, each batch cut into `microbatches` micro-batches."""
    stages, per_stage, ticks = layout.stages, layout.per_stage, microbatches + layout.stages - 1
    filled = jnp.asarray(layout.slot_layers().reshape(stages, per_stage) >= 0)
    first_stage = jnp.arange(stages) == 0

    def run_blocks(blocks, x, positions):
        graphdef, stacked = nnx.split(blocks)
        staged = jax.tree.map(lambda a: a.reshape(stages, per_stage, *a.shape[1:]), stacked)
        batch = x.shape[0]
        if batch % microbatches:
            raise ValueError(f"a batch of {batch} does not split into {microbatches} pipeline micro-batches")
        xs = x.reshape(microbatches, batch // microbatches, *x.shape[1:])
        ps = positions.reshape(microbatches, batch // microbatches, *positions.shape[1:])

        def stage(params, has_layer, h, pos):  # one stage: its slots in turn
            def layer(h, slot):
                p, present = slot
                out, _ = nnx.merge(graphdef, p)(h, pos, attend)
                return jnp.where(present, out, h), None

            if remat != "none":
                layer = jax.checkpoint(layer, policy=remat_policy(remat), prevent_cse=False)
            return jax.lax.scan(layer, h, (params, has_layer))[0]

        all_stages = jax.vmap(stage, spmd_axis_name="pipeline")

        def enter(held, fresh):  # every stage takes its predecessor's micro-batch; stage 0 a fresh one
            mask = first_stage.reshape((stages,) + (1,) * fresh.ndim)
            return jnp.where(mask, fresh[None], jnp.roll(held, 1, axis=0))

        def tick(carry, t):
            held, held_pos, done = carry
            fresh = jnp.minimum(t, microbatches - 1)  # past the last one, stage 0 recomputes it (bubble)
            held = constrain(enter(held, xs[fresh]), ("stages", "batch", "seq", "embed"))
            held_pos = enter(held_pos, ps[fresh])
            held = constrain(all_stages(staged, filled, held, held_pos), ("stages", "batch", "seq", "embed"))
            # The last stage finishes micro-batch t - (S - 1); before that its output is overwritten later.
            done = jax.lax.dynamic_update_index_in_dim(done, held[-1], jnp.maximum(t - (stages - 1), 0), axis=0)
            return (held, held_pos, done), None

        start = (jnp.zeros((stages, *xs.shape[1:]), x.dtype), jnp.zeros((stages, *ps.shape[1:]), ps.dtype),
                 jnp.zeros_like(xs))
        (_, _, done), _ = jax.lax.scan(tick, start, jnp.arange(ticks))
        return constrain(done.reshape(x.shape), ("batch", "seq", "embed"))

    return run_blocks
