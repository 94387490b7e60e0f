"""GGUF files in (llama.cpp's format, read with the `gguf` package): a Llama GGUF becomes a Hugging Face Llama
directory (config.json, fp32 model.safetensors, tokenizer.json with its special tokens, tokenizer_config.json with
the chat template, generation_config.json), which the rest of chipwise reads as any other (`train --init-from`,
`serve --hf`, `export`'s round trip).

Four things differ from a Hugging Face checkpoint:
- names and shapes: `blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight`; numpy sees GGUF's shapes
  reversed, which is Hugging Face's [out, in];
- llama.cpp's converter permutes the rows of q and k so that each head's rotary pairs are adjacent (the original
  Llama layout); chipwise, like Hugging Face, pairs the two halves of a head, so the permutation is undone;
- quantised tensors (Q4_1, Q8_0, K-quants, ...) are dequantised to fp32 by the `gguf` package;
- Llama 3.1's RoPE scaling is not named in the metadata: llama.cpp's converter stores its per-frequency divisors as
  the `rope_freqs` tensor, from which rope_scaling recovers the config's llama3 parameters.

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
# llama.cpp's "default" (an older converter's name for a BPE it did not recognise): four splits in turn, each of
# every piece the one before made (llama.cpp's src/llama-vocab.cpp): punctuation runs, GPT-2's split, numbers,
# then three digits at a time.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")
PRE_TOKENIZERS = {
    "default": ("default_splits", "byte_level_no_regex"),
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
    heads, d = int(_require(reader, p + "attention.head_count")), int(_require(reader, p + "embedding_length"))
    head_dim = int(_field(reader, p + "rope.dimension_count", d // heads))
    if head_dim * heads != d:
        raise ChipwiseError(f"llama.rope.dimension_count is {head_dim}, but chipwise rotates whole heads of "
                            f"embedding_length / head_count = {d // heads}")
    vocab = _field(reader, p + "vocab_size") or len(_require(reader, "tokenizer.ggml.tokens"))
    theta = float(_field(reader, p + "rope.freq_base", 10000.0))
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_size": d,
        "intermediate_size": int(_require(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_require(reader, p + "block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)), "head_dim": head_dim,
        "vocab_size": int(vocab), "max_position_embeddings": int(_field(reader, p + "context_length", 2048)),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta, "hidden_act": "silu", "rope_scaling": rope_scaling(reader, theta, head_dim),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"), "torch_dtype": "float32",
    }


def rope_factors(m) -> np.ndarray | None:
    """llama.cpp's rope_freqs of a ModelConfig with rope_type llama3: what each plain rotary frequency is divided by
    (model.rope_frequencies' scaling, as divisors); None for unscaled RoPE."""
    import dataclasses

    from chipwise.model import rope_frequencies

    if m.rope_type != "llama3":
        return None
    plain = np.asarray(rope_frequencies(dataclasses.replace(m, rope_type="default")), np.float64)
    return (plain / np.asarray(rope_frequencies(m), np.float64)).astype(np.float32)


def rope_scaling(reader, theta: float, head_dim: int) -> dict | None:
    """config.json's rope_scaling (Llama 3.1's rope_type llama3) from the file's rope_freqs tensor, or None without
    one. The divisors fix the factor (the largest) and, in between, a blend linear in 1 / wavelength; that line
    fixes original_max / (high - low) and low / (high - low), so low_freq_factor is taken as Llama 3.x's 1 (any
    choice gives the same frequencies). Checked by recomputing the divisors: anything else is refused."""
    from chipwise.config import ModelConfig

    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    factors = np.asarray(tensor.data, np.float64).reshape(-1)
    refuse = ChipwiseError("rope_freqs.weight is not Llama 3.1's RoPE scaling (rope_type llama3) of this model's "
                           f"{head_dim // 2} rotary frequencies; chipwise cannot represent it")
    if factors.shape != (head_dim // 2,) or not np.all(np.isfinite(factors)) or factors.min() < 1 - 1e-6:
        raise refuse
    factor = float(factors.max())
    if factor < 1 + 1e-6:
        return None  # every frequency kept: plain RoPE
    x = theta ** (-np.arange(head_dim // 2) / (head_dim // 2)) / (2 * np.pi)  # 1 / wavelength
    blend = (1 / factors - 1 / factor) / (1 - 1 / factor)  # 1: kept, 0: divided by the factor
    mid, low = (blend > 1e-5) & (blend < 1 - 1e-5), 1.0
    if mid.sum() >= 2:
        slope, offset = np.polyfit(x[mid], blend[mid], 1)  # blend = (original * x - low) / (high - low)
        high = low - 1 / offset if offset < 0 else 4.0
        original = slope * (high - low)
    elif mid.sum() == 1:  # one point on the line: Llama 3.1's high_freq_factor fixes it
        high = 4.0
        original = (blend[mid][0] * (high - low) + low) / x[mid][0]
    else:  # a step: any original between the last kept and the first divided frequency, a power of two if one fits
        high = 4.0
        least, most = high / x[blend >= 0.5].min(), low / x[blend < 0.5].max()
        powers = [2.0 ** k for k in range(int(np.ceil(np.log2(least))), int(np.floor(np.log2(most))) + 1)]
        original = powers[0] if powers else (least + most) / 2
    scaling = {"rope_type": "llama3", "factor": float(np.float32(factor)), "low_freq_factor": low,
               "high_freq_factor": float(np.round(high, 4)),
               "original_max_position_embeddings": int(round(original))}
    m = ModelConfig(d_model=head_dim, num_heads=1, num_kv_heads=1, rope_theta=theta, rope_type="llama3",
                    rope_factor=scaling["factor"], rope_low_freq_factor=low, rope_high_freq_factor=scaling[
                        "high_freq_factor"], rope_original_max_seq_len=scaling["original_max_position_embeddings"])
    if scaling["original_max_position_embeddings"] < 1 or not np.allclose(rope_factors(m), factors, rtol=1e-4):
        raise refuse
    return scaling


def hf_tensors(reader, config: dict) -> dict[str, np.ndarray]:
    """Every tensor dequantised to fp32 under its Hugging Face name, q and k rows back in Hugging Face's order."""
    from gguf import GGMLQuantizationType, quants

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # config.json's rope_scaling (rope_scaling, above)
            continue
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
             "llama3_split": lambda: pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
             "default_splits": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated")
                                                                for r in _DEFAULT_SPLITS])}
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
