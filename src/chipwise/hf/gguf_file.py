"""GGUF files in (llama.cpp's format, read with the `gguf` package): a Llama GGUF becomes a Hugging Face Llama
directory (config.json, fp32 model.safetensors, tokenizer.json with its special tokens, tokenizer_config.json with
the chat template, generation_config.json), which the rest of chipwise reads as any other (`train --init-from`,
`serve --hf`, `export`'s round trip).

Three things differ from a Hugging Face checkpoint:
- names and shapes: `blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight`; numpy sees GGUF's shapes
  reversed, which is Hugging Face's [out, in];
- llama.cpp's converter permutes the rows of q and k so that each head's rotary pairs are adjacent (the original
  Llama layout); chipwise, like Hugging Face, pairs the two halves of a head, so the permutation is undone;
- quantised tensors (Q4_1, Q8_0, K-quants, ...) are dequantised to fp32 by the `gguf` package.

The tokenizer is rebuilt from the vocabulary and merges the file carries; how text is split before BPE is named
by `tokenizer.ggml.pre`, and only the splits in PRE_TOKENIZERS (data, below) are known here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from chipwise.errors import ChipwiseError
from chipwise.hf.convert import ARCHITECTURE

# llama.cpp's pre-tokenizer names -> how `tokenizers` splits text the same way (before byte-level BPE).
# Llama 3's split pattern: contractions, letters with one leading non-letter, digits in threes, punctuation runs.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": ("byte_level",),
    "gpt-2": ("byte_level",),
    "smollm": ("single_digits", "byte_level"),  # SmolLM's (StarCoder's): each digit alone, then GPT-2's split
    "starcoder": ("single_digits", "byte_level"),
    "llama-bpe": ("llama3_split", "byte_level_no_regex"),
    "llama3": ("llama3_split", "byte_level_no_regex"),
}
# GGUF tensor names -> Hugging Face Llama's (per layer: blk.N.<key>)
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types that are special tokens


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise ChipwiseError(f"{path} is not a readable GGUF file ({e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _require(reader, key: str):
    value = _field(reader, key)
    if value is None:
        raise ChipwiseError(f"the GGUF file has no {key}; chipwise needs it to know the model's shape")
    return value


def hf_config(reader) -> dict:
    """A Hugging Face Llama config.json from the file's metadata, or a one-line error naming the field."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ChipwiseError(f"general.architecture is {arch!r}; chipwise reads Llama-architecture GGUF files only")
    p = "llama."
    if _field(reader, p + "expert_count"):
        raise ChipwiseError("llama.expert_count is set: a mixture of experts, which chipwise's dense model is not")
    scaling = _field(reader, p + "rope.scaling.type")
    if scaling not in (None, "none"):
        raise ChipwiseError(f"llama.rope.scaling.type is {scaling!r}; chipwise supports unscaled RoPE and Llama 3.1's "
                            f"(import the Hugging Face checkpoint for the latter)")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ChipwiseError("the file carries rope_freqs.weight (Llama 3.1's RoPE scaling as precomputed factors); "
                            "import the model's Hugging Face checkpoint instead, whose config names the scaling")
    heads, d = int(_require(reader, p + "attention.head_count")), int(_require(reader, p + "embedding_length"))
    head_dim = int(_field(reader, p + "rope.dimension_count", d // heads))
    if head_dim * heads != d:
        raise ChipwiseError(f"llama.rope.dimension_count is {head_dim}, but chipwise rotates whole heads of "
                            f"embedding_length / head_count = {d // heads}")
    vocab = _field(reader, p + "vocab_size") or len(_require(reader, "tokenizer.ggml.tokens"))
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_size": d,
        "intermediate_size": int(_require(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_require(reader, p + "block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)), "head_dim": head_dim,
        "vocab_size": int(vocab), "max_position_embeddings": int(_field(reader, p + "context_length", 2048)),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)), "hidden_act": "silu",
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"), "torch_dtype": "float32",
    }


def hf_tensors(reader, config: dict) -> dict[str, np.ndarray]:
    """Every tensor dequantised to fp32 under its Hugging Face name, q and k rows back in Hugging Face's order."""
    from gguf import GGMLQuantizationType, quants

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = {}
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_TENSORS:
            name = f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{kind}"
        elif base in GLOBAL_TENSORS:
            name = f"{GLOBAL_TENSORS[base]}.{kind}"
        else:
            raise ChipwiseError(f"the GGUF file has a tensor {t.name}, which a chipwise Llama has no place for")
        qtype = GGMLQuantizationType(t.tensor_type)
        try:
            value = np.asarray(quants.dequantize(t.data, qtype), np.float32)
        except NotImplementedError:
            raise ChipwiseError(f"{t.name} is quantised as {qtype.name}, which the gguf package cannot dequantise; "
                                f"convert the model with another quantisation (e.g. Q8_0, F16)") from None
        value = value.reshape(tuple(int(n) for n in reversed(t.shape)))
        if parts[-1] in ("attn_q", "attn_k"):  # undo llama.cpp's rotary-pair permutation of the rows
            n = heads if parts[-1] == "attn_q" else kv_heads
            value = value.reshape(n, -1, 2, value.shape[-1]).swapaxes(1, 2).reshape(value.shape)
        out[name] = np.ascontiguousarray(value)
    return out


def tokenizer(reader):
    """The file's BPE tokenizer as a `tokenizers.Tokenizer`, with its control tokens as special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ChipwiseError(f"tokenizer.ggml.model is {model!r}; chipwise rebuilds byte-level BPE ('gpt2') "
                            f"tokenizers only")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ChipwiseError(f"tokenizer.ggml.pre is {pre!r}, a text split chipwise does not know (it knows "
                            f"{', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = list(_require(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _require(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    steps = {"single_digits": lambda: pre_tokenizers.Digits(individual_digits=True),
             "byte_level": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
             "byte_level_no_regex": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
             "llama3_split": lambda: pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")}
    tok.pre_tokenizer = pre_tokenizers.Sequence([steps[s]() for s in PRE_TOKENIZERS[pre]])
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type") or []
    special = [AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
               for i in range(len(types)) if types[i] in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([t for t in special if t.special])
    tok.add_tokens([t for t in special if not t.special])
    if _field(reader, "tokenizer.ggml.add_bos_token"):
        from tokenizers import processors

        bos = tokens[int(_require(reader, "tokenizer.ggml.bos_token_id"))]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tokens.index(bos))])
    return tok


def to_hf_dir(path: str | Path, out: str | Path) -> Path:
    """Write the GGUF file at `path` as a Hugging Face Llama directory `out` (created if need be)."""
    from safetensors.numpy import save_file

    path, out = Path(path), Path(out)
    reader = _reader(path)
    config = hf_config(reader)
    tok = tokenizer(reader)
    tensors = hf_tensors(reader, config)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(out / "tokenizer.json"))
    tokens = tok.get_vocab(with_added_tokens=True)
    names = {i: t for t, i in tokens.items()}
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    roles = {"bos": "bos_token", "eos": "eos_token", "padding": "pad_token", "unknown": "unk_token"}
    special = {roles[k]: names[i] for k, i in ids.items() if i is not None and i in names}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token")), "add_eos_token": False,
        "model_max_length": config["max_position_embeddings"], "clean_up_tokenization_spaces": False,
        **({"chat_template": _field(reader, "tokenizer.chat_template")}
           if _field(reader, "tokenizer.chat_template") else {})}, indent=2))
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in generation.items() if v is not None},
                                                           indent=2))
    return out


def hf_dir_for(path: str | Path) -> Path:
    """The Hugging Face directory a GGUF file converts to, made once in the cache (keyed by the file's absolute
    path, size and modification time, so an edited file converts again) and reused after."""
    import hashlib
    import shutil
    import tempfile

    from chipwise.data.cache import default_cache_dir

    path = Path(path).absolute()
    if not path.is_file():
        raise ChipwiseError(f"{path} does not exist; give a .gguf file or a Hugging Face model directory")
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = default_cache_dir() / "gguf" / f"{path.stem}-{key}"
    if target.is_dir():  # it appears by one rename of a finished directory: if it is there, it is complete
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        to_hf_dir(path, scratch)
        try:
            scratch.rename(target)
        except OSError:  # another process finished first: use its directory
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")
