"""The checks a run configuration must pass (config.py loads it): sizes, choices, ranges and the layout rules the
trainer and the planner share (context_splits, pipeline_microbatches, pipeline_schedule_problem). Every problem is
one ConfigError line naming the key and how to fix it. It reads the dataclasses of config.py by attribute and
imports nothing of it (config.py imports this module)."""

from __future__ import annotations

import math

from chipwise.errors import ConfigError

CHOICES = {
    "model.ffn": ("swiglu", "gelu"),
    "model.rope_type": ("default", "llama3"),
    "train.schedule": ("cosine", "wsd"),
    "train.dtype": ("auto", "bfloat16", "float32"),
    "train.remat": ("none", "full", "dots"),
    "train.param_dtype": ("float32", "bfloat16"),
    "train.moments_dtype": ("float32", "bfloat16"),
}


def validate_model(m, where: str = "model") -> None:
    for name in ("num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff", "vocab_size", "max_seq_len"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"{where}.{name} must be positive, got {getattr(m, name)}")
    if m.d_model % m.num_heads:
        raise ConfigError(f"{where}.num_heads ({m.num_heads}) must divide {where}.d_model ({m.d_model})")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"{where}.num_kv_heads ({m.num_kv_heads}) must divide {where}.num_heads ({m.num_heads})")
    if m.head_dim % 2:
        raise ConfigError(f"head size d_model/num_heads = {m.head_dim} must be even for rotary embeddings")
    if m.ffn not in CHOICES["model.ffn"]:
        raise ConfigError(f"model.ffn must be one of {', '.join(CHOICES['model.ffn'])}, got {m.ffn!r}")
    if m.norm_eps <= 0 or m.rope_theta <= 0:
        raise ConfigError(f"{where}.norm_eps and {where}.rope_theta must be positive")
    if m.rope_type not in CHOICES["model.rope_type"]:
        raise ConfigError(f"{where}.rope_type must be one of {', '.join(CHOICES['model.rope_type'])}, "
                          f"got {m.rope_type!r}")
    if m.rope_type == "llama3" and not (m.rope_factor >= 1 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                                        and m.rope_original_max_seq_len > 0):
        raise ConfigError(f"{where}.rope_type=llama3 needs rope_factor >= 1, 0 < rope_low_freq_factor < "
                          f"rope_high_freq_factor and a positive rope_original_max_seq_len; got {m.rope_factor}, "
                          f"{m.rope_low_freq_factor}, {m.rope_high_freq_factor}, {m.rope_original_max_seq_len}")


# The optimizer's numbers and their valid ranges. Each test is written so that NaN fails it (every comparison
# with NaN is False): a NaN or an out-of-range value here trains without error and quietly ruins the run (a
# negative min_lr_ratio drives the learning rate below zero, and the loss climbs). optax's
# clip_by_global_norm scales every update to zero at a bound of 0, so 0 cannot mean "no clipping"; infinities
# are refused too, as the config is also stored as JSON (checkpoint metadata), which has no infinity.
_OPTIMIZER_RANGES = (
    ("lr", lambda v: 0 < v < math.inf, "a positive finite number (the peak learning rate, e.g. 3e-4)"),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1] (the final learning rate as a share of train.lr)"),
    ("decay_fraction", lambda v: 0 < v <= 1, "in (0, 1] (the share of steps the wsd schedule spends decaying)"),
    ("beta1", lambda v: 0 <= v < 1, "in [0, 1) (Adam's first-moment decay, e.g. 0.9)"),
    ("beta2", lambda v: 0 <= v < 1, "in [0, 1) (Adam's second-moment decay, e.g. 0.95)"),
    ("adam_eps", lambda v: 0 < v < math.inf, "a positive finite number (e.g. 1e-8)"),
    ("weight_decay", lambda v: 0 <= v < math.inf, "zero or a positive finite number (e.g. 0.1; 0 turns it off)"),
    ("grad_clip", lambda v: 0 < v < math.inf,
     "a positive finite number (the largest global gradient norm allowed, e.g. 1.0; 1e9 leaves gradients as they are)"),
)


def _validate_optimizer(t) -> None:
    for name, ok, valid in _OPTIMIZER_RANGES:
        value = getattr(t, name)
        if not ok(value):
            raise ConfigError(f"train.{name} must be {valid}, got {value}")


def context_splits(seq_len: int, context: int) -> bool:
    """Whether a sequence splits for context parallelism: into 2 x context equal chunks, two per device (the
    zig-zag layout of train/context.py). The trainer's config check and the planner's layout check both ask."""
    return context == 1 or seq_len % (2 * context) == 0


def pipeline_microbatches(t, stages: int) -> int:
    """Micro-batches per accumulation step in the pipeline: train.pipeline_microbatches, or one per stage."""
    return t.pipeline_microbatches or stages


def pipeline_schedule_problem(num_layers: int, stages: int, repeats: int, microbatches: int) -> str | None:
    """Why `stages` pipeline stages, `repeats` passes and `microbatches` micro-batches cannot run a model of
    `num_layers` layers (train/pipeline.py), or None. The trainer's config check and the planner's layout check both
    ask."""
    if stages * repeats > num_layers:
        return (f"{stages} stages x {repeats} passes = {stages * repeats} groups of layers for {num_layers} layers "
                f"leaves stages without a layer; use at most {num_layers} groups")
    if repeats > 1 and microbatches < stages:
        return (f"a circular pipeline ({repeats} passes) needs at least as many micro-batches as stages: "
                f"{microbatches} < {stages}")
    return None


def _validate_pipeline(cfg) -> None:
    t, stages = cfg.train, cfg.mesh.pipeline
    if t.pipeline_microbatches < 0:
        raise ConfigError(f"train.pipeline_microbatches must be zero (one per stage) or more, got "
                          f"{t.pipeline_microbatches}")
    if t.pipeline_repeats < 1:
        raise ConfigError(f"train.pipeline_repeats must be 1 (GPipe) or more (circular), got {t.pipeline_repeats}")
    if stages == 1:
        if t.pipeline_repeats > 1:
            raise ConfigError("train.pipeline_repeats > 1 needs a pipeline; set mesh.pipeline > 1 or leave it at 1")
        return
    micro = pipeline_microbatches(t, stages)
    problem = pipeline_schedule_problem(cfg.model.num_layers, stages, t.pipeline_repeats, micro)
    if problem:
        raise ConfigError(f"mesh.pipeline={stages}, train.pipeline_repeats={t.pipeline_repeats}, "
                          f"train.pipeline_microbatches={micro}: {problem}")
    if cfg.model.scan_layers is False:
        raise ConfigError("mesh.pipeline > 1 splits the stacked layers into stages; set model.scan_layers=true")
    if (t.batch_size // t.grad_accum) % micro:
        raise ConfigError(f"each accumulation step's {t.batch_size // t.grad_accum} sequences (train.batch_size / "
                          f"train.grad_accum) must split into train.pipeline_microbatches = {micro} micro-batches; "
                          "change either")


def validate(cfg) -> None:
    validate_model(cfg.model)
    t = cfg.train
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "eval_batches",
                 "checkpoint_every", "keep_checkpoints"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
    for name in ("keep_every", "max_rollbacks", "loss_chunk_tokens"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be zero or more, got {getattr(t, name)}")
    if t.max_bad_steps <= 0:
        raise ConfigError(f"train.max_bad_steps must be positive, got {t.max_bad_steps}")
    if any(i < 0 for i in t.inject_nan_batches):
        raise ConfigError(f"train.inject_nan_batches holds data positions, which start at 0; "
                          f"got {t.inject_nan_batches}")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be zero or more, got {t.warmup_steps}")
    _validate_optimizer(t)
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len}); "
                          f"lower train.seq_len or raise model.max_seq_len")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {cfg.data.val_fraction}")
    _validate_mixture(cfg.data)
    if cfg.data.prepare_workers < 0:
        raise ConfigError(f"data.prepare_workers must be 0 (one per core) or a positive count, got "
                          f"{cfg.data.prepare_workers}")
    if cfg.mesh.pipeline < 1:
        raise ConfigError(f"mesh.pipeline must be a positive number of stages, got {cfg.mesh.pipeline}")
    _validate_pipeline(cfg)
    for name in ("data", "fsdp", "context", "tensor"):
        v = getattr(cfg.mesh, name)
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{name} must be a positive size or -1 (fill), got {v}")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.context, mesh.tensor may be -1")
    if not context_splits(t.seq_len, cfg.mesh.context):
        raise ConfigError(f"train.seq_len ({t.seq_len}) must divide into 2 x mesh.context = {2 * cfg.mesh.context} "
                          "chunks (context parallelism gives each device two of them); change either")
    h = cfg.hardware
    for name in ("price_per_hour", "power_watts", "peak_tflops"):
        v = getattr(h, name)
        if v is not None and not 0 < v < math.inf:  # so NaN fails too
            raise ConfigError(f"hardware.{name} must be positive and finite, got {v}")


def _validate_mixture(d) -> None:
    if not d.mixture:
        return
    if d.sources:
        raise ConfigError("data.sources and data.mixture are exclusive: list every source under a mixture part")
    names = set()
    for i, part in enumerate(d.mixture):
        where = f"data.mixture[{i}]" + (f" ({part.name})" if part.name else "")
        if not part.name:
            raise ConfigError(f"{where} needs a name (it labels the part in metrics and reports)")
        if part.name in names:
            raise ConfigError(f"{where}: the name {part.name!r} is used twice; give each part its own")
        names.add(part.name)
        if not part.sources:
            raise ConfigError(f"{where} lists no sources; give it files or directories under 'sources'")
        if not math.isfinite(part.weight) or part.weight <= 0:
            raise ConfigError(f"{where} (sources {', '.join(part.sources)}) has weight {part.weight}; weights must be "
                              f"positive (a part with no weight is left out of the mixture, not weighted 0)")


# A learning rate at or above this is a from-scratch one: on trained weights it undoes what they learned.
FROM_SCRATCH_LR = 1e-3
# Continued pre-training's: about the rate a pre-trained model's own run ended at.
CONTINUED_LR = 1e-4


def continued_pretraining_defaults(steps: int) -> list[str]:
    """`--set` items giving a run from trained weights what config_warnings asks of it: a continued-pre-training
    learning rate and a warm-up of about a tenth of its `steps` (`chipwise import` puts the user's items after
    these)."""
    return [f"train.lr={CONTINUED_LR:g}", f"train.warmup_steps={max(1, steps // 10)}"]


def config_warnings(cfg) -> list[str]:
    """Settings that are valid but probably not what the user wants; each a line the trainer prints at start."""
    t, out = cfg.train, []
    if t.init_from:  # continued pre-training: docs/ecosystem.md has the recipe
        if t.warmup_steps >= t.steps:
            out.append(f"train.warmup_steps ({t.warmup_steps}) covers the whole run ({t.steps} steps), so the "
                       f"learning rate never leaves its warm-up; set it to about a tenth of train.steps")
        if t.lr >= FROM_SCRATCH_LR:
            out.append(f"train.lr {t.lr:g} is a from-scratch rate: starting from trained weights "
                       f"({t.init_from}) it raises the loss before lowering it; continued pre-training uses about "
                       f"the original run's final rate, e.g. --set train.lr={CONTINUED_LR:g}")
    return out
