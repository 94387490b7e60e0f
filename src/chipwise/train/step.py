"""The jitted train and eval steps, and the sharded training state they run on.

State is a plain pytree {"step", "params", "opt_state", "rng"} (params as a pure dict from the NNX model), so
that optax, Orbax and the sharding rules all see the same arrays. Shapes are static; gradient accumulation is a
`lax.scan` over micro-batches; there is no `lax.cond` and no host callback in the step.

Divergence guard: a step whose loss or gradient norm is not finite keeps the old parameters and optimizer state,
chosen with `jnp.where` leaf by leaf (both branches are computed; shapes stay static), and reports `finite` = 0.

Precision: parameters are stored in `train.param_dtype` (fp32, or bf16), gradients come out in that dtype, and the
update is computed in fp32 (gradients, the AdamW step and the new weight) and rounded to the stored dtype last. With
bf16 parameters an update smaller than half a bf16 step of its weight (~0.4% of it) is rounded away: the price of
halving the weights' memory (no stochastic rounding here). Gradient accumulation sums in fp32. AdamW's moments are
stored in `train.moments_dtype` (train/optimizer.py). ZeRO-1 (`train.shard_optimizer`): the moments are also split
over the mesh's data axis (sharding.add_axis); parameters and gradients are not, and GSPMD inserts the collectives.

Pipelines (`mesh.pipeline`, train/pipeline.py): the state stores the stacked layers in the pipeline's slotted order
(`stage_layout`), the forward pass runs them as stages, and the pipeline's micro-batches are cut from each
accumulation step's batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from chipwise import prng
from chipwise.config import Config, ModelConfig, TrainConfig
from chipwise.config_checks import pipeline_microbatches
from chipwise.errors import ConfigError
from chipwise.model import Transformer, param_axes
from chipwise.sharding import add_axis, batch_sharding, tree_shardings
from chipwise.train.context import context_attention, zigzag_order
from chipwise.train.loss import default_chunk_tokens
from chipwise.train.loss import next_token_loss as chunked_loss
from chipwise.train.optimizer import learning_rate_schedule, make_optimizer
from chipwise.train.pipeline import StageLayout, map_stacked, pipelined_blocks


def next_token_loss(logits, targets):
    """The loss from full logits (what the chunked loss of train/loss.py equals; tests compare with it)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


@dataclass
class Steps:
    """Everything compiled for one run: init, train and eval steps, and the shardings they use."""
    init: Callable  # () -> state
    train: Callable  # (state, tokens [batch, seq+1], poison) -> (state, metrics); poison is 0.0, or NaN to inject
    # a non-finite step (train.inject_nan_batches)
    eval: Callable  # (params, tokens) -> loss
    state_shardings: dict
    batch_sharding: NamedSharding


def abstract_model(m: ModelConfig):
    """The model with abstract parameters (shapes and logical axes only, nothing allocated)."""
    return nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(params=prng.key(0))))


def make_init(m: ModelConfig, t: TrainConfig, tx=None, layout: StageLayout | None = None) -> Callable:
    """The function that makes a run's initial train state; its structure is what every checkpoint holds. Stacked
    layers are stored in `layout`'s slotted order (train/pipeline.py; the plain order without a pipeline)."""
    tx = tx or make_optimizer(t)
    layout = layout or StageLayout.none(m.num_layers)

    def init(params=None):
        """`params`: trained weights (train.init_from) in the stored layer order, instead of random ones."""
        if params is None:
            model = Transformer(m, nnx.Rngs(params=prng.key(t.seed)))  # the same weights whatever the layout
            params = map_stacked(nnx.to_pure_dict(nnx.state(model)), layout.to_slots)
        # Created in fp32 (model.py), stored in train.param_dtype.
        params = jax.tree.map(lambda p: p.astype(t.param_dtype), params)
        # The run's PRNG state, stored as raw key data (Orbax saves plain arrays). The model draws no random
        # numbers today (no dropout); the key still advances every step and is checkpointed, so anything
        # stochastic added to the step resumes exactly.
        rng = jax.random.key_data(jax.random.fold_in(prng.key(t.seed), 1))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": rng}

    return init


def stage_layout(cfg: Config, stages: int | None = None) -> StageLayout:
    """How `cfg`'s train state lays out its stacked layers over `stages` pipeline stages (by default
    cfg.mesh.pipeline; a checkpoint's own config says how it was saved)."""
    stages = cfg.mesh.pipeline if stages is None else stages
    if cfg.model.scanned and stages > 1:
        return StageLayout.of(cfg.model.num_layers, stages, cfg.train.pipeline_repeats)
    return StageLayout.none(cfg.model.num_layers)


def saved_stage_layout(meta: dict, cfg: Config) -> StageLayout:
    """How a checkpoint holds its stacked layers: by the pipeline it was saved under (its config; none for
    checkpoints older than pipelines). The model itself must be `cfg`'s (incompatibility() checks)."""
    saved = meta.get("config") or {}
    mesh = dataclasses.replace(cfg.mesh, pipeline=(saved.get("mesh") or {}).get("pipeline", 1))
    train = dataclasses.replace(cfg.train, pipeline_repeats=(saved.get("train") or {}).get("pipeline_repeats", 1))
    return stage_layout(dataclasses.replace(cfg, mesh=mesh, train=train))


def abstract_state(cfg: Config, layout: StageLayout | None = None):
    """(the train state as ShapeDtypeStructs, the model's graph definition): a restore target for checkpoints, its
    stacked layers in `layout`'s order (by default `cfg`'s)."""
    graphdef, _ = nnx.split(abstract_model(cfg.model))
    return jax.eval_shape(make_init(cfg.model, cfg.train, layout=layout or stage_layout(cfg))), graphdef


def document_segments(tokens, eos_id: int):
    """[batch, seq] token ids -> segment ids: how many EOS come before each token in its row. An EOS belongs to the
    document it ends, the token after it starts the next."""
    is_eos = (tokens == eos_id).astype(jnp.int32)
    return jnp.cumsum(is_eos, axis=1) - is_eos


def build_steps(cfg: Config, mesh: Mesh, attend: Callable, compute_dtype, eos_id: int = 0) -> Steps:
    m, t = cfg.model, cfg.train
    abstract = abstract_model(m)
    graphdef, abstract_params = nnx.split(abstract)
    axes = nnx.to_pure_dict(param_axes(abstract))
    stages = mesh.shape["pipeline"]
    if stages > 1 and not m.scanned:
        raise ConfigError("mesh.pipeline > 1 splits the stacked layers into stages; set model.scan_layers=true")
    layout = stage_layout(cfg, stages)
    stored = nnx.to_pure_dict(abstract_params)
    if not layout.plain:  # the stacked layers in the layout's slots
        stored = map_stacked(stored, lambda a: jax.ShapeDtypeStruct(layout.slotted_shape(a.shape), a.dtype))
    shapes = jax.tree.map(lambda x: x.shape, stored)
    param_shardings = tree_shardings(axes, shapes, mesh)
    tx = make_optimizer(t)
    schedule = learning_rate_schedule(t)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, t.param_dtype), shapes,
                                                        is_leaf=lambda x: isinstance(x, tuple)))

    def moment_sharding(moment, param_sharding):
        if not t.shard_optimizer:
            return param_sharding
        return NamedSharding(mesh, add_axis(param_sharding.spec, moment.shape, mesh, "data"))

    # Optimizer moments shard like their parameters (ZeRO-1: and over data too); counters are replicated.
    opt_shardings = optax.tree_map_params(tx, moment_sharding, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                       "rng": replicated}
    tokens_sharding = batch_sharding(mesh, 2, batch_size=t.batch_size)

    chunk = t.loss_chunk_tokens or default_chunk_tokens(m.vocab_size)
    # Context parallelism lays each sequence out zig-zag so every device gets as much causal work (train/context.py;
    # `attend` is then the position-masked attention for the same order).
    order = zigzag_order(t.seq_len, mesh.shape["context"]) if mesh.shape["context"] > 1 else None
    if order is not None and not np.array_equal(getattr(attend, "order", ()), order):
        attend = context_attention(order)  # any other attention would mask the wrong pairs in that order
    run_blocks = pipelined_blocks(layout, pipeline_microbatches(t, stages), attend, t.remat) if stages > 1 else None

    def forward(params, tokens):
        model = nnx.merge(graphdef, params)
        inputs, targets, positions = tokens[:, :-1], tokens[:, 1:], None
        segments = document_segments(inputs, eos_id) if cfg.data.document_masking else None
        if order is not None:
            inputs, targets = inputs[:, order], targets[:, order]
            positions = jnp.broadcast_to(jnp.asarray(order, jnp.int32), inputs.shape)
            segments = None if segments is None else segments[:, order]
        hidden = model.hidden(inputs, dtype=compute_dtype, attend=attend, remat=t.remat, positions=positions,
                              run_blocks=run_blocks, segment_ids=segments)
        # The LM head and the loss a chunk of tokens at a time: the full logits never exist (train/loss.py).
        return chunked_loss(hidden, model.head(), targets, chunk_tokens=chunk, compute_dtype=compute_dtype)

    init = make_init(m, t, tx, layout)

    def fp32(tree):
        return optax.tree.cast(tree, jnp.float32)

    def train_step(state, tokens, poison):
        params = state["params"]
        _, next_rng = jax.random.split(prng.wrap(state["rng"]))

        def poisoned_forward(params, tokens):
            # x * (1 + 0.0) is x exactly, so a clean step is unchanged; NaN reaches the loss and every gradient.
            return forward(params, tokens) * (1.0 + poison)

        if t.grad_accum == 1:
            loss, grads = jax.value_and_grad(poisoned_forward)(params, tokens)
            grads = fp32(grads)
        else:
            micro = tokens.reshape(t.grad_accum, tokens.shape[0] // t.grad_accum, tokens.shape[1])

            def accumulate(carry, mb):
                loss, grads = jax.value_and_grad(poisoned_forward)(params, mb)
                return jax.tree.map(jnp.add, carry, (loss, fp32(grads))), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
            loss, grads = jax.tree.map(lambda x: x / t.grad_accum, (loss, grads))
        grad_norm = optax.tree.norm(grads)
        master = fp32(params)  # the update in fp32, whatever the parameters are stored in
        updates, opt_state = tx.update(grads, state["opt_state"], master)
        new_params = optax.tree.cast(optax.apply_updates(master, updates), t.param_dtype)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep_good(new, old):
            return jnp.where(finite, new, old)

        new_state = {"step": state["step"] + 1,
                     "params": jax.tree.map(keep_good, new_params, params),
                     "opt_state": jax.tree.map(keep_good, opt_state, state["opt_state"]),
                     "rng": jax.random.key_data(next_rng)}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "finite": finite.astype(jnp.float32)}
        return new_state, metrics

    return Steps(
        init=jax.jit(init, out_shardings=state_shardings),
        train=jax.jit(train_step, in_shardings=(state_shardings, tokens_sharding, replicated),
                      out_shardings=(state_shardings, replicated), donate_argnums=0),
        eval=jax.jit(forward, in_shardings=(param_shardings, tokens_sharding), out_shardings=replicated),
        state_shardings=state_shardings,
        batch_sharding=tokens_sharding,
    )
