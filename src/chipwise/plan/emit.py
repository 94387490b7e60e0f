"""A plan's layout as a chipwise config: the one translation from what the planner chose (mesh, micro-batches, remat,
ZeRO-1, dtypes, batch) to what `chipwise train --config` runs, used by `plan --emit-config` and by `plan --aot`."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml

from chipwise.errors import ChipwiseError


def layout_config(model, seq_len: int, global_batch: int, layout, *, param_dtype: str = "float32",
                  moments_dtype: str = "float32", loss_chunk_tokens: int = 0, tokens: float | None = None) -> dict:
    """The config (as `chipwise.config.from_dict` reads it) that trains `model` (a ModelConfig) with `layout` (a
    perf.Layout). The compute dtype is left to the platform (`train.dtype: auto`: bf16 on accelerators), which is
    what the planner models; `train.steps` follows from `tokens` when given."""
    # The planner's micro-batches are the pipeline's when there is one (train/pipeline.py), else accumulation's.
    piped = layout.pipeline > 1
    train = {"batch_size": global_batch, "seq_len": seq_len, "grad_accum": 1 if piped else layout.microbatches,
             "pipeline_microbatches": layout.microbatches if piped else 0, "pipeline_repeats": layout.repeats,
             "remat": layout.remat, "shard_optimizer": layout.shard_optimizer, "param_dtype": param_dtype,
             "moments_dtype": moments_dtype, "loss_chunk_tokens": loss_chunk_tokens}
    if tokens:
        train["steps"] = math.ceil(tokens / (global_batch * seq_len))
    return {"model": asdict(model) | {"max_seq_len": max(model.max_seq_len, seq_len)},
            "train": train,
            "mesh": {"pipeline": layout.pipeline, "data": layout.data, "fsdp": layout.fsdp, "context": layout.context,
                     "tensor": layout.tensor}}


def train_config(req, row) -> dict:
    """The config that trains `req`'s model (a PlanRequest) with the layout of `row` (one of its PlanRows)."""
    return layout_config(req.model, req.seq_len, req.global_batch, row.estimate.layout, param_dtype=req.param_dtype,
                         moments_dtype=req.moments_dtype, loss_chunk_tokens=req.loss_chunk_tokens, tokens=req.tokens)


def _exists(path: str) -> ChipwiseError:
    return ChipwiseError(f"--emit-config {path} already exists; give a new file name or remove it first")


def check_target(path: str) -> Path:
    """Refuse, before any planning, a config path that exists (nothing a user has is overwritten) or whose folder
    does not."""
    target = Path(path)
    if target.exists():
        raise _exists(path)
    if not target.parent.is_dir():
        raise ChipwiseError(f"--emit-config {path}: the folder {target.parent} does not exist; create it first")
    return target


def config_text(req, row) -> str:
    """`row`'s layout as the text of a config file, checked by the trainer's own loader (raises if the plan has no
    layout that fits, or one the trainer cannot run)."""
    from chipwise.config import from_dict

    if not row.estimate.fits:
        raise ChipwiseError(f"--emit-config: no layout of this model fits {row.estimate.layout.chips} "
                            f"{row.accelerator.id}; add chips or shorten the sequence (nothing written)")
    values = train_config(req, row)
    from_dict(values)  # what `chipwise train --config` will check
    est = row.estimate
    return (f"# Written by `chipwise plan`: {req.model.num_layers} layers x d_model {req.model.d_model} on "
            f"{est.layout.chips} {row.accelerator.id}, {est.layout.describe()}.\n# Modelled, not measured: "
            f"{est.step_time_s:.3g} s a step, {est.memory.total / 2**30 / row.accelerator.devices_per_chip:.3g} "
            "GiB per device. Set data.sources to your corpus, then `chipwise train --config` this file.\n"
            + yaml.safe_dump(values, sort_keys=False))


def write_new_file(path: str, text: str) -> Path:
    """Write `text` to `path`, which must not exist: never replaces what a user has, and a failed write leaves
    nothing behind."""
    target = check_target(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, target)  # fails if the file appeared meanwhile
        except FileExistsError:
            raise _exists(path) from None
    finally:
        os.unlink(tmp)
    return target
