"""AdamW with warm-up then cosine or warm-up-stable-decay (WSD) schedules, clipping and a weight-decay mask."""

from __future__ import annotations

import jax
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


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(learning_rate_schedule(t), b1=t.beta1, b2=t.beta2, eps=t.adam_eps,
                    weight_decay=t.weight_decay,
                    mask=lambda p: decay_mask(p, t.decay_norms_and_embeddings)),
    )
