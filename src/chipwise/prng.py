"""Every PRNG key chipwise makes names its implementation here, instead of relying on JAX's global default, so a
run's initial weights and its checkpoint layout (key data shape) are the same however the process was started
(`chipwise train`, `Trainer(cfg).run()` from Python, a benchmark, a test)."""

from __future__ import annotations

import jax

IMPL = "rbg"  # the PRNG that TPU and Trainium run fast (threefry is slow there); CPUs and GPUs run it as well


def key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl=IMPL)


def wrap(key_data: jax.Array) -> jax.Array:
    """A key from raw key data (as checkpoints store it)."""
    return jax.random.wrap_key_data(key_data, impl=IMPL)


# Serving draws each reply's tokens from its own key. threefry's bits under vmap equal the unbatched ones, so a
# reply is the same whatever slot it runs in and whatever runs beside it; rbg's batched bits depend on the batch.
# One draw of a vocabulary's worth of noise per token makes the speed difference irrelevant there.
SAMPLING_IMPL = "threefry2x32"


def sampling_key(seed, index):
    """The key of the index-th token of the reply seeded `seed` (traced or not)."""
    return jax.random.fold_in(jax.random.key(seed, impl=SAMPLING_IMPL), index)
