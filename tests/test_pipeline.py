"""Pipeline parallelism (train/pipeline.py): the stacked layers as GPipe stages over `mesh.pipeline` give the losses
and gradients of one device, with even and uneven stages, and checkpoints move between pipeline degrees."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipwise.attention import reference
from chipwise.cli import main
from chipwise.config import MeshConfig, load_config
from chipwise.sharding import make_mesh, use_mesh
from chipwise.train.pipeline import StageLayout, map_stacked
from chipwise.train.step import build_steps, stage_layout
from conftest import TINY_MODEL, one_line_error, set_args

SIX_LAYERS = ["model.num_layers=6", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=64",
              "model.vocab_size=64", "train.batch_size=16", "train.seq_len=16", "train.dtype=float32",
              "train.warmup_steps=1", "train.steps=3"]


def test_uneven_stages_put_fewer_layers_first_and_last_and_pad_the_rest():
    layout = StageLayout.of(6, 4)
    assert layout.counts == (1, 2, 2, 1) and layout.slots == 8 and not layout.plain
    assert layout.slot_layers().tolist() == [0, -1, 1, 2, 3, 4, 5, -1]
    stacked = np.arange(6 * 3, dtype=np.float32).reshape(6, 3) + 1
    slotted = layout.to_slots(stacked)
    assert slotted.shape == (8, 3) and not slotted[1].any() and not slotted[7].any()  # empty slots are zeros
    np.testing.assert_array_equal(layout.from_slots(slotted), stacked)
    assert StageLayout.of(126, 16).counts == (7,) + (8,) * 14 + (7,)  # Llama 3.1 405B's published split
    assert StageLayout.of(8, 4).plain and StageLayout.of(8, 4).to_slots(stacked) is stacked
    # Circular: 8 layers as 4 groups over 2 stages; stage 0 holds groups 0 and 2, one block of the stack.
    circular = StageLayout.of(8, 2, repeats=2)
    assert circular.slot_layers().tolist() == [0, 1, 4, 5, 2, 3, 6, 7] and not circular.plain
    eight = np.arange(8.0)
    np.testing.assert_array_equal(circular.from_slots(circular.to_slots(eight)), eight)


def run_layout(settings, mesh_cfg, steps=2):
    """(losses of `steps` train steps, gradients of the first batch at the initial parameters), parameters and
    gradients in the plain layer order, on the devices `mesh_cfg` names."""
    cfg = load_config(None, [*settings, *(f"mesh.{k}={v}" for k, v in vars(mesh_cfg).items())])
    mesh = make_mesh(mesh_cfg, jax.devices()[:math.prod(vars(mesh_cfg).values())])
    layout = stage_layout(cfg)
    vocab, t = cfg.model.vocab_size, cfg.train
    starts = np.random.default_rng(0).integers(0, vocab, (steps, t.batch_size, 1))
    batches = ((starts + np.arange(t.seq_len + 1)) % vocab).astype(np.int32)
    with use_mesh(mesh):
        run = build_steps(cfg, mesh, reference.attend, jnp.float32)
        state = run.init()
        first = jax.device_put(batches[0], run.batch_sharding)
        grads = jax.grad(run.eval)(state["params"], first)  # the step's own forward, pipelined
        losses = []
        for tokens in batches:
            state, metrics = run.train(state, jax.device_put(tokens, run.batch_sharding), 0.0)
            losses.append(float(metrics["loss"]))
    plain = map_stacked(jax.tree.map(np.asarray, grads), layout.from_slots)
    return np.array(losses), plain


@pytest.fixture(scope="module")
def one_device():
    return run_layout(SIX_LAYERS, MeshConfig(data=1))


@pytest.mark.parametrize("mesh_cfg,extra", [
    (MeshConfig(pipeline=2, data=1, fsdp=4), []),  # micro-batches = stages
    (MeshConfig(pipeline=4, data=2), ["train.pipeline_microbatches=8"]),  # uneven (1, 2, 2, 1), twice the stages
    # circular (three passes), twice the stages, with tensor parallelism, full remat, gradient accumulation and
    # the loss in 64-token chunks
    (MeshConfig(pipeline=2, data=1, fsdp=2, tensor=2),
     ["train.pipeline_repeats=3", "train.pipeline_microbatches=4", "train.remat=full", "train.grad_accum=2",
      "train.loss_chunk_tokens=64"]),
], ids=["pp2-fsdp4-m2", "pp4-dp2-uneven-m8", "pp2x3-fsdp2-tp2-m4-remat-accum"])
def test_pipelined_training_matches_one_device(one_device, mesh_cfg, extra):
    base_losses, base_grads = one_device
    assert base_losses[-1] < base_losses[0]
    losses, grads = run_layout(SIX_LAYERS + extra, mesh_cfg)
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(base_grads)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        want = base_grads
        for key in path:
            want = want[key.key]
        # rtol 1e-5, and fp32 rounding of sums taken in another order (per micro-batch) at 1e-5 of the leaf's scale
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                   err_msg=jax.tree_util.keystr(path))


def test_each_device_holds_only_its_stage_and_stages_talk_by_collective_permute():
    from chipwise.train.compiled_step import build_train_step

    cfg = load_config(None, SIX_LAYERS + ["mesh.pipeline=4", "mesh.data=1"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:4])
    with use_mesh(mesh):
        step = build_train_step(cfg, mesh, "cpu").compile()
    wq = step.abstract_state["params"]["blocks"]["attn"]["wq"]
    assert wq.shape[0] == 8 and wq.sharding.shard_shape(wq.shape)[0] == 2  # two slots of layers per stage
    hlo = step.train.as_text()
    assert "collective-permute" in hlo and "all-gather" not in hlo  # no device gathers another stage's weights


def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "event" not in r}


def test_relayout_moves_a_state_between_any_two_pipeline_degrees():
    from chipwise.train.pipeline import relayout

    plain = {"params": {"blocks": {"w": np.arange(6.0).reshape(6, 1)}, "embed": np.ones((2, 2))},
             "opt_state": ({"blocks": {"w": np.arange(6.0).reshape(6, 1) * 10}},)}
    four, two = StageLayout.of(6, 4), StageLayout.of(6, 2)
    on_four = relayout(plain, StageLayout((6,)), four)
    assert on_four["params"]["blocks"]["w"][:, 0].tolist() == [0, 0, 1, 2, 3, 4, 5, 0]
    assert on_four["opt_state"][0]["blocks"]["w"][:, 0].tolist() == [0, 0, 10, 20, 30, 40, 50, 0]  # moments too
    assert on_four["params"]["embed"] is plain["params"]["embed"]  # only stacked layers move
    back = relayout(relayout(on_four, four, two), two, StageLayout((6,)))
    np.testing.assert_array_equal(back["opt_state"][0]["blocks"]["w"], plain["opt_state"][0]["blocks"]["w"])


def test_resume_across_pipeline_degrees_continues_with_the_same_losses(tmp_path, corpus):
    """Three layers over two stages are 1, 2: the checkpoint holds four layer slots, the resumed run three."""
    def args(path, steps, *mesh):
        # a constant learning rate after warm-up (min_lr_ratio=1), so that train.steps does not bend the schedule
        return set_args(*TINY_MODEL, "model.num_layers=3", f"train.steps={steps}", "train.checkpoint_every=2",
                        "train.min_lr_ratio=1.0",
                        "train.eval_every=100", "train.log_every=1", f"data.sources=[{corpus}]", f"run_dir={path}",
                        *mesh)

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *args(straight, 6, "mesh.pipeline=2", "mesh.data=4")]) == 0
    assert main(["train", *args(split, 2, "mesh.pipeline=2", "mesh.data=4")]) == 0
    # 2 stages -> none (the other direction, and every pair of degrees, is test_relayout_moves_a_state_...'s)
    assert main(["train", "--resume", str(split), *args(split, 6, "mesh.pipeline=1", "mesh.data=8",
                                                        "model.scan_layers=true")]) == 0
    a, b = losses(straight), losses(split)
    assert set(b) >= {3, 4, 5, 6}
    np.testing.assert_allclose([b[s] for s in (3, 4, 5, 6)], [a[s] for s in (3, 4, 5, 6)], rtol=1e-5)
    # Sampling and export read a pipelined run's checkpoint (four slots) in the plain layer order...
    assert main(["sample", "--run", str(straight), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    exported = tmp_path / "hf"
    assert main(["export", "--run", str(straight), "--out", str(exported)]) == 0
    # ...and a pipelined run started from those weights (--init-from) gets them in its slotted order.
    from chipwise.hf import initial_params
    from chipwise.hf.checkpoint import read_checkpoint

    cfg = load_config(None, [*TINY_MODEL, "model.num_layers=3", "mesh.pipeline=2", "mesh.data=4",
                             f"train.init_from={exported}"])
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        shardings = build_steps(cfg, mesh, reference.attend, jnp.float32).state_shardings["params"]
        slotted = initial_params(cfg, shardings)
    assert slotted["blocks"]["mlp"]["w_up"].shape[0] == 4 and not np.asarray(slotted["blocks"]["mlp"]["w_up"][1]).any()
    _, plain = read_checkpoint(exported, cfg.model.max_seq_len, True)
    back = map_stacked(jax.tree.map(np.asarray, slotted), StageLayout.of(3, 2).from_slots)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("settings,message", [
    (["mesh.pipeline=2", "mesh.data=4"], "leaves stages without a layer"),  # TINY_MODEL has one layer
    (["model.num_layers=2", "mesh.pipeline=2", "mesh.data=4", "train.pipeline_microbatches=3"],
     "must split into train.pipeline_microbatches = 3"),
    (["model.num_layers=2", "mesh.pipeline=2", "mesh.data=4", "model.scan_layers=false"], "model.scan_layers=true"),
    (["model.num_layers=2", "mesh.pipeline=2", "mesh.data=4", "train.pipeline_microbatches=4"],
     "divisible by the data-parallel size 4"),
    (["mesh.pipeline=-1"], "mesh.pipeline must be a positive number of stages"),
    (["model.num_layers=4", "mesh.pipeline=2", "mesh.data=4", "train.pipeline_repeats=3"],
     "6 groups of layers for 4 layers leaves stages without a layer"),
    (["model.num_layers=4", "mesh.pipeline=2", "mesh.data=2", "mesh.fsdp=2", "train.pipeline_repeats=2",
      "train.pipeline_microbatches=1"], "needs at least as many micro-batches as stages: 1 < 2"),
    (["train.pipeline_repeats=2"], "needs a pipeline"),
])
def test_bad_pipeline_layouts_are_refused_in_one_line(tmp_path, corpus, capsys, settings, message):
    run = tmp_path / "run"
    assert main(["train", *set_args(*TINY_MODEL, f"data.sources=[{corpus}]", f"run_dir={run}", *settings)]) == 2
    assert message in one_line_error(capsys)
    assert not run.exists()
