"""Context parallelism (train/context.py): the sequence split over `mesh.context`, laid out zig-zag for causal load
balance, gives the losses and gradients of one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipwise.attention import reference
from chipwise.cli import main
from chipwise.config import MeshConfig, load_config
from chipwise.sharding import make_mesh
from chipwise.train.context import context_attention, zigzag_order
from conftest import TINY_MODEL, losses_and_params, one_line_error, set_args

SMALL = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
         "model.vocab_size=128", "train.batch_size=8", "train.seq_len=32", "train.dtype=float32",
         "train.warmup_steps=2", "train.steps=4"]


def test_zigzag_gives_each_device_an_early_and_a_late_chunk():
    assert zigzag_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert zigzag_order(8, 1).tolist() == list(range(8))
    order = zigzag_order(64, 4)
    assert sorted(order.tolist()) == list(range(64))
    # Causal (query, key) pairs each device attends to: equal under zig-zag; contiguous blocks would give the
    # last device 7x the first's.
    work = [int(sum(q + 1 for q in block)) for block in np.split(order, 4)]
    assert len(set(work)) == 1
    contiguous = [int(sum(q + 1 for q in block)) for block in np.split(np.arange(64), 4)]
    assert contiguous[-1] > 6 * contiguous[0]


@pytest.mark.parametrize("query_block", [512, 4])
def test_position_masked_attention_equals_the_reference_in_any_order(monkeypatch, query_block):
    from chipwise.train import context

    monkeypatch.setattr(context, "QUERY_BLOCK", query_block)  # 4: four blocks of queries, each rematerialised
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32) for _ in range(2))
    want = reference.attend(q, k, v, is_causal=True)
    order = zigzag_order(16, 2)
    got = context_attention(order)(q[:, order], k[:, order], v[:, order], is_causal=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want)[:, order], rtol=1e-6, atol=1e-6)
    # Gradients too (through the per-block rematerialisation): with respect to q, k and v, in the same order.
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    grads_want = jax.grad(lambda *x: jnp.sum(reference.attend(*x, is_causal=True) * w), (0, 1, 2))(q, k, v)
    grads_got = jax.grad(lambda *x: jnp.sum(context_attention(order)(*x, is_causal=True) * w[:, order]),
                         (0, 1, 2))(q[:, order], k[:, order], v[:, order])
    for g, want_g in zip(grads_got, grads_want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(want_g)[:, order], rtol=1e-5, atol=1e-6)


def four_step_losses(mesh_cfg: MeshConfig):
    return losses_and_params(SMALL, mesh_cfg, steps=4)


def test_context_parallel_training_matches_one_device(monkeypatch):
    from chipwise.train import context

    monkeypatch.setattr(context, "QUERY_BLOCK", 4)  # several query blocks per device, as at real lengths
    assert len(jax.devices()) >= 8
    base, base_params = four_step_losses(MeshConfig(data=1))
    assert base[-1] < base[0]
    for mesh_cfg in (MeshConfig(data=4, context=2), MeshConfig(data=1, context=4, tensor=2)):
        losses, params = four_step_losses(mesh_cfg)
        np.testing.assert_allclose(losses, base, rtol=1e-5, err_msg=str(mesh_cfg))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(mesh_cfg))


def test_activations_are_really_split_over_context():
    """The compiled step keeps 1/context of each sequence's activations per device: its temporaries shrink."""
    from chipwise.train.compiled_step import build_train_step

    temp = {}
    for context in (1, 4):
        cfg = load_config(None, SMALL + ["train.seq_len=256", "model.max_seq_len=256", "train.batch_size=2",
                                         "model.d_ff=512"])
        mesh = make_mesh(MeshConfig(data=1, context=context), jax.devices()[:context])
        step = build_train_step(cfg, mesh, "cpu").compile()
        assert step.attention.name == ("context_zigzag" if context > 1 else step.attention.name)
        temp[context] = step.train.memory_analysis().temp_size_in_bytes
    assert temp[4] < 0.5 * temp[1]


def test_resume_across_a_change_of_context_degree(tmp_path, corpus):
    def run(path, steps, *mesh):
        args = set_args(*TINY_MODEL, f"train.steps={steps}", "train.checkpoint_every=2", "train.eval_every=100",
                        "train.log_every=1", f"data.sources=[{corpus}]", f"run_dir={path}", *mesh)
        return args

    straight = tmp_path / "straight"
    assert main(["train", *run(straight, 4, "mesh.data=4", "mesh.context=2")]) == 0
    split = tmp_path / "split"
    assert main(["train", *run(split, 2, "mesh.data=4", "mesh.context=2")]) == 0
    assert main(["train", "--resume", str(split), *run(split, 4, "mesh.data=8", "mesh.context=1")]) == 0

    def losses(path):
        import json

        return {r["step"]: r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if "loss" in r and "event" not in r}

    a, b = losses(straight), losses(split)
    assert set(a) >= {3, 4} and set(b) >= {3, 4}
    np.testing.assert_allclose([b[3], b[4]], [a[3], a[4]], rtol=1e-5)


def test_a_sequence_that_does_not_split_is_refused_in_one_line(tmp_path, corpus, capsys):
    args = set_args(*TINY_MODEL, "train.seq_len=30", "mesh.context=4", "mesh.data=2", f"data.sources=[{corpus}]",
                    f"run_dir={tmp_path / 'run'}")
    assert main(["train", *args]) == 2
    assert "2 x mesh.context = 8" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()
