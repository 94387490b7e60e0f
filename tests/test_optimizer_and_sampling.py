import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipwise.config import TrainConfig
from chipwise.sample import filter_logits
from chipwise.train.optimizer import decay_mask, learning_rate_schedule


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    sched = learning_rate_schedule(TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1))
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(100)) == pytest.approx(1e-4)
    assert float(sched(55)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-3)  # cosine midpoint


def test_wsd_schedule_holds_then_decays_linearly():
    sched = learning_rate_schedule(TrainConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="wsd",
                                               decay_fraction=0.2, min_lr_ratio=0.0))
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(79)) == pytest.approx(1e-3)  # stable phase
    assert float(sched(90)) == pytest.approx(5e-4)  # halfway through the decay
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)


def test_weight_decay_skips_norms_and_embeddings_unless_asked():
    params = {"embed": jnp.zeros((8, 4)), "blocks": {0: {"attn_norm": {"scale": jnp.zeros(4)},
                                                         "mlp": {"w_up": jnp.zeros((4, 8))}}}}
    mask = decay_mask(params, decay_norms_and_embeddings=False)
    assert mask["blocks"][0]["mlp"]["w_up"] and not mask["embed"] and not mask["blocks"][0]["attn_norm"]["scale"]
    assert all(jax.tree.leaves(decay_mask(params, decay_norms_and_embeddings=True)))


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    kept = lambda x: np.isfinite(np.asarray(x)).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=0, top_p=0.7)) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept(filter_logits(logits, top_k=0, top_p=0.4)) == [True, False, False, False]  # the top one stays
    assert kept(filter_logits(logits, top_k=0, top_p=1.0)) == [True] * 4
