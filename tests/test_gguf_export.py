"""`chipwise export --format gguf`: the file against the Hugging Face export (tensors, config), chipwise's own GGUF
import and transformers' GGUF loading (logits, tokens), the pre-tokenizer it declares, and its refusals."""

import dataclasses
import json
import shutil
from types import SimpleNamespace

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Regex, Tokenizer, pre_tokenizers

from chipwise.cli import main
from chipwise.config import ModelConfig
from chipwise.data.corpus import Document
from chipwise.data.tokenizer import train_tokenizer
from chipwise.errors import ChipwiseError
from chipwise.hf import gguf_file
from chipwise.hf.checkpoint import read_checkpoint, write_checkpoint
from chipwise.hf.gguf_export import EXPORTABLE_SPLITS, permute_rows, pre_tokenizer_name, vocab, write_gguf
from chipwise.model import rope_frequencies
from conftest import TINY_MODEL, one_line_error, require, set_args
from test_hf_convert import LLAMA3_ROPE, chipwise_logits, random_params

TEXT = ("def fn(x):\n    return x + 1  # ünïcödé → 字 🦙\n<|endoftext|>second document, it's 1234567 'RE\t\t tabs "
        "   and   spaces\r\n\n\nnaïve café ДОБРЫЙ день; 3.14159 ٣²½ '''quotes''' ...!!??  \n ")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """chipwise's own trained tokenizer (300 tokens for the model's 320 ids: padding shows)."""
    tok = train_tokenizer([Document("a", TEXT * 3), Document("b", "import os\nprint(os.getcwd())\n")], 300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def model(tie: bool, rope: dict) -> ModelConfig:
    # GQA (4 query heads on 2 KV heads), a non-default theta, and an eps large enough that a wrong one shows.
    return ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, vocab_size=320,
                       tie_embeddings=tie, rope_theta=500.0, norm_eps=0.05, max_seq_len=64, **rope)


def export_both(tmp_path, m, params, tokenizer_file, meta=None):
    """The Hugging Face export in tmp_path/hf and the GGUF one as tmp_path/gguf/model.gguf."""
    hf_dir, path = tmp_path / "hf", tmp_path / "gguf" / "model.gguf"
    hf_dir.mkdir()
    write_checkpoint(hf_dir, m, params, tokenizer_file, tokenizer_meta=meta)
    write_gguf(path, m, params, vocab(json.loads(tokenizer_file.read_text()), m, meta or {}))
    return hf_dir, path


def field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


@pytest.mark.parametrize("tie,rope", [(True, {}), (False, LLAMA3_ROPE)], ids=["tied", "untied-llama3-rope"])
def test_gguf_holds_the_hf_export_tensor_by_tensor(tmp_path, tokenizer_file, tie, rope):
    m = model(tie, rope)
    params = random_params(m, seed=1 + tie)
    hf_dir, path = export_both(tmp_path, m, params, tokenizer_file)
    hf = load_file(str(hf_dir / "model.safetensors"))
    config = json.loads((hf_dir / "config.json").read_text())
    reader = gguf.GGUFReader(str(path))

    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not tie) and ("rope_freqs.weight" in tensors) == bool(rope)
    assert len(tensors) == len(hf) + bool(rope)
    weights = SimpleNamespace(tensors=[t for t in reader.tensors if t.name != "rope_freqs.weight"])
    back = gguf_file.hf_tensors(weights, config)  # names mapped back, q/k permutation undone
    assert set(back) == set(hf)
    for name, value in hf.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    # the permutation itself: head h's row pair (i, i + head_dim/2) becomes rows (2i, 2i + 1)
    q = hf["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(permute_rows(q, 4)[8 + 2 * 3 + 1], q[8 + 4 + 3])
    if rope:  # llama.cpp divides each plain frequency by its rope_freqs entry: chipwise's scaled frequencies
        plain = np.asarray(rope_frequencies(dataclasses.replace(m, rope_type="default")))
        factors = np.asarray(tensors["rope_freqs.weight"].data)
        np.testing.assert_allclose(plain / factors, rope_frequencies(m), rtol=1e-6)
        assert factors.min() == 1.0 and factors.max() == pytest.approx(8.0)

    p = "llama."
    assert field(reader, "general.architecture") == "llama" and field(reader, "general.file_type") == 0
    assert field(reader, p + "context_length") == config["max_position_embeddings"]
    assert field(reader, p + "embedding_length") == config["hidden_size"]
    assert field(reader, p + "block_count") == config["num_hidden_layers"]
    assert field(reader, p + "feed_forward_length") == config["intermediate_size"]
    assert field(reader, p + "attention.head_count") == config["num_attention_heads"]
    assert field(reader, p + "attention.head_count_kv") == config["num_key_value_heads"]
    assert field(reader, p + "rope.dimension_count") == config["head_dim"]
    assert field(reader, p + "rope.freq_base") == config["rope_theta"]
    assert field(reader, p + "attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(reader, p + "vocab_size") == config["vocab_size"] == len(field(reader, "tokenizer.ggml.tokens"))
    assert field(reader, "tokenizer.ggml.eos_token_id") == config["eos_token_id"] == 0
    assert field(reader, "tokenizer.ggml.bos_token_id") == config["bos_token_id"] == 0
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2" and field(reader, "tokenizer.ggml.model") == "gpt2"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[0] == 3 and set(types[1:300]) == {1} and set(types[300:]) == {5}  # CONTROL, NORMAL, UNUSED
    assert field(reader, "tokenizer.ggml.tokens")[300:302] == ["[PAD300]", "[PAD301]"]
    # gguf_file's own reading of the metadata is the Hugging Face config, the rope scaling (which a GGUF states only
    # as the rope_freqs tensor) included
    read = gguf_file.hf_config(reader)
    assert read.pop("rms_norm_eps") == pytest.approx(config["rms_norm_eps"])  # stored as float32
    assert read == {k: config[k] for k in read} and ("rope_scaling" in read) and "rope_theta" in read


def test_llama3_rope_round_trips_through_gguf_import(tmp_path, tokenizer_file):
    m = model(False, LLAMA3_ROPE)
    params = random_params(m, seed=3)
    _, path = export_both(tmp_path, m, params, tokenizer_file)
    m2, back = read_checkpoint(gguf_file.to_hf_dir(path, tmp_path / "back"), m.max_seq_len)
    assert m2 == dataclasses.replace(m, norm_eps=m2.norm_eps)  # rope_type llama3 and its four numbers
    tokens = np.random.default_rng(1).integers(0, m.vocab_size, (2, 64))  # up to original_max_position_embeddings
    np.testing.assert_array_equal(chipwise_logits(m2, back, tokens), chipwise_logits(m, params, tokens))


def rope_freqs_reader(factors):
    return SimpleNamespace(tensors=[SimpleNamespace(name="rope_freqs.weight", data=np.asarray(factors, np.float32))])


@pytest.mark.parametrize("head_dim,theta,factor,low,high,original", [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B / 70B / 405B
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
    (128, 500000.0, 16.0, 2.0, 8.0, 16384),  # another low_freq_factor: the same frequencies as (1, 4, 8192)
    (8, 500.0, 8.0, 1.0, 4.0, 64),  # one frequency in the blend
    (8, 10000.0, 4.0, 1.0, 4.0, 4096),  # none in the blend: a step from kept to divided
])
def test_rope_freqs_give_back_scaling_with_the_same_frequencies(head_dim, theta, factor, low, high, original):
    m = ModelConfig(d_model=head_dim, num_heads=1, num_kv_heads=1, rope_theta=theta, rope_type="llama3",
                    rope_factor=factor, rope_low_freq_factor=low, rope_high_freq_factor=high,
                    rope_original_max_seq_len=original)
    scaling = gguf_file.rope_scaling(rope_freqs_reader(gguf_file.rope_factors(m)), theta, head_dim)
    back = dataclasses.replace(m, rope_factor=scaling["factor"], rope_low_freq_factor=scaling["low_freq_factor"],
                               rope_high_freq_factor=scaling["high_freq_factor"],
                               rope_original_max_seq_len=scaling["original_max_position_embeddings"])
    np.testing.assert_allclose(rope_frequencies(back), rope_frequencies(m), rtol=1e-6)
    if low == 1.0 and head_dim > 8:  # a real Llama 3.x config comes back as it was
        assert scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                           "original_max_position_embeddings": original}


def test_rope_freqs_that_are_not_llama3_scaling_are_refused():
    good = gguf_file.rope_factors(ModelConfig(d_model=128, num_heads=1, num_kv_heads=1, rope_theta=500000.0,
                                              rope_type="llama3", rope_factor=8.0))
    for bad in (good[::-1], good[:-1], good * 0.5, np.where(np.arange(64) == 40, 3.0, good)):
        with pytest.raises(ChipwiseError, match="rope_freqs.weight is not Llama 3.1's RoPE scaling"):
            gguf_file.rope_scaling(rope_freqs_reader(bad), 500000.0, 128)
    assert gguf_file.rope_scaling(rope_freqs_reader(np.ones(64)), 500000.0, 128) is None


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_chipwise_gguf_import_round_trip_gives_identical_logits(tmp_path, tokenizer_file, tie):
    m = model(tie, {})
    params = random_params(m, seed=5 + tie)
    _, path = export_both(tmp_path, m, params, tokenizer_file)
    m2, back = read_checkpoint(gguf_file.to_hf_dir(path, tmp_path / "back"), m.max_seq_len)
    assert m2 == dataclasses.replace(m, norm_eps=m2.norm_eps) and m2.norm_eps == np.float32(m.norm_eps)  # GGUF: f32
    jax.tree.map(np.testing.assert_array_equal, back, params)
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 24))
    np.testing.assert_array_equal(chipwise_logits(m2, back, tokens), chipwise_logits(m, params, tokens))


def test_transformers_gguf_loading_gives_the_same_logits_and_tokens(tmp_path, tokenizer_file):
    torch = require("torch")
    transformers = require("transformers")
    m = model(False, {})
    params = random_params(m, seed=7)
    _, path = export_both(tmp_path, m, params, tokenizer_file)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           torch_dtype=torch.float32, attn_implementation="eager")
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = hf.eval()(torch.tensor(tokens)).logits.numpy()
    ours = chipwise_logits(m, params, tokens)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4

    # The declared pre-tokenizer ("gpt-2") splits text as chipwise's tokenizer does.
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours_tok = Tokenizer.from_file(str(tokenizer_file))
    for text in (TEXT, TEXT * 4, " leading space", "\t\n", "trailing   ", "x" * 300):
        ids = ours_tok.encode(text).ids
        assert hf_tok.encode(text, add_special_tokens=True) == ids, text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == "<|endoftext|>"


def smollm_tokenizer(tokenizer_file) -> dict:
    """chipwise's vocabulary behind SmolLM2's split (each digit alone, then GPT-2's)."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return json.loads(tok.to_str())


def test_declared_split_round_trips_through_chipwise_import(tmp_path, tokenizer_file):
    """Both exportable splits of a chipwise vocabulary: chipwise's GGUF import rebuilds the tokenizer from the
    declared name alone and it tokenizes as the run's does; special tokens and chat template travel too."""
    m = model(True, {})
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    meta = {"special_tokens": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                               "pad_token": "<|endoftext|>"},
            "chat_template": template, "generation": {"bos_token_id": 0, "eos_token_id": [0, 7], "pad_token_id": 0}}
    for tok_json, name in ((json.loads(tokenizer_file.read_text()), "gpt-2"),
                           (smollm_tokenizer(tokenizer_file), "smollm")):
        tokens = vocab(tok_json, m, meta)
        assert tokens["tokenizer.ggml.pre"] == name and tokens["tokenizer.ggml.eot_token_id"] == 7
        path = tmp_path / name / "model.gguf"
        write_gguf(path, m, random_params(m, 0), tokens)
        back = gguf_file.to_hf_dir(path, tmp_path / name / "back")
        theirs, ours = Tokenizer.from_file(str(back / "tokenizer.json")), Tokenizer.from_str(json.dumps(tok_json))
        for text in (TEXT, "x" * 300, "2024-12-31 ٣²½"):
            assert theirs.encode(text).ids == ours.encode(text).ids, (name, text)
        config = json.loads((back / "tokenizer_config.json").read_text())
        assert config["chat_template"] == template and config["pad_token"] == "<|endoftext|>"


def test_a_bos_the_tokenizer_adds_is_declared(tokenizer_file):
    """llama.cpp adds a BOS only when the file says so; a tokenizer whose post-processor prepends one says so."""
    from tokenizers import processors

    m = model(True, {})
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([processors.ByteLevel(), processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])])
    tokens = vocab(json.loads(tok.to_str()), m, {})
    assert tokens["tokenizer.ggml.add_bos_token"] is True and tokens["tokenizer.ggml.bos_token_id"] == bos
    assert tokens["tokenizer.ggml.eos_token_id"] == 0 and tokens["tokenizer.ggml.add_eos_token"] is False
    assert tokens["tokenizer.ggml.token_type"][bos] == 3  # CONTROL
    tok.post_processor = processors.BertProcessing(("<s>", bos), ("<s>", bos))
    with pytest.raises(ChipwiseError, match="BertProcessing post-processor"):
        vocab(json.loads(tok.to_str()), m, {})


LLAMA3_JSON = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": gguf_file._LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_pre_tokenizer_names_are_the_ones_chipwise_import_reads_back():
    for steps, name in EXPORTABLE_SPLITS.items():
        assert gguf_file.PRE_TOKENIZERS[name] == steps
    model_json = {"type": "BPE", "vocab": {}, "merges": []}
    assert pre_tokenizer_name({"model": {**model_json, "ignore_merges": True}, "pre_tokenizer": LLAMA3_JSON}) == \
        "llama-bpe"
    with pytest.raises(ChipwiseError, match="ignore_merges=False"):  # llama.cpp would ignore merges: refused
        pre_tokenizer_name({"model": model_json, "pre_tokenizer": LLAMA3_JSON})


@pytest.mark.parametrize("pre,found", [
    (pre_tokenizers.Metaspace(), "Metaspace"),
    (pre_tokenizers.ByteLevel(add_prefix_space=True), "ByteLevel(add_prefix_space=True, use_regex=True)"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), "isolated"),
                              pre_tokenizers.ByteLevel(use_regex=False)]), r"Split('\\p{N}{1,3}', Isolated)"),
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel()]),
     "Digits(individual_digits=False)"),
    (None, "none"),
])
def test_an_unknown_pre_tokenizer_is_refused_naming_it(tokenizer_file, pre, found):
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.pre_tokenizer = pre
    with pytest.raises(ChipwiseError) as err:
        pre_tokenizer_name(json.loads(tok.to_str()))
    assert found in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("gguf-run") / "run"
    settings = [*TINY_MODEL, "train.steps=1", "train.checkpoint_every=1", "train.eval_every=1",
                f"data.sources=[{corpus}]", f"run_dir={run}"]
    assert main(["train", *set_args(*settings)]) == 0
    return run


@pytest.mark.slow
def test_export_command_writes_refuses_and_overwrites(tmp_path, run, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0  # .gguf implies --format gguf
    assert "GGUF" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    assert field(reader, "general.name") == "run" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    before = out.read_bytes()

    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in one_line_error(capsys) and out.read_bytes() == before
    assert main(["export", "--run", str(run), "--out", str(out), "--format", "gguf", "--overwrite"]) == 0
    assert out.read_bytes() == before  # the same run, byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left behind

    # Rejected commands create nothing.
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "x"), "--format", "gguf",
                 "--max-shard-size", "1GB"]) == 2
    assert "--max-shard-size" in one_line_error(capsys)
    assert main(["export", "--run", str(run), "--out", str(tmp_path), "--format", "gguf"]) == 2
    assert "directory" in one_line_error(capsys)
    odd = tmp_path / "odd"
    shutil.copytree(run, odd)
    tok = json.loads((odd / "tokenizer.json").read_text())
    (odd / "tokenizer.json").write_text(json.dumps({**tok, "pre_tokenizer": {"type": "Whitespace"}}))
    assert main(["export", "--run", str(odd), "--out", str(tmp_path / "odd.gguf")]) == 2
    assert "Whitespace" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "odd"]
    # --format hf stays the default for any other --out
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("pre", ["default", None], ids=["default", "absent"])
def test_llama_cpps_default_split_is_its_four_regexes_in_turn(tmp_path, pre):
    """llama.cpp splits a "default" BPE (also what a file without tokenizer.ggml.pre gets) by punctuation runs,
    GPT-2's pattern, numbers and then three digits at a time, each split applied to every piece of the one before
    (src/llama-vocab.cpp); GPT-2's split alone keeps " 12345" whole."""
    from tokenizers import decoders

    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list([*sorted(pre_tokenizers.ByteLevel.alphabet()), "ab"])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = gguf_file.tokenizer(gguf.GGUFReader(str(tmp_path / "tok.gguf")))
    text = "Hello, world!! 12345 ab+c"
    pieces = [decoders.ByteLevel().decode([p]) for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == ["Hello", ",", " world", "!!", " ", "123", "45", " ab", "+", "c"]
    assert tok.decode(tok.encode(TEXT).ids) == TEXT
