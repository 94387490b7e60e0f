"""Hugging Face checkpoint directories on disk: write one from a chipwise run, read one into chipwise params.

Weights are safetensors only: a `pytorch_model.bin` is a pickle, which can run code when loaded, so chipwise never
opens one. Both directions move one tensor at a time (the files themselves: `safetensors_io.py`), so a process's
host memory holds its own share of the model (none on an accelerator) plus about one tensor, never the whole model.
`place_checkpoint` builds each parameter from its devices' windows, one window (of one layer) in flight at a time,
in the checkpoint's dtype (bf16 stays bf16 on the host), and widens it on the device. On CPU devices, whose memory
is the host's, a window is widened as it is read into the buffer that becomes the device array (64-byte aligned,
which XLA:CPU adopts without a copy).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np

from chipwise.config import ModelConfig
from chipwise.data.tokenizer import EOS_TOKEN
from chipwise.errors import ChipwiseError
from chipwise.hf import convert
from chipwise.hf.safetensors_io import (DTYPES, INDEX_FILE, READ_CHUNK, SHARD_PATTERN, SINGLE_FILE,  # noqa: F401
                                        WeightReader, _jitted, shard, shard_names, weight_files, write_weights)

TOKENIZER_FILE = "tokenizer.json"
# Files an export writes; --overwrite removes exactly these (and old shards), never anything else.
WRITTEN = ("config.json", "generation_config.json", SINGLE_FILE, INDEX_FILE, TOKENIZER_FILE,
           "tokenizer_config.json", "special_tokens_map.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '200MiB', '100kb' or a number of bytes, as Hugging Face's max_shard_size accepts them."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise ChipwiseError(f"--max-shard-size must be a positive size such as 5GB, 200MiB or 100000 (bytes), "
                            f"got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


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
    `params` are numpy or JAX arrays (left on their devices: write_weights fetches one tensor at a time).
    `tokenizer_meta` (read_tokenizer_meta's, kept by a run started from a checkpoint) gives the special tokens, chat
    template and generation ids; without it, chipwise's own: <|endoftext|> ends and separates documents."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    eos = tok.token_to_id(EOS_TOKEN)
    config = convert.hf_config(m, eos)  # refuses what HF Llama cannot hold, before anything is written
    files = write_weights(out, m, params, max_shard_bytes)
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


def check_weights(reader: WeightReader, m: ModelConfig) -> None:
    """Every tensor of `m` present with its shape and a float dtype, none that chipwise would drop, and a tied model's
    lm_head.weight, where there is one, equal to the embedding (compared a chunk of rows at a time)."""
    convert.check_tensors(reader.shapes(), m)
    for name, (_, _, dtype, _) in reader.tensors.items():
        if dtype not in DTYPES:
            raise convert.HFFormatError(f"tensor {name} is stored as {dtype}; chipwise reads weights stored as "
                                        f"{', '.join(DTYPES)}")
    if m.tie_embeddings and "lm_head.weight" in reader.tensors:
        rows, columns = reader.tensors["lm_head.weight"][3]
        step = max(1, READ_CHUNK // (4 * columns))
        for r in range(0, rows, step):
            window = ((r, min(r + step, rows)),)
            head, embed = (reader.read(name, window).astype(np.float32)
                           for name in ("lm_head.weight", "model.embed_tokens.weight"))
            if not np.array_equal(head, embed):
                raise convert.HFFormatError("config.json field tie_word_embeddings=True, but lm_head.weight differs "
                                            "from model.embed_tokens.weight; set it to false to import an untied "
                                            "head")


def read_window(reader: WeightReader, t: convert.HFTensor, window: tuple[tuple[int, int], ...],
                dtype=None) -> np.ndarray:
    """chipwise's `window` of tensor `t` (one layer's; (start, stop) per dimension), in the stored dtype or `dtype`:
    a view of just the HF window holding it."""
    hf, finish = convert.hf_window(t, window)
    return finish(reader.read(t.name, hf, dtype))


def _sources(m: ModelConfig, slot_layers=None) -> dict[tuple, convert.HFTensor | list]:
    """Each chipwise parameter (by its path) and the HF tensor it is, or, for stacked layers, the tensor in each slot
    (`slot_layers`: the layer in each slot, -1 for an empty one; by default the plain order), None where empty."""
    sources = {}
    for t in convert.hf_tensors(m):
        if t.layer is None:
            sources[t.path] = t
        else:
            sources.setdefault(t.path, [None] * m.num_layers)[t.layer] = t
    if slot_layers is not None:
        sources = {path: [source[i] if i >= 0 else None for i in slot_layers] if isinstance(source, list)
                   else source for path, source in sources.items()}
    return sources


def _whole(shape) -> tuple[tuple[int, int], ...]:
    return tuple((0, n) for n in shape)


def _window(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A device's index (a tuple of slices) as (start, stop) per dimension."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _model(hf_dir: Path, max_seq_len: int | None, scan_layers: bool | None) -> ModelConfig:
    return dataclasses.replace(convert.model_config(read_config(hf_dir), max_seq_len), scan_layers=scan_layers)


def read_checkpoint(hf_dir: Path, max_seq_len: int | None = None,
                    scan_layers: bool | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, chipwise params as float32 numpy) from a local HF Llama directory, in the layer layout
    `scan_layers` asks for (None: ModelConfig's default, stacked). Each tensor is read into its place in turn: the
    host holds the params and one tensor as stored."""
    m = _model(hf_dir, max_seq_len, scan_layers)
    params = {}
    with WeightReader(hf_dir) as reader:
        check_weights(reader, m)
        for path, source in _sources(m).items():
            stacked = isinstance(source, list)
            layers = source if stacked else [source]
            value = np.empty((len(layers), *layers[0].shape) if stacked else layers[0].shape, np.float32)
            for k, t in enumerate(layers):
                value[k if stacked else ...] = read_window(reader, t, _whole(t.shape))
            _put(params, path, value)
    return m, {k: params[k] for k in ("embed", "blocks", "final_norm", "lm_head") if k in params}


def read_to_device(hf_dir: Path, device, max_seq_len: int | None = None,
                   scan_layers: bool | None = None) -> tuple[ModelConfig, dict]:
    """read_checkpoint's (ModelConfig, fp32 params), the params placed on `device` one tensor at a time
    (place_checkpoint): the host never holds a copy of the whole model beside the device's."""
    from jax.sharding import SingleDeviceSharding

    m = _model(hf_dir, max_seq_len, scan_layers)
    shardings = {}
    for path in _sources(m):
        _put(shardings, path, SingleDeviceSharding(device))
    return m, place_checkpoint(hf_dir, m, shardings)


def _put(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def place_checkpoint(hf_dir: Path, m: ModelConfig, shardings, slot_layers=None, dtype=np.float32,
                     widen_on_host: bool | None = None):
    """The params of the HF checkpoint in `hf_dir` (model `m`, checked against its config.json by the caller) as
    `dtype` JAX arrays placed with `shardings` (a tree shaped like the params; stacked layers in `slot_layers`'
    order, see _sources). Each process reads only the windows its own devices hold, one tensor at a time, so its host
    memory holds about one tensor's share beyond what its devices hold. Every process must call this.

    Windows stay in the checkpoint's dtype on the host (bf16 stays bf16) and are widened on the devices, except where
    the devices are CPUs (`widen_on_host` None: decided by the devices): there the host's memory is the device's,
    so a window is widened as it is read, a chunk of rows at a time, into the buffer that becomes the device array."""
    import jax

    sources = _sources(m, slot_layers)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shardings)
    paths = [tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path) for key_path, _ in flat]
    if set(paths) != set(sources):
        raise ValueError(f"the shardings' tree {sorted(map(str, paths))} is not model {m}'s params "
                         f"{sorted(map(str, sources))}")
    dtype = np.dtype(dtype)
    leaves = []
    with WeightReader(hf_dir) as reader:
        check_weights(reader, m)
        for path, (_, sharding) in zip(paths, flat):
            source = sources[path]
            on_host = (all(d.platform == "cpu" for d in sharding.device_set) if widen_on_host is None
                       else widen_on_host)
            place = _place_stacked if isinstance(source, list) else _place
            leaves.append(place(reader, source, sharding, dtype, dtype if on_host else None))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _place(reader: WeightReader, t: convert.HFTensor, sharding, dtype, read_dtype):
    """One unstacked parameter: its devices' windows read (each distinct window once, as `read_dtype`: None as
    stored), placed, then widened to `dtype` where they were not already."""
    import jax

    windows = {}

    def read(index):
        window = _window(index, t.shape)
        if window not in windows:
            windows[window] = read_window(reader, t, window, read_dtype)
        return windows[window]

    value = jax.make_array_from_callback(t.shape, sharding, read).block_until_ready()  # the host copy is done
    windows.clear()
    return value if value.dtype == dtype else _jitted("astype", dtype, sharding)(value).block_until_ready()


def _place_stacked(reader: WeightReader, layers: list, sharding, dtype, read_dtype):
    """A stacked parameter [slots, ...], a layer at a time. The slots split into `parts` blocks along the layer axis
    (a pipeline's stages; one block without a pipeline), each on its devices. Round k places slot k of every block:
    an array [parts, ...] with the same sharding, each device's window of it read from the checkpoint (as
    `read_dtype`, None: as stored), which one jitted update writes (widened) into slot k of every block in place (the
    stack is donated). So the host holds one layer's windows at a time, and the devices one layer beyond the stack."""
    import jax

    shape = (len(layers), *next(t for t in layers if t is not None).shape)
    parts = shape[0] // sharding.shard_shape(shape)[0]
    per_part = shape[0] // parts
    empty = read_dtype or DTYPES[reader.tensors[next(t for t in layers if t is not None).name][2]]
    stack = _jitted("zeros", shape, dtype, sharding)()
    for k in range(per_part):
        row = [layers[p * per_part + k] for p in range(parts)]  # slot k of each block; None: an empty slot
        if all(t is None for t in row):
            continue
        windows = {}

        def read(index):
            window = _window(index, (parts, *shape[1:]))
            if window not in windows:
                (first, last), rest = window[0], window[1:]
                blocks = [np.zeros([b - a for a, b in rest], empty) if t is None else
                          read_window(reader, t, rest, read_dtype) for t in row[first:last]]
                windows[window] = blocks[0][None] if len(blocks) == 1 else np.stack(blocks)  # one: no copy
            return windows[window]

        slab = jax.make_array_from_callback((parts, *shape[1:]), sharding, read)
        stack = _jitted("set_slot", parts, sharding)(stack, slab, k).block_until_ready()  # one layer in flight
        windows.clear()
    return stack
