"""GGUF files out (`chipwise export --format gguf`): a run as one llama.cpp file (Ollama, LM Studio and
llama-server load it), written with the `gguf` package; hf/gguf_file.py reads such files back in.

- Weights: the Hugging Face tensors (convert.to_hf_tensors, fp32; a bf16 run is widened, which is lossless) under
  llama.cpp's names, q and k rows permuted so that each head's rotary pairs are adjacent, as llama.cpp's own
  converter does; no `output.weight` when the embeddings are tied (llama.cpp then uses `token_embd`); for rope_type
  llama3 the per-frequency divisors as the `rope_freqs` tensor, which is how llama.cpp applies Llama 3.1's scaling.
- Tokenizer: byte-level BPE ("gpt2") with its vocabulary, merges and token types. llama.cpp re-implements each
  pre-tokenizer (the split of text before BPE) and picks one by the name in `tokenizer.ggml.pre`; its converter
  guesses that name from a hash of one text's tokens, which a freshly trained vocabulary never matches. Here the
  name is read off the tokenizer's own pre-tokenizer instead (EXPORTABLE_SPLITS), and a split llama.cpp has no exact
  twin for is refused: a wrong name would tokenize differently, silently.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from chipwise.config import ModelConfig
from chipwise.data.tokenizer import EOS_TOKEN
from chipwise.errors import ChipwiseError
from chipwise.hf import convert
from chipwise.hf.gguf_file import _LLAMA3_SPLIT, GLOBAL_TENSORS, LAYER_TENSORS, rope_factors
from chipwise.hf.safetensors_io import hf_value

# The tokenizer's pre-tokenizer steps (named as in gguf_file.PRE_TOKENIZERS) -> the llama.cpp pre-tokenizer with
# the same regexes (llama.cpp's src/llama-vocab.cpp): GPT-2's split; each digit alone then GPT-2's (SmolLM's,
# StarCoder's; "smollm" also leaves decoded spaces as they are); Llama 3's split (llama.cpp ignores merges there,
# so the tokenizer must too).
EXPORTABLE_SPLITS = {("byte_level",): "gpt-2", ("single_digits", "byte_level"): "smollm",
                     ("llama3_split", "byte_level_no_regex"): "llama-bpe"}
IGNORES_MERGES = {"llama-bpe"}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types
GGUF_GLOBAL = {hf: gg for gg, hf in GLOBAL_TENSORS.items()}
GGUF_LAYER = {hf: gg for gg, hf in LAYER_TENSORS.items()}


def _split_steps(pre: dict | None) -> tuple[list[str], list[str]]:
    """(step names, or None where unknown; a description of each step) of a tokenizer.json pre_tokenizer."""
    if pre is None:
        return [], ["none"]
    if pre.get("type") == "Sequence":
        names, words = [], []
        for step in pre.get("pretokenizers", []):
            n, w = _split_steps(step)
            names += n
            words += w
        return names, words
    kind = pre.get("type")
    if kind == "ByteLevel":
        regex, prefix = pre.get("use_regex", True), pre.get("add_prefix_space", False)
        name = None if prefix else ("byte_level" if regex else "byte_level_no_regex")
        return [name], [f"ByteLevel(add_prefix_space={prefix}, use_regex={regex})"]
    if kind == "Digits":
        single = pre.get("individual_digits", False)
        return ["single_digits" if single else None], [f"Digits(individual_digits={single})"]
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        regex = pattern.get("Regex", pattern.get("String"))
        behavior, invert = pre.get("behavior"), pre.get("invert", False)
        ok = pattern.get("Regex") == _LLAMA3_SPLIT and behavior == "Isolated" and not invert
        return ["llama3_split" if ok else None], [f"Split({regex!r}, {behavior}{', inverted' if invert else ''})"]
    return [None], [str(kind)]


def pre_tokenizer_name(tok: dict) -> str:
    """The llama.cpp pre-tokenizer that splits text exactly as the tokenizer.json `tok` does, or a one-line
    error naming what it uses instead."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix") or model.get("dropout"):
        raise ChipwiseError(f"cannot export to GGUF: the run's tokenizer model is {model.get('type')!r} with "
                            f"options llama.cpp's byte-level BPE lacks; only plain byte-level BPE exports")
    if tok.get("normalizer") is not None:
        raise ChipwiseError(f"cannot export to GGUF: the run's tokenizer normalizes text "
                            f"({tok['normalizer'].get('type')}), which llama.cpp's byte-level BPE does not do")
    steps, words = _split_steps(tok.get("pre_tokenizer"))
    name = EXPORTABLE_SPLITS.get(tuple(steps))
    if name is None:
        known = "; ".join(f"{n}: {' + '.join(s)}" for s, n in EXPORTABLE_SPLITS.items())
        raise ChipwiseError(f"cannot export to GGUF: the run's tokenizer splits text with {' + '.join(words)}, which "
                            f"matches none of the llama.cpp pre-tokenizers chipwise can name ({known}); export "
                            f"--format hf instead")
    if bool(model.get("ignore_merges")) != (name in IGNORES_MERGES):
        raise ChipwiseError(f"cannot export to GGUF: the run's tokenizer has ignore_merges="
                            f"{bool(model.get('ignore_merges'))}, but llama.cpp's {name!r} pre-tokenizer "
                            f"{'ignores' if name in IGNORES_MERGES else 'applies'} merges for whole words")
    return name


def _template_ends(processor: dict | None) -> tuple[str | None, str | None]:
    """The special tokens a tokenizer.json post_processor puts before and after a text (None where none)."""
    if processor is None or processor.get("type") == "ByteLevel":  # ByteLevel only moves offsets
        return None, None
    if processor.get("type") == "Sequence":
        ends = [_template_ends(p) for p in processor.get("processors", [])]
        return next((b for b, _ in ends if b), None), next((e for _, e in ends if e), None)
    if processor.get("type") == "TemplateProcessing":
        single = processor.get("single") or []
        token = lambda piece: (piece.get("SpecialToken") or {}).get("id")  # noqa: E731
        return (token(single[0]), token(single[-1])) if single else (None, None)
    raise ChipwiseError(f"cannot export to GGUF: the run's tokenizer adds tokens with a {processor.get('type')} "
                        f"post-processor, which GGUF cannot state")


def vocab(tok: dict, m: ModelConfig, meta: dict) -> dict:
    """The `tokenizer.*` metadata of the GGUF file for the tokenizer.json `tok`, its model `m` and the run's
    tokenizer_meta.json `meta` (special tokens, chat template; {} for chipwise's own tokens)."""
    pre = pre_tokenizer_name(tok)
    model = tok["model"]
    ids = dict(model.get("vocab") or {})
    special = {}
    for added in tok.get("added_tokens") or []:
        ids[added["content"]] = added["id"]
        special[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if max(ids.values()) >= m.vocab_size:
        raise ChipwiseError(f"cannot export to GGUF: the tokenizer has token id {max(ids.values())}, beyond the "
                            f"model's vocabulary of {m.vocab_size}")
    tokens, types = [f"[PAD{i}]" for i in range(m.vocab_size)], [UNUSED] * m.vocab_size
    for token, i in ids.items():
        tokens[i], types[i] = token, special.get(i, NORMAL)
    merges = [m_ if isinstance(m_, str) else " ".join(m_) for m_ in model.get("merges") or []]

    names, generation = meta.get("special_tokens") or {}, meta.get("generation") or {}
    eos_default = ids.get(EOS_TOKEN)

    def token_id(role: str, key: str, default=None):
        if names.get(role) in ids:
            return ids[names[role]]
        value = generation.get(key, default)
        return value[0] if isinstance(value, list) and value else value

    first, last = _template_ends(tok.get("post_processor"))
    out = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
           "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
           "tokenizer.ggml.bos_token_id": ids[first] if first in ids else token_id("bos_token", "bos_token_id",
                                                                                   eos_default),
           "tokenizer.ggml.eos_token_id": token_id("eos_token", "eos_token_id", eos_default),
           "tokenizer.ggml.padding_token_id": token_id("pad_token", "pad_token_id"),
           "tokenizer.ggml.unknown_token_id": ids.get(names.get("unk_token")),
           "tokenizer.ggml.add_bos_token": first is not None or bool(meta.get("add_bos_token")),
           "tokenizer.ggml.add_eos_token": last is not None and last != first,
           "tokenizer.chat_template": meta.get("chat_template")}
    ends = generation.get("eos_token_id")  # a second end token (e.g. an instruct model's end of turn)
    others = [i for i in (ends if isinstance(ends, list) else []) if i != out["tokenizer.ggml.eos_token_id"]]
    out["tokenizer.ggml.eot_token_id"] = others[0] if others else None
    return {k: v for k, v in out.items() if v is not None}


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's q/k rows (each head: first halves, then second halves of its rotary pairs) -> llama.cpp's
    (each head's pairs adjacent); gguf_file.hf_tensors undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(params: dict, m: ModelConfig) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """llama.cpp's tensor names -> (numpy shape, a function giving that tensor): fp32 in llama.cpp's layout
    (numpy's [out, in] is GGUF's [in, out]), fetched from `params` (numpy, or JAX arrays left on their devices) only
    when called, one tensor at a time (safetensors_io.hf_value)."""
    out = {}
    for t in convert.hf_tensors(m):
        base, _, kind = t.name.rpartition(".")
        heads = None
        if base.startswith("model.layers."):
            i, _, part = base[len("model.layers."):].partition(".")
            key = f"blk.{i}.{GGUF_LAYER[part]}.{kind}"
            heads = {"self_attn.q_proj": m.num_heads, "self_attn.k_proj": m.num_kv_heads}.get(part)
        else:
            key = f"{GGUF_GLOBAL[base]}.{kind}"
        out[key] = (t.hf_shape, lambda t=t, heads=heads: _gguf_value(params, t, heads))
    factors = rope_factors(m)
    if factors is not None:
        out["rope_freqs.weight"] = (factors.shape, lambda: factors)
    return out


def _gguf_value(params: dict, t: convert.HFTensor, heads: int | None) -> np.ndarray:
    value = np.asarray(hf_value(params, t), np.float32)
    return np.ascontiguousarray(value if heads is None else permute_rows(value, heads))


def write_gguf(path: Path, m: ModelConfig, params: dict, tokens: dict, name: str = "chipwise") -> None:
    """Write the model and the `vocab` metadata `tokens` as the GGUF file `path`, atomically (a temporary file
    renamed into place, so a failed write leaves nothing)."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines name the temporary file
    convert.hf_config(m, None)  # refuses what a Llama cannot hold (a GELU feed-forward)
    tensors = gguf_tensors(params, m)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(m.max_seq_len)
        w.add_embedding_length(m.d_model)
        w.add_block_count(m.num_layers)
        w.add_feed_forward_length(m.d_ff)
        w.add_head_count(m.num_heads)
        w.add_head_count_kv(m.num_kv_heads)
        w.add_rope_dimension_count(m.head_dim)
        w.add_rope_freq_base(m.rope_theta)
        w.add_layer_norm_rms_eps(m.norm_eps)
        w.add_vocab_size(m.vocab_size)
        for key, value in tokens.items():
            _add(w, key, value)
        for key, (shape, _) in tensors.items():  # the header first; then each tensor fetched, written, dropped
            w.add_tensor_info(key, shape, np.dtype(np.float32), 4 * math.prod(shape))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for key, (shape, fetch) in tensors.items():
            value = fetch()
            if value.shape != tuple(shape):
                raise ValueError(f"tensor {key} has shape {value.shape}, its header says {tuple(shape)}")
            w.write_tensor_data(value)
            del value
        w.close()
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a directory we may not write to
        raise ChipwiseError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _add(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:  # token types become int32s, as llama.cpp reads them
        w.add_array(key, list(value))


def check_out_file(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ChipwiseError(f"--out {out} is a directory; --format gguf writes one file (e.g. model.gguf)")
    if out.exists() and not overwrite:
        raise ChipwiseError(f"--out {out} exists; choose a new file name, or pass --overwrite to replace it")


def export_run_gguf(run_dir: str, out: str, overwrite: bool = False) -> Path:
    """Write the run's latest checkpoint as the llama.cpp GGUF file `out` (fp32)."""
    from chipwise.run_dir import RunDir

    run = RunDir(run_dir)
    cfg = run.read_config()
    convert.hf_config(cfg.model, None)  # a model a Llama cannot hold fails here, before any work
    run.read_tokenizer()  # a run without its tokenizer cannot be exported: say so before any work
    tokens = vocab(json.loads(run.tokenizer_file.read_text()), cfg.model, run.read_tokenizer_meta())
    out_path = Path(out)
    check_out_file(out_path, overwrite)  # and touch nothing before the weights load
    params, _ = run.latest_params(cfg)  # left on the device: write_gguf fetches one tensor at a time
    write_gguf(out_path, cfg.model, params, tokens, name=Path(run_dir).absolute().name)
    return out_path
