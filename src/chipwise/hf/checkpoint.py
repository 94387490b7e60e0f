"""Hugging Face checkpoint directories on disk: write one from a chipwise run, read one into chipwise params.

Weights are safetensors only (read and written with the `safetensors` package's numpy API): a
`pytorch_model.bin` is a pickle, which can run code when loaded, so chipwise never opens one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from chipwise.config import ModelConfig
from chipwise.data.tokenizer import EOS_TOKEN
from chipwise.errors import ChipwiseError
from chipwise.hf import convert

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
# Files an export writes; --overwrite removes exactly these (and old shards), never anything else.
WRITTEN = ("config.json", "generation_config.json", SINGLE_FILE, INDEX_FILE, TOKENIZER_FILE,
           "tokenizer_config.json", "special_tokens_map.json")
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '200MiB', '100kb' or a number of bytes, as Hugging Face's max_shard_size accepts them."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise ChipwiseError(f"--max-shard-size must be a positive size such as 5GB, 200MiB or 100000 (bytes), "
                            f"got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def shard(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Split tensors, in order, into groups of at most max_bytes (a larger tensor gets a group of its own)."""
    groups, size = [{}], 0
    for name, value in tensors.items():
        if groups[-1] and size + value.nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = value
        size += value.nbytes
    return groups


def prepare_out_dir(out: Path, overwrite: bool, check_only: bool = False) -> None:
    """Refuse a non-empty `out` unless overwrite; then remove only files an export writes, and create it."""
    if out.exists() and not out.is_dir():
        raise ChipwiseError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ChipwiseError(f"--out {out} is not empty; choose an empty or new directory, or pass --overwrite "
                                f"to replace the checkpoint files in it")
        if check_only:
            return
        for path in out.iterdir():
            if path.name in WRITTEN or SHARD_PATTERN.fullmatch(path.name):
                path.unlink()
    if not check_only:
        out.mkdir(parents=True, exist_ok=True)


def write_checkpoint(out: Path, m: ModelConfig, params: dict, tokenizer_file: Path,
                     max_shard_bytes: int = 5 * 10**9, tokenizer_meta: dict | None = None) -> list[str]:
    """Write config, weights and tokenizer files into an empty directory `out`; returns the weight files.
    `tokenizer_meta` (read_tokenizer_meta's, kept by a run started from a checkpoint) gives the special tokens,
    chat template and generation ids; without it, chipwise's own: <|endoftext|> ends and separates documents."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    eos = tok.token_to_id(EOS_TOKEN)
    config = convert.hf_config(m, eos)  # refuses what HF Llama cannot hold, before anything is written
    tensors = convert.to_hf_tensors(params, m)
    groups = shard(tensors, max_shard_bytes)
    meta = {"format": "pt"}  # transformers refuses safetensors files without a known format tag
    if len(groups) == 1:
        save_file(groups[0], str(out / SINGLE_FILE), metadata=meta)
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        for name, group in zip(files, groups):
            save_file(group, str(out / name), metadata=meta)
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": {k: name for name, g in zip(files, groups) for k in g}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    meta = tokenizer_meta or {}
    generation = meta.get("generation") or {"bos_token_id": eos, "eos_token_id": eos}
    config.update({k: generation.get(k) for k in ("bos_token_id", "eos_token_id") if k in generation})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE)
    # The tokenizer is used as it is (a BOS it adds is in its own post-processor), hence the generic fast tokenizer
    # class rather than LlamaTokenizerFast, which would add one of its own. A model that came from a checkpoint
    # keeps that checkpoint's special tokens and chat template (an instruct model must still end its turns).
    special = meta.get("special_tokens") or {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN}
    template = {"chat_template": meta["chat_template"]} if meta.get("chat_template") else {}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special, **template, "model_max_length": m.max_seq_len,
        "add_bos_token": bool(meta.get("add_bos_token")), "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"]}, indent=2))  # Llama takes no token_type_ids
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return files


def _json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChipwiseError(f"{path} is not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def read_tokenizer_meta(hf_dir: Path) -> dict:
    """What a checkpoint says about its tokens beyond tokenizer.json: the special tokens' strings, the chat
    template (tokenizer_config.json's, or chat_template.jinja), whether a BOS is added, and the generation ids
    (generation_config.json's, which transformers' generate prefers, else config.json's). Empty where it says
    nothing."""
    hf_dir = Path(hf_dir)
    tok_cfg = _json_object(hf_dir / "tokenizer_config.json")
    config, generation = _json_object(hf_dir / "config.json"), _json_object(hf_dir / "generation_config.json")
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = tok_cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: transformers uses "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text()
    ids = {k: generation.get(k, config.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    meta = {"special_tokens": special, "chat_template": template, "add_bos_token": tok_cfg.get("add_bos_token"),
            "generation": {k: v for k, v in ids.items() if v is not None}}
    return {k: v for k, v in meta.items() if v not in (None, {}, "")}


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ChipwiseError(f"{hf_dir} has no config.json; --init-from takes a local Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChipwiseError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ChipwiseError(f"{path} must hold a JSON object")
    return config


def weight_files(hf_dir: Path) -> list[Path]:
    hf_dir = Path(hf_dir)
    if (hf_dir / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ChipwiseError(f"{hf_dir / INDEX_FILE} is not a valid safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        pickled = [p.name for p in hf_dir.glob("*.bin")]
        hint = (f"; it has {pickled[0]}, a pickle, which chipwise does not load: re-save it with "
                f"save_pretrained(..., safe_serialization=True)") if pickled else ""
        raise ChipwiseError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    missing = [f for f in files if not (hf_dir / f).is_file()]
    if missing:
        raise ChipwiseError(f"{hf_dir} lacks the weight file {missing[0]} named in its index")
    return [hf_dir / f for f in files]


def read_checkpoint(hf_dir: Path, max_seq_len: int | None = None,
                    scan_layers: bool | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, chipwise params as float32 numpy) from a local HF Llama directory, in the layer layout
    `scan_layers` asks for (None: ModelConfig's default, stacked)."""
    m = dataclasses.replace(convert.model_config(read_config(hf_dir), max_seq_len), scan_layers=scan_layers)
    files = weight_files(hf_dir)
    shapes = {}
    for path in files:  # check names and shapes from the headers before reading any data
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    convert.check_tensors(shapes, m)
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return m, convert.from_hf_tensors(tensors, m)
