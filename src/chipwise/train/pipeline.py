"""Pipeline parallelism over `mesh.pipeline`: the stacked layers cut into stages, micro-batches flowing through them.

Schedule: GPipe, or circular with R passes (`train.pipeline_repeats`: each device holds R groups of layers and every
micro-batch goes round the stages R times), written for GSPMD as praxis and MaxText do. One `lax.scan` runs
R x M + S - 1 ticks (M micro-batches, S stages). At each tick every stage runs one group of its layers on the
micro-batch it holds: a `vmap` over stages whose axis is sharded over `pipeline`, so each device computes only its
own stage. Then the activations move one stage on, a roll over that sharded axis, which XLA compiles to a
collective-permute between neighbouring stages. Stage s runs iteration t - s at tick t (micro-batch (t - s) mod M on
pass (t - s) div M). After S - 1 ticks of warm-up every stage is busy; the bubble is (S - 1) / (R x M + S - 1) of
the ticks. The backward pass is the scan's transpose: the same
schedule in reverse. As in the GPipe paper, each tick keeps only its stage's input micro-batch, and the backward
pass recomputes the stage's forward (keeping what `train.remat` saves, for that one micro-batch) before taking its
gradient: M + S - 1 stage inputs live per device, not M + S - 1 stages' activations, for one extra forward pass.

Uneven splits (sharding.pipeline_stage_layers: the first and last stages hold fewer layers). Shapes are static, so
every stage gets as many layer slots as the most loaded one. A slot without a layer holds zero parameters and passes
its input through (`jnp.where`, no `lax.cond`); its gradient is zero, so AdamW leaves it at zero. The train state
stores the layers in this slotted order, so each device stores only its own stage. `StageLayout` converts between
the slotted order and the plain one (a checkpoint from another pipeline degree; export and sampling).

The embedding, the final norm and the loss run outside the pipeline, on every stage's devices for their data shard.
"""

from __future__ import annotations

import functools

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
    """Where each stacked layer sits. The layers are cut into `stages` x `repeats` virtual stages, `counts[v]`
    layers in virtual stage v (sharding.pipeline_stage_layers), which device v % stages runs on pass v // stages
    (the circular schedule; one pass is GPipe). Each virtual stage is padded to `per_stage` slots, and slots are
    stored device-major (stage, pass, slot), so that a device's layers are one contiguous block of the stack."""
    counts: tuple[int, ...]
    repeats: int = 1

    @classmethod
    def of(cls, num_layers: int, stages: int, repeats: int = 1) -> "StageLayout":
        return cls(pipeline_stage_layers(num_layers, stages * repeats), repeats)

    @classmethod
    def none(cls, num_layers: int) -> "StageLayout":
        """No pipeline: one stage holding every layer, in order."""
        return cls((num_layers,))

    @property
    def stages(self) -> int:
        return len(self.counts) // self.repeats

    @property
    def per_stage(self) -> int:
        return max(self.counts)

    @property
    def slots(self) -> int:
        return len(self.counts) * self.per_stage

    def slotted_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a stacked-layers array of `shape` ([layers, ...]) in this slotted order."""
        return (self.slots, *shape[1:])

    @property
    def plain(self) -> bool:
        """Whether the slotted order is the plain layer order."""
        return self.slots == sum(self.counts) and bool((self.slot_layers() == np.arange(self.slots)).all())

    def slot_layers(self) -> np.ndarray:
        """[slots]: the layer in each slot, in storage order (stage, pass, slot); -1 for an empty slot."""
        out = np.full((self.repeats, self.stages, self.per_stage), -1)  # (pass, stage, slot): virtual stage order
        starts = np.cumsum((0,) + self.counts[:-1])
        for v, (start, n) in enumerate(zip(starts, self.counts)):
            out[v // self.stages, v % self.stages, :n] = np.arange(start, start + n)
        return out.transpose(1, 0, 2).reshape(-1)

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
        return slotted[np.argsort(np.where(index >= 0, index, index.size))[: sum(self.counts)]]


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
        return jax.ShapeDtypeStruct(layout.slotted_shape(a.shape), a.dtype,
                                    sharding=jax.sharding.NamedSharding(a.sharding.mesh, spec))

    return map_stacked(abstract_state, slotted)


def pipelined_blocks(layout: StageLayout, microbatches: int, attend: Callable, remat: str) -> Callable:
    """`run_blocks(blocks, x, positions, segment_ids=None) -> x` for Transformer.hidden: the blocks' slotted layers
    as a pipeline over `layout.stages` stages and `layout.repeats` passes, each batch cut into `microbatches`
    micro-batches (positions and segment ids with them)."""
    stages, repeats, per_stage = layout.stages, layout.repeats, layout.per_stage
    ticks = repeats * microbatches + stages - 1
    if repeats > 1 and microbatches < stages:
        raise ValueError(f"a circular pipeline needs at least as many micro-batches ({microbatches}) as stages "
                         f"({stages})")
    filled = jnp.asarray(layout.slot_layers().reshape(stages, repeats, per_stage) >= 0)
    first_stage = jnp.arange(stages) == 0

    def run_blocks(blocks, x, positions, segment_ids=None):
        graphdef, stacked = nnx.split(blocks)
        staged = jax.tree.map(lambda a: a.reshape(stages, repeats, per_stage, *a.shape[1:]), stacked)
        batch = x.shape[0]
        if batch % microbatches:
            raise ValueError(f"a batch of {batch} does not split into {microbatches} pipeline micro-batches")
        xs = x.reshape(microbatches, batch // microbatches, *x.shape[1:])
        ps = positions.reshape(microbatches, batch // microbatches, *positions.shape[1:])
        ss = None if segment_ids is None else segment_ids.reshape(ps.shape)
        stage_index = jnp.arange(stages)

        def stage(params, has_layer, repeat, h, pos, seg):  # one stage on pass `repeat`: its slots in turn
            attend_here = attend if seg is None else functools.partial(attend, segment_ids=seg)

            def layer(h, slot):
                p, present = slot
                out, _ = nnx.merge(graphdef, p)(h, pos, attend_here)
                return jnp.where(present, out, h), None

            if remat != "none":
                layer = jax.checkpoint(layer, policy=remat_policy(remat), prevent_cse=False)
            this_pass = jax.tree.map(lambda a: a[repeat], (params, has_layer))
            return jax.lax.scan(layer, h, this_pass)[0]

        # GPipe's re-materialisation: a tick keeps only its stage's input; the backward pass runs the stage forward
        # again (saving what `train.remat` says, for this one micro-batch) just before its gradient.
        all_stages = jax.vmap(jax.checkpoint(stage, prevent_cse=False), spmd_axis_name="pipeline")

        def tick(carry, t):
            held, circulating = carry
            # Every stage takes its predecessor's micro-batch; stage 0 takes iteration t's from the circulating
            # buffer, which holds the inputs at first and then each micro-batch as the last stage finished its
            # previous pass (at tick t - M + S - 1 < t, as M >= S). Past the last iteration stage 0 recomputes
            # something (the bubble).
            fresh = circulating[t % microbatches][None]
            held = jnp.where(first_stage.reshape((stages,) + (1,) * (held.ndim - 1)), fresh, jnp.roll(held, 1, 0))
            held = constrain(held, ("stages", "batch", "seq", "embed"))
            iteration = t - stage_index  # stage s runs iteration t - s: its micro-batch's positions, its pass
            repeat = jnp.clip(iteration // microbatches, 0, repeats - 1)
            mb = iteration % microbatches
            held = all_stages(staged, filled, repeat, held, ps[mb], None if ss is None else ss[mb])
            held = constrain(held, ("stages", "batch", "seq", "embed"))
            # The last stage finished iteration t - (S - 1); before the first, what it writes is overwritten later.
            done = jnp.maximum(t - (stages - 1), 0) % microbatches
            circulating = jax.lax.dynamic_update_index_in_dim(circulating, held[-1], done, axis=0)
            return (held, circulating), None

        (_, out), _ = jax.lax.scan(tick, (jnp.zeros((stages, *xs.shape[1:]), x.dtype), xs), jnp.arange(ticks))
        return constrain(out.reshape(x.shape), ("batch", "seq", "embed"))

    return run_blocks
