"""Hugging Face Llama conversion against `transformers` itself: logits, tokenizer, sharding, and refusals."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from chipwise.config import ModelConfig
from chipwise.errors import ChipwiseError
from chipwise.hf import convert
from chipwise.hf.checkpoint import parse_size, read_checkpoint, write_checkpoint
from chipwise.model import Transformer, layer_params
from conftest import require

torch = require("torch")
transformers = require("transformers")

TEXT = "def fn(x):\n    return x + 1  # ünïcödé → 字\n<|endoftext|>second document"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3, "import os\nprint(os.getcwd())\n"], trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def random_params(m: ModelConfig, seed: int) -> dict:
    """A model's params with every entry random, norm scales included, so a swapped tensor cannot hide."""
    params = nnx.to_pure_dict(nnx.state(Transformer(m, nnx.Rngs(params=seed))))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.3, x.shape).astype(np.float32), params)


def chipwise_logits(m: ModelConfig, params, tokens) -> np.ndarray:
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(params=0))))
    return np.asarray(nnx.merge(graphdef, params)(np.asarray(tokens, np.int32)))


def hf_logits(path, tokens) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


# Llama 3.1's rope scaling at a context where, with theta 500 and head size 8, the four frequencies fall one in the
# kept band, one in the blend and two in the stretched band.
LLAMA3_ROPE = dict(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_seq_len=64)


# GQA (4 query heads on 2 KV heads), a non-default theta, and an eps large enough that a wrong one shows.
@pytest.mark.parametrize("tie,rope", [(True, {}), (False, LLAMA3_ROPE)], ids=["tied", "untied-llama3-rope"])
def test_transformers_logits_match_chipwise(tmp_path, tokenizer_file, tie, rope):
    m = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, vocab_size=300,
                    tie_embeddings=tie, rope_theta=500.0, norm_eps=0.05, max_seq_len=64, **rope)
    params = random_params(m, seed=1 + tie)
    write_checkpoint(tmp_path, m, params, tokenizer_file)
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 24))
    ours, theirs = chipwise_logits(m, params, tokens), hf_logits(tmp_path, tokens)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4
    assert ("lm_head.weight" in read_safetensor_names(tmp_path)) == (not tie)

    # Reading back gives the very same arrays.
    m2, back = read_checkpoint(tmp_path, m.max_seq_len)
    assert m2 == m
    jax.tree.map(np.testing.assert_array_equal, back, params)


def read_safetensor_names(path):
    from safetensors import safe_open

    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as handle:
            names |= set(handle.keys())
    return names


def test_sharded_checkpoint_loads_in_transformers_and_back(tmp_path, tokenizer_file):
    m = ModelConfig(num_layers=3, d_model=32, num_heads=2, num_kv_heads=1, d_ff=64, vocab_size=300,
                    tie_embeddings=False, max_seq_len=64)
    params = random_params(m, seed=3)
    files = write_checkpoint(tmp_path, m, params, tokenizer_file, max_shard_bytes=parse_size("40KB"))
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert all((tmp_path / f).stat().st_size < 40_000 + 50_000 for f in files)  # header + one oversize tensor
    tokens = [[5, 17, 250, 3, 0, 9]]
    ours, theirs = chipwise_logits(m, params, tokens), hf_logits(tmp_path, tokens)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4
    _, back = read_checkpoint(tmp_path, m.max_seq_len)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_auto_tokenizer_encodes_like_chipwise(tmp_path, tokenizer_file):
    m = ModelConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, d_ff=32, vocab_size=300)
    write_checkpoint(tmp_path, m, random_params(m, 0), tokenizer_file)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_file(str(tokenizer_file))
    for text in (TEXT, " leading space", "\t\n", "naïve café"):
        ids = ours.encode(text).ids
        assert theirs.encode(text) == ids  # no BOS or EOS added
        assert theirs.decode(ids) == text
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == 0


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200MiB") == 200 * 2**20
    assert parse_size("1000") == 1000 and parse_size("1.5kb") == 1500
    for bad in ("", "-1GB", "5 TB", "lots", "0"):
        with pytest.raises(ChipwiseError, match="max-shard-size"):
            parse_size(bad)


def test_gelu_models_cannot_be_exported():
    with pytest.raises(ChipwiseError, match="model.ffn is 'gelu'"):
        convert.hf_config(ModelConfig(ffn="gelu"), 0)


BASE = convert.hf_config(ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
                                     vocab_size=300), 0)


@pytest.mark.parametrize("field,value", [
    ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"), ("architectures", ["MistralForCausalLM"]),
    ("model_type", "gpt2"), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0}), ("head_dim", 16),
    ("num_hidden_layers", 0),
    # llama3 scaling with one of its four numbers missing: the message names it
    ("low_freq_factor", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),  # rope_parameters (BASE's) says default
])
def test_unrepresentable_configs_name_the_field(field, value):
    config = {**BASE, "rope_parameters": value} if field == "low_freq_factor" else {**BASE, field: value}
    with pytest.raises(ChipwiseError, match=f"field {field}=") as err:
        convert.model_config(config)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rope", [{}, LLAMA3_ROPE], ids=["default", "llama3"])
def test_hf_config_round_trips_to_model_config(rope):
    m = ModelConfig(num_layers=3, d_model=64, num_heads=8, num_kv_heads=2, d_ff=96, vocab_size=500,
                    tie_embeddings=False, rope_theta=1e6, norm_eps=1e-6, max_seq_len=128, **rope)
    assert convert.model_config(convert.hf_config(m, 0)) == m
    # transformers 4.x configs carry rope_theta and rope_scaling at the top level and no rope_parameters
    legacy = {k: v for k, v in convert.hf_config(m, 0).items() if k != "rope_parameters"}
    assert convert.model_config(legacy) == m


def test_llama3_rope_frequencies_are_transformers_own():
    """The 1b preset's (Llama 3.2 1B's) rotary frequencies against transformers' llama3 rope initialiser."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from chipwise.model import rope_frequencies
    from chipwise.presets import PRESETS

    m = ModelConfig(**PRESETS["1b"])
    hf = transformers.LlamaConfig(**convert.hf_config(m, 0))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert attention_factor == 1.0
    np.testing.assert_allclose(rope_frequencies(m), inv_freq.numpy(), rtol=1e-6)
    plain = rope_frequencies(dataclasses.replace(m, rope_type="default"))
    assert plain[0] == rope_frequencies(m)[0] and plain[-1] == pytest.approx(32 * rope_frequencies(m)[-1])


def test_tensor_problems_name_the_tensor():
    m = ModelConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, d_ff=32, vocab_size=300)
    shapes = convert.expected_shapes(m)
    with pytest.raises(ChipwiseError, match="model.layers.0.self_attn.q_proj.bias has no place"):
        convert.check_tensors({**shapes, "model.layers.0.self_attn.q_proj.bias": (16,)}, m)
    with pytest.raises(ChipwiseError, match="model.norm.weight is missing"):
        convert.check_tensors({k: v for k, v in shapes.items() if k != "model.norm.weight"}, m)
    with pytest.raises(ChipwiseError, match=r"mlp.up_proj.weight has shape \(32, 17\)"):
        convert.check_tensors({**shapes, "model.layers.0.mlp.up_proj.weight": (32, 17)}, m)


def test_bf16_checkpoints_are_read_and_widened(tmp_path, tokenizer_file):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    m = ModelConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=1, d_ff=32, vocab_size=300)
    params = random_params(m, 4)
    write_checkpoint(tmp_path, m, params, tokenizer_file)
    weights = tmp_path / "model.safetensors"
    narrow = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(weights)).items()}
    save_file(narrow, str(weights), metadata={"format": "pt"})
    read_model, back = read_checkpoint(tmp_path)
    assert layer_params(back, 0, read_model)["attn"]["wq"].dtype == np.float32
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2), back, params)
