"""AdamW with warm-up then cosine or warm-up-stable-decay (WSD) schedules, clipping and a weight-decay mask.

AdamW's two moments are stored in `train.moments_dtype` (fp32 by default, or bf16 to halve the optimizer state);
either way they are updated in fp32 and rounded only when stored. The optimizer's state has the structure of
`optax.adamw`'s (checkpoints and `optax.tree_map_params` see the same tree).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from chipwise.config import TrainConfig


def learning_rate_schedule(t: TrainConfig) -> optax.Schedule:
    peak, floor = t.lr, t.lr * t.min_lr_ratio
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(t.steps, warmup + 1), end_value=floor)
    # WSD: hold the peak, then decay linearly over the last `decay_fraction` of training.
    decay = max(1, int(round(t.steps * t.decay_fraction)))
    stable = max(0, t.steps - warmup - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)),
         optax.constant_schedule(peak),
         optax.linear_schedule(peak, floor, decay)],
        boundaries=[warmup, warmup + stable],
    )


def decay_mask(params, decay_norms_and_embeddings: bool):
    """Decay matrices only: norms (1-D) and the embedding table are left alone unless asked otherwise."""
    def wants_decay(path, leaf):
        if decay_norms_and_embeddings:
            return True
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return leaf.ndim >= 2 and "embed" not in names
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def scale_by_adam_stored_in(moments_dtype, *, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """`optax.scale_by_adam` whose first and second moments are both stored in `moments_dtype`.

    optax.scale_by_adam has `mu_dtype` for the first moment only; its second moment takes the parameters' dtype at
    init and keeps its stored dtype afterwards (optax casts the new one like the old). So setting both dtypes at init
    fixes them for the run. The gradients are made fp32 first: each moment is then updated, bias-corrected and
    divided in fp32 (bf16 * fp32 promotes), and rounded to `moments_dtype` only when stored.
    """
    dtype = jnp.dtype(moments_dtype)
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=dtype)

    def init(params):
        state = adam.init(params)
        return state._replace(nu=optax.tree.cast(state.nu, dtype))

    def update(updates, state, params=None):
        return adam.update(optax.tree.cast(updates, jnp.float32), state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    # optax.adamw's own chain (scale_by_adam, add_decayed_weights, scale_by_learning_rate), with both moments in
    # train.moments_dtype: with fp32 moments it is optax.adamw exactly.
    adamw = optax.chain(
        scale_by_adam_stored_in(t.moments_dtype, b1=t.beta1, b2=t.beta2, eps=t.adam_eps),
        optax.add_decayed_weights(t.weight_decay, lambda p: decay_mask(p, t.decay_norms_and_embeddings)),
        optax.scale_by_learning_rate(learning_rate_schedule(t)),
    )
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
