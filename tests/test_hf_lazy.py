"""Hugging Face checkpoints read and written one tensor at a time (hf/checkpoint.py): the same params and the same
files, byte for byte, as the eager code that held the whole model in host memory, and each process reading only the
windows its devices hold."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from chipwise.attention import reference
from chipwise.config import ModelConfig, load_config
from chipwise.errors import ChipwiseError
from chipwise.hf import checkpoint as ck
from chipwise.hf import safetensors_io as sio
from chipwise.hf import convert, initial_params
from chipwise.model import Transformer
from chipwise.sharding import make_mesh, use_mesh
from chipwise.train.pipeline import StageLayout, map_stacked
from chipwise.train.step import build_steps, stage_layout
from conftest import TINY_MODEL

# GQA (4 query heads on 2 KV heads) and an untied head, so every layout of convert.LAYER_TENSORS is exercised.
SHAPE = ["model.num_layers=3", "model.num_heads=4", "model.num_kv_heads=2", "model.tie_embeddings=false"]
MODEL = ModelConfig(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, vocab_size=320,
                    tie_embeddings=False, max_seq_len=64)


def random_params(m: ModelConfig, seed: int = 0) -> dict:
    """Random params of `m` (built by the eager converter, which test_hf_convert checks against the model's own)."""
    rng = np.random.default_rng(seed)
    tensors = {k: rng.normal(0, 0.3, shape).astype(np.float32) for k, shape in convert.expected_shapes(m).items()}
    return convert.from_hf_tensors(tensors, m)


def test_random_params_have_the_models_structure():
    for scan in (False, True):
        m = dataclasses.replace(MODEL, num_layers=2, scan_layers=scan)
        model = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(nnx.eval_shape(
            lambda: Transformer(m, nnx.Rngs(params=0))))))
        assert jax.tree.map(lambda x: x.shape, random_params(m)) == model


def eager_files(out, m: ModelConfig, params: dict, max_bytes: int, dtype=np.float32) -> list[str]:
    """What export wrote before: every tensor converted at once, each shard by safetensors.numpy.save_file."""
    tensors = {k: v.astype(dtype) for k, v in convert.to_hf_tensors(params, m).items()}
    groups = ck.shard(tensors, max_bytes)
    files = ([ck.SINGLE_FILE] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for name, group in zip(files, groups):
        save_file(group, str(out / name), metadata={"format": "pt"})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": {k: name for name, g in zip(files, groups) for k in g}}
        (out / ck.INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files


def eager_read(hf_dir, m: ModelConfig) -> dict:
    """What read_checkpoint returned before: every tensor read whole, then converted at once."""
    tensors = {}
    for path in ck.weight_files(hf_dir):
        tensors.update(load_file(str(path)))
    return convert.from_hf_tensors(tensors, m)


def hf_dir(path, m: ModelConfig, params: dict, dtype: str = "F32", max_bytes: int = 10**9):
    """An HF checkpoint directory of `params` with weights stored as `dtype` (the streaming writer's own)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(convert.hf_config(m, 0)))
    tensors = {t.name: t for t in convert.hf_tensors(m)}
    sizes = {name: math.prod(t.hf_shape) * ck.DTYPES[dtype].itemsize for name, t in tensors.items()}
    groups = ck.shard_names(sizes, max_bytes)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(files, groups):
        sio.write_safetensors(path / name, {k: tensors[k].hf_shape for k in group}, dtype,
                             lambda k: sio.hf_value(params, tensors[k]))
    (path / ck.INDEX_FILE).write_text(json.dumps({"weight_map": {k: f for f, g in zip(files, groups) for k in g}}))
    return path


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("max_bytes", [10**9, 40_000], ids=["one-file", "sharded"])
def test_export_writes_the_eager_exports_files_byte_for_byte(tmp_path, scan, max_bytes):
    m = dataclasses.replace(MODEL, scan_layers=scan)
    params = random_params(m)
    old, new, placed = tmp_path / "old", tmp_path / "new", tmp_path / "placed"
    for d in (old, new, placed):
        d.mkdir()
    files = eager_files(old, m, params, max_bytes)
    assert ck.write_weights(new, m, params, max_bytes) == files
    # From arrays on devices (sharded over all eight), fetched one tensor (one layer of a stacked one) at a time.
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))

    def spread(x):  # the first axis that splits four ways, split over "b"; replicated over "a"
        axis = next(i for i, n in enumerate(x.shape) if n % 4 == 0)
        spec = jax.sharding.PartitionSpec(*[None] * axis, "b")
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    on_devices = jax.tree.map(spread, params)
    assert ck.write_weights(placed, m, on_devices, max_bytes) == files
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in new.iterdir())
    for path in old.iterdir():
        assert (new / path.name).read_bytes() == path.read_bytes() == (placed / path.name).read_bytes(), path.name


def test_bf16_files_are_what_save_file_writes(tmp_path):
    params = random_params(MODEL)
    hf_dir(tmp_path / "new", MODEL, params, "BF16", max_bytes=10**9)
    (tmp_path / "old").mkdir()
    eager_files(tmp_path / "old", MODEL, params, 10**9, ml_dtypes.bfloat16)
    assert ((tmp_path / "new" / "model-00001-of-00001.safetensors").read_bytes() ==
            (tmp_path / "old" / ck.SINGLE_FILE).read_bytes())


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_read_checkpoint_equals_the_eager_reader(tmp_path, scan, dtype):
    params = random_params(MODEL)
    path = hf_dir(tmp_path / "hf", MODEL, params, dtype, max_bytes=50_000)
    m, back = ck.read_checkpoint(path, scan_layers=scan)
    assert m == dataclasses.replace(MODEL, scan_layers=scan)
    want = eager_read(path, m)
    assert jax.tree.structure(back) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype,mesh,scan,on_host", [
    ("F32", ["mesh.fsdp=4", "mesh.tensor=2"], False, None),
    ("BF16", ["mesh.fsdp=4", "mesh.tensor=2"], False, False),
    ("BF16", ["mesh.fsdp=4", "mesh.tensor=2"], True, None),
    ("BF16", ["mesh.fsdp=4", "mesh.tensor=2"], True, False),
    ("F32", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], True, None),  # replicated over data: each window read once
    ("BF16", ["mesh.pipeline=2", "mesh.fsdp=2", "mesh.tensor=2"], True, False),  # 3 layers in 4 slots, one empty
], ids=["unrolled-fsdp-tensor", "unrolled-bf16-widened-on-device", "scanned-bf16-widened-on-host",
        "scanned-bf16-widened-on-device", "scanned-data-replicas", "pipeline-bf16"])
def test_placed_params_read_only_their_devices_windows(tmp_path, monkeypatch, dtype, mesh, scan, on_host):
    """on_host None: initial_params itself, which on these CPU devices widens bf16 as it reads; False: as on an
    accelerator, bf16 read as bf16 and widened on the devices."""
    params = random_params(MODEL)
    path = hf_dir(tmp_path / "hf", MODEL, params, dtype, max_bytes=50_000)
    cfg = load_config(None, [*TINY_MODEL, *SHAPE, *mesh, f"model.scan_layers={str(scan).lower()}",
                             f"train.init_from={path}"])
    assert dataclasses.replace(cfg.model, scan_layers=None) == MODEL
    reads = []
    read = ck.WeightReader.read

    def counted(self, name, window=(), as_dtype=None):
        out = read(self, name, window, as_dtype)
        reads.append((name, out.size, out.dtype))
        return out

    monkeypatch.setattr(ck.WeightReader, "read", counted)
    devices = make_mesh(cfg.mesh)
    with use_mesh(devices):
        shardings = build_steps(cfg, devices, reference.attend, jnp.float32).state_shardings["params"]
    if on_host is None:
        placed = initial_params(cfg, shardings)
    else:
        slots = stage_layout(cfg).slot_layers() if scan else None
        placed = ck.place_checkpoint(path, cfg.model, shardings, slots, widen_on_host=on_host)
    stored = ml_dtypes.bfloat16 if dtype == "BF16" and on_host is False else np.float32
    assert {dtype for _, _, dtype in reads} == {np.dtype(stored)}

    # The eager reader's params, in the run's slotted layer order.
    layout = StageLayout.of(3, 2) if "mesh.pipeline=2" in mesh else StageLayout.none(3)
    want = map_stacked(eager_read(path, cfg.model), layout.to_slots)
    assert jax.tree.structure(placed) == jax.tree.structure(want)
    for got, expected, sharding in zip(jax.tree.leaves(placed), jax.tree.leaves(want), jax.tree.leaves(shardings)):
        assert got.dtype == jnp.float32 and got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), expected)

    # Every element of every tensor read exactly once, each time one device's share of one layer.
    shares = {}
    for t in convert.hf_tensors(cfg.model):
        leaf, sharding = want, shardings
        for key in t.path:
            leaf, sharding = leaf[key], sharding[key]
        shard = sharding.shard_shape(leaf.shape)
        shares[t.name] = math.prod(shard[1:] if t.layer is not None else shard)
    sizes = {t.name: math.prod(t.shape) for t in convert.hf_tensors(cfg.model)}
    read_sizes = {}
    for name, size, _ in reads:
        read_sizes.setdefault(name, []).append(size)
    assert read_sizes.keys() == sizes.keys()
    for name, got in read_sizes.items():
        assert sum(got) == sizes[name] and set(got) == {shares[name]}, (name, got, shares[name])
    assert any(shares[name] < sizes[name] for name in sizes)


def test_bad_weights_are_refused_in_one_line_naming_the_tensor_or_file(tmp_path):
    params = random_params(MODEL)
    path = hf_dir(tmp_path / "hf", MODEL, params, max_bytes=10**9)
    weights = path / "model-00001-of-00001.safetensors"
    tensors = load_file(str(weights))

    def refused(match):
        with pytest.raises(ChipwiseError, match=match) as err:
            ck.read_checkpoint(path)
        assert "\n" not in str(err.value)

    save_file({**tensors, "model.norm.weight": tensors["model.norm.weight"].astype(np.int32)}, str(weights))
    refused("tensor model.norm.weight is stored as I32")
    save_file(tensors, str(weights))
    weights.write_bytes(weights.read_bytes()[:-100])
    refused("model-00001-of-00001.safetensors is not a valid safetensors file")
    tied = dataclasses.replace(MODEL, tie_embeddings=True)
    (path / "config.json").write_text(json.dumps(convert.hf_config(tied, 0)))
    save_file(tensors, str(weights))
    refused("lm_head.weight differs from model.embed_tokens.weight")
    # A tied checkpoint carrying an equal copy of the head (compared a chunk of rows at a time) loads.
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, str(weights))
    ck.READ_CHUNK, chunk = 4096, ck.READ_CHUNK
    try:
        m, back = ck.read_checkpoint(path)
    finally:
        ck.READ_CHUNK = chunk
    assert m.tie_embeddings and "lm_head" not in back
