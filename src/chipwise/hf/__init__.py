"""Hugging Face Llama checkpoints out of chipwise runs (`chipwise export`) and into them (`train --init-from`).

    convert.py     config fields and tensor layouts, both directions (pure numpy)
    checkpoint.py  safetensors (sharded above a size limit) and tokenizer files on disk
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from chipwise.errors import ChipwiseError
from chipwise.hf.checkpoint import (parse_size, prepare_out_dir, read_checkpoint, read_config, read_tokenizer_meta,
                                   write_checkpoint)
from chipwise.hf.convert import HFFormatError, model_config

__all__ = ["HFFormatError", "check_model", "export_run", "init_overrides", "initial_params", "parse_size",
           "read_checkpoint", "read_tokenizer_meta"]


def export_run(run_dir: str, out: str, max_shard_size: str = "5GB", overwrite: bool = False) -> list[str]:
    """Write the run's latest checkpoint to `out` as a Hugging Face Llama checkpoint (fp32). The params stay on
    their device; write_checkpoint fetches them one tensor at a time."""
    from chipwise.hf.convert import hf_config
    from chipwise.run_dir import RunDir

    run = RunDir(run_dir)
    cfg = run.read_config()
    hf_config(cfg.model, None)  # a model HF Llama cannot hold fails here, before any work
    limit = parse_size(max_shard_size)
    run.read_tokenizer()  # a run without its tokenizer cannot be exported: say so before any work
    out_dir = Path(out)
    prepare_out_dir(out_dir, overwrite, check_only=True)  # fail fast, and touch nothing before the weights load
    params, _ = run.latest_params(cfg)
    prepare_out_dir(out_dir, overwrite)
    return write_checkpoint(out_dir, cfg.model, params, run.tokenizer_file, limit, run.read_tokenizer_meta())


def init_overrides(hf_dir: str) -> list[str]:
    """`--set` items that make a run start from `hf_dir`: its model shape, its tokenizer, and train.init_from.

    The checkpoint's config replaces the config's whole model section (its shape is not negotiable); later
    --set items may still change model.max_seq_len.
    """
    from chipwise.hf.gguf_file import hf_dir_for, is_gguf

    path = hf_dir_for(hf_dir) if is_gguf(hf_dir) else Path(hf_dir).absolute()  # a GGUF file: converted once
    m = model_config(read_config(path))
    items = [f"model={json.dumps(dataclasses.asdict(m))}", f"train.init_from={json.dumps(str(path))}"]
    if (path / "tokenizer.json").is_file():  # token ids must mean what they meant when the weights were trained
        items.append(f"data.tokenizer={json.dumps(str(path / 'tokenizer.json'))}")
    return items


def check_model(cfg) -> None:
    """cfg.model must be the shape of the checkpoint in cfg.train.init_from (max_seq_len aside)."""
    m = model_config(read_config(Path(cfg.train.init_from)), cfg.model.max_seq_len)
    for field in dataclasses.fields(m):
        if field.name == "scan_layers":  # how layers are laid out in memory, not the checkpoint's shape
            continue
        want, got = getattr(cfg.model, field.name), getattr(m, field.name)
        if want != got:
            raise ChipwiseError(f"model.{field.name} is {want!r} but the checkpoint in train.init_from has "
                                f"{got!r}; leave the model to the checkpoint (only model.max_seq_len may change)")


def initial_params(cfg, shardings) -> dict:
    """The params of cfg.train.init_from (fp32), checked against cfg.model and placed with `shardings`. Each process
    reads only the windows its own devices hold, one tensor at a time (checkpoint.place_checkpoint), so this works on
    many hosts and no host ever holds the whole model."""
    from chipwise.hf.checkpoint import place_checkpoint
    from chipwise.train.step import stage_layout

    check_model(cfg)
    slots = stage_layout(cfg).slot_layers() if cfg.model.scanned else None  # a pipeline's slotted layer order
    return place_checkpoint(Path(cfg.train.init_from), cfg.model, shardings, slots)
