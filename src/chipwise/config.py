"""Run configuration: dataclasses, YAML files and `--set key=value` overrides, checked up front.

Every problem is reported as one line (ConfigError) naming the key and how to fix it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chipwise.config_checks import validate, validate_model
from chipwise.errors import ConfigError
from chipwise.presets import PRESETS


@dataclass(frozen=True)  # hashable: it is part of the model's static graph definition
class ModelConfig:
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 8
    num_kv_heads: int = 4
    d_ff: int = 704
    vocab_size: int = 8192
    ffn: str = "swiglu"  # swiglu | gelu
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # RoPE scaling as Llama 3.1+ configs define it (rope_type "llama3"): wavelengths longer than
    # rope_original_max_seq_len / rope_low_freq_factor are stretched rope_factor times, those shorter than
    # rope_original_max_seq_len / rope_high_freq_factor kept, a smooth ramp between (model.rope_frequencies).
    rope_type: str = "default"  # default | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    # Layers stacked under a scan (model.py), or false: a Python loop, unrolled. None: the platform's default
    # (sharding.PLATFORM_RULES), which the trainer writes into the run's config.yaml.
    scan_layers: bool | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def scanned(self) -> bool:
        """Whether layers are stacked; None (no platform named, e.g. the bare model or the planner) means yes."""
        return self.scan_layers is not False


@dataclass
class MixtureSource:
    """One named part of `data.mixture`: its own sources, and its share of the training sequences."""
    name: str = ""
    sources: list[str] = field(default_factory=list)
    weight: float = 0.0  # relative: the weights are normalised over the mixture
    text_field: str = ""  # empty: data.text_field
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    # Text files, directories, JSONL (.jsonl, .jsonl.gz, .jsonl.zst), parquet, or `datasets` save_to_disk
    # directories; empty: Python's stdlib.
    sources: list[str] = field(default_factory=list)
    text_field: str = "text"  # the field (JSONL) or column (parquet, datasets) holding the text
    # Globs on each file's path relative to its source directory (* also crosses folders): keep the files that
    # match one include pattern (all, if none is given) and no exclude pattern.
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    tokenizer: str = ""  # path to an existing tokenizer.json; empty: train a byte-level BPE
    val_fraction: float = 0.05  # share of documents (chosen by path hash) held out for validation
    cache_dir: str = ""  # where tokenizers and packed tokens are cached; empty: ~/.cache/chipwise
    max_documents: int = 0  # keep only the first N documents in path order (0: all); for quick trials
    worker_threads: int = 2  # Grain read threads feeding the step
    prepare_workers: int = 0  # processes tokenizing the corpus into the token store (data/prepare.py); 0: one a core
    # Attention stays within each document of a packed sequence (documents end with EOS; the token after an EOS
    # starts a new one). Off: every token sees the whole window, as GPT-2 and nanoGPT train.
    document_masking: bool = False
    # Weighted sources instead of data.sources: each part is prepared as its own token store (one tokenizer for all)
    # and training sequences are drawn from the parts in these proportions, exactly, deterministically.
    mixture: list[MixtureSource] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # global sequences per optimizer step
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    # Micro-batches each accumulation step is cut into for the pipeline (train/pipeline.py); 0: as many as stages.
    # More shrink the bubble ((stages - 1) / (micro-batches + stages - 1) of the step) and hold more activations.
    pipeline_microbatches: int = 0
    # Passes of every micro-batch through the stages (the circular schedule): each device holds this many groups of
    # layers, and the bubble shrinks as many times. 1 is GPipe. Needs pipeline_microbatches >= mesh.pipeline.
    pipeline_repeats: int = 1
    seed: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final learning rate as a share of lr
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, decay)
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "auto"  # compute dtype: auto (bf16 on accelerators, fp32 on CPU) | bfloat16 | float32
    remat: str = "none"  # none | full | dots (save only matmul outputs)
    # Tokens per chunk of the LM head and loss (train/loss.py): 0 picks about 128 MiB of fp32 logits per chunk; a
    # value >= batch x seq_len computes the full logits at once.
    loss_chunk_tokens: int = 0
    # Precision of what the train state stores (train/step.py, train/optimizer.py). fp32 everywhere by default, CPUs
    # included: bf16 parameters halve their memory but round away every update smaller than half a bf16 step of the
    # weight (about 0.4% of it), which stalls training late in a decaying schedule, so they are opt-in. bf16 moments
    # halve AdamW's state at a small cost in accuracy (docs/architecture.md states the tolerance tested).
    param_dtype: str = "float32"  # float32 | bfloat16
    moments_dtype: str = "float32"  # float32 | bfloat16: AdamW's first and second moments
    shard_optimizer: bool = False  # ZeRO-1: AdamW's moments also sharded over the mesh's data axis
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3  # the latest K checkpoints are kept...
    keep_every: int = 0  # ...plus every checkpoint whose step is a multiple of this (0: none)
    # zstd on the arrays (Orbax's default): a few % smaller on float weights and moments, for a save and a
    # restore several times slower where cores are few (docs/benchmarks.md)
    compress_checkpoints: bool = False
    max_bad_steps: int = 3  # consecutive non-finite steps (each skipped) before rolling back to a checkpoint
    max_rollbacks: int = 3  # rollbacks allowed in one invocation before the run stops as diverged
    # Fault injection for tests and drills: data batches (0-based position in the training stream) whose loss
    # is multiplied by NaN, so their update is skipped. Keyed on data position, not step, so a rollback that
    # skips ahead in the data does not meet them again.
    inject_nan_batches: list[int] = field(default_factory=list)
    init_from: str = ""  # a Hugging Face Llama directory whose weights start the run (see `train --init-from`)


@dataclass
class MeshConfig:
    pipeline: int = 1  # pipeline stages over the stacked layers (train/pipeline.py); a count, never -1
    data: int = -1  # -1 takes whatever devices the other axes leave
    fsdp: int = 1
    context: int = 1  # context parallelism: the sequence of activations split over this many devices
    tensor: int = 1


@dataclass
class HardwareConfig:
    price_per_hour: float | None = None  # USD per chip-hour; overrides the catalog
    power_watts: float | None = None  # per chip; overrides the catalog
    peak_tflops: float | None = None  # per device, your own figure; reported as "user-given"
    measure_peak: bool = True  # where the catalog has no peak, measure a matmul peak and label it measured


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    run_dir: str = "runs/default"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def check_typed_value(key: str, value, tp):
    """`value` checked against the type annotation `tp` and returned, converted where that is safe (an int where
    a float is declared becomes a float, text such as "3e-4" a number); a mismatch raises a one-line ConfigError.

    Lenient on purpose: `--set` values and YAML 1.1 arrive loosely typed. The accelerator catalog reuses it.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return check_typed_value(key, value, inner)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {_type_name(inner)}, got {value!r}")
        return [check_typed_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of its fields, got {value!r}")
        return _build(tp, value, f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # YAML reads 1e6 as a float
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            near = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{full}'; valid keys under '{prefix or 'top level'}' are: {near}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' must be a mapping of its fields, got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = check_typed_value(full, value, tp)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (for example train.steps=100), got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_nested(tree: dict, path: list[str], value) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def model_from_preset_or_dict(values) -> dict:
    """Expand `model: NAME` or `model: {preset: NAME, ...fields}` into plain fields."""
    if values is None:
        return {}
    if isinstance(values, str):
        values = {"preset": values}
    if not isinstance(values, dict):
        raise ConfigError(f"'model' must be a preset name or a mapping of fields, got {values!r}")
    values = dict(values)
    preset = values.pop("preset", None)
    if preset is None:
        return values
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    return {**PRESETS[preset], **values}


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            raise ConfigError(f"config file {path} is not valid YAML{line}; fix its syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, train, ...)")
    return from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings to a config mapping (values parsed as YAML scalars or lists)."""
    raw = dict(raw)
    for item in overrides:
        keys, value = _parse_override(item)
        if keys[0] == "model" and isinstance(raw.get("model"), str):
            raw["model"] = {"preset": raw["model"]}
        _set_nested(raw, keys, value)
    return raw


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    """Build and check a Config from a mapping (a YAML file, or one saved with to_dict)."""
    values = dict(values)
    values["model"] = model_from_preset_or_dict(values.get("model"))
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def model_from_spec(values) -> ModelConfig:
    """A ModelConfig alone (a preset name or a mapping of fields, as under `model:`), checked; for the planner."""
    model = _build(ModelConfig, model_from_preset_or_dict(values), "model.")
    validate_model(model)
    return model
