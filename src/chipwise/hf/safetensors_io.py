"""Safetensors weight files, one tensor at a time: writing a model's tensors in Hugging Face's layout
(`write_weights`), and reading any window of a stored tensor (`WeightReader`), so that a process's host memory holds
about one tensor beyond its own share of the model, never the whole model.

- Reading: the `safetensors` package checks each file; the data is then read with positioned reads straight into a
  fresh array, just the window asked for. (safetensors' own reader maps the file, and every mapped page it touches
  counts in the process's resident memory until it is closed: a tensor read that way costs twice its size.)
- Writing: the safetensors header is computed from the shapes, then each tensor is fetched from its device (one
  layer of a stacked parameter), turned into HF's layout and written in pieces of at most WRITE_CHUNK bytes, and
  dropped. Files are byte for byte what `safetensors.numpy.save_file` writes, whatever --max-shard-size is: the
  shard size bounds the files, not the memory.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors import safe_open

from chipwise.config import ModelConfig
from chipwise.errors import ChipwiseError
from chipwise.hf import convert

SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
def shard(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Split tensors, in order, into groups of at most max_bytes (a larger tensor gets a group of its own)."""
    return [{k: tensors[k] for k in group} for group in shard_names({k: v.nbytes for k, v in tensors.items()},
                                                                     max_bytes)]


def shard_names(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """`shard` by the tensors' sizes in bytes alone: the names of each group."""
    groups, size = [[]], 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


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


# Writing: one tensor at a time -------------------------------------------------------------------------------------

WRITE_CHUNK = 64 * 2**20  # bytes of a tensor converted to HF's layout (and dtype) at a time as it is written
READ_CHUNK = 64 * 2**20  # bytes of whole rows read at a time for a window of some columns or another dtype
DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}  # safetensors' dtype codes chipwise reads and writes


def write_weights(out: Path, m: ModelConfig, params: dict, max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """`params` (numpy, or JAX arrays left on their devices) as model.safetensors, or as shards of at most
    max_shard_bytes (a larger tensor gets one of its own) and their index, in fp32; returns the weight files. Each
    tensor is fetched, written and dropped before the next (hf_value): the host holds about one tensor."""
    tensors = {t.name: t for t in convert.hf_tensors(m)}
    sizes = {name: 4 * math.prod(t.hf_shape) for name, t in tensors.items()}
    groups = shard_names(sizes, max_shard_bytes)
    files = ([SINGLE_FILE] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for file, group in zip(files, groups):
        write_safetensors(out / file, {name: tensors[name].hf_shape for name in group}, "F32",
                          lambda name: hf_value(params, tensors[name]))
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: file for file, group in zip(files, groups) for k in group}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files


def hf_value(params: dict, t: convert.HFTensor) -> np.ndarray:
    """Tensor `t` of `params` on the host in HF's layout (a view where numpy can make one). Of a JAX array, only
    what `t` is gets fetched: one layer of a stacked parameter, gathered from every process if it is sharded."""
    leaf = params
    for key in t.path:
        leaf = leaf[key]
    if isinstance(leaf, np.ndarray):
        leaf = leaf if t.layer is None else leaf[t.layer]
    else:
        import jax
        from jax.experimental import multihost_utils

        if t.layer is not None:
            leaf = _jitted("take")(leaf, t.layer)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        leaf = np.asarray(jax.device_get(leaf))
    return convert.to_hf_layout(t, leaf)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str,
                      fetch: Callable[[str], np.ndarray], metadata: dict | None = None) -> None:
    """A safetensors file of tensors `shapes` (name -> shape), all of safetensors dtype `dtype` ("F32", "BF16"),
    written one at a time: fetch(name) gives that tensor (any float dtype and strides), which is converted and
    written in pieces of at most WRITE_CHUNK bytes and then dropped. The header and the order of the data are
    safetensors' own (by name, for one dtype), so the file is byte for byte what safetensors.numpy.save_file writes
    of the same tensors."""
    np_dtype = DTYPES[dtype]
    order = sorted(shapes)
    # transformers refuses safetensors files without a known format tag
    header, offset = {"__metadata__": {"format": "pt"} if metadata is None else metadata}, 0
    for name in order:
        size = math.prod(shapes[name]) * np_dtype.itemsize
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes, so the data is aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            value = fetch(name)
            if tuple(value.shape) != tuple(shapes[name]):
                raise ValueError(f"tensor {name} has shape {tuple(value.shape)}, its header says {shapes[name]}")
            value = value.reshape(1) if value.ndim == 0 else value
            step = max(1, WRITE_CHUNK // max(1, math.prod(value.shape[1:]) * np_dtype.itemsize))
            for row in range(0, len(value), step):
                f.write(np.ascontiguousarray(value[row:row + step], np_dtype).reshape(-1).view(np.uint8).data)
            del value


# Reading: the windows a process's devices hold, one tensor at a time -----------------------------------------------

class WeightReader:
    """The tensors of a checkpoint's safetensors files by name. Each file is checked by the `safetensors` package;
    data is read with positioned reads straight into a fresh array, a window at a time, never through a mapping of
    the file (whose touched pages would count in this process's resident memory)."""

    def __init__(self, hf_dir: Path):
        self.tensors: dict[str, tuple[Path, int, str, tuple[int, ...]]] = {}  # name -> (file, offset, dtype, shape)
        for path in weight_files(hf_dir):
            self.tensors.update(_header(path))
        self._files = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry[3] for name, entry in self.tensors.items()}

    def read(self, name: str, window: tuple[tuple[int, int], ...] = (), dtype=None) -> np.ndarray:
        """Tensor `name`'s `window` ((start, stop) for each leading dimension; the rest whole), as stored, or
        converted to `dtype` as it is read (a chunk of rows at a time, never the whole window twice)."""
        path, offset, stored, shape = self.tensors[name]
        stored = DTYPES[stored]
        dtype = stored if dtype is None else np.dtype(dtype)
        window = tuple(window) + tuple((0, n) for n in shape[len(window):])
        out = _aligned_empty([stop - start for start, stop in window], dtype)
        if out.size == 0:
            return out
        if not shape:
            out[...] = self.read(name, window)
            return out
        row = math.prod(shape[1:]) * stored.itemsize
        (first, last), rest = window[0], window[1:]
        whole_rows = all(w == (0, n) for w, n in zip(rest, shape[1:]))
        if whole_rows and dtype == stored:  # one run of bytes, straight into place
            self._read_into(path, offset + first * row, out)
            return out
        # Some columns, or another dtype: whole rows a chunk at a time, the window's part copied (converted) out.
        step = max(1, READ_CHUNK // row)
        scratch = np.empty((min(step, last - first), *shape[1:]), stored)
        columns = tuple(slice(start, stop) for start, stop in rest)
        for r in range(first, last, step):
            n = min(step, last - r)
            self._read_into(path, offset + r * row, scratch[:n])
            out[r - first:r - first + n] = scratch[(slice(0, n), *columns)]
        return out

    def _read_into(self, path: Path, position: int, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        if path not in self._files:
            self._files[path] = open(path, "rb", buffering=0)
        f = self._files[path]
        f.seek(position)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise ChipwiseError(f"{path} ends inside its tensors' data; the file is truncated")
            done += n

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
    """np.empty, at an address that is a multiple of `alignment`: XLA:CPU then places such an array on its device
    without copying it (the device buffer is this memory), where it would copy an array at numpy's 16-byte one."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _header(path: Path) -> dict[str, tuple[Path, int, str, tuple[int, ...]]]:
    """name -> (path, offset of its data in the file, dtype, shape), once safetensors has accepted the file (header,
    offsets within the file and matching the shapes)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as e:  # safetensors' SafetensorError: damaged, truncated or not safetensors at all
        reason = " ".join(str(e).split())
        raise ChipwiseError(f"{path} is not a valid safetensors file ({reason})") from None
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {name: (path, 8 + size + info["data_offsets"][0], info["dtype"], tuple(info["shape"]))
            for name, info in header.items() if name != "__metadata__"}


@functools.cache
def _jitted(name: str, *args):
    """The small jitted functions that move tensors (made once, compiled once per shape and sharding)."""
    import jax
    import jax.numpy as jnp

    if name == "take":  # one layer of a stacked parameter
        return jax.jit(lambda x, i: x[i])
    if name == "zeros":
        shape, dtype, sharding = args
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    if name == "set_slot":  # [parts, ...] written into slot k of each of the stack's `parts` blocks, in place
        parts, sharding = args

        def set_slot(stack, slab, k):
            blocks = stack.reshape(parts, stack.shape[0] // parts, *stack.shape[1:])
            blocks = jax.lax.dynamic_update_index_in_dim(blocks, slab.astype(stack.dtype)[:, None], k, 1)
            return blocks.reshape(stack.shape)

        return jax.jit(set_slot, out_shardings=sharding, donate_argnums=0)
    dtype, sharding = args  # "astype": widened where it lies
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)
