"""Parsing what a plan is asked about: the model (preset or YAML), the mesh text, sizes."""

from __future__ import annotations

from pathlib import Path

import yaml

from chipwise.config import ConfigError, ModelConfig, model_from_spec
from chipwise.plan.perf import Layout
from chipwise.presets import PRESETS
from chipwise.sharding import MESH_AXES


def load_model(spec) -> ModelConfig:
    """A preset name, a YAML file of model fields (or with a `model:` section), or a mapping of fields."""
    if isinstance(spec, str) and spec not in PRESETS:
        path = Path(spec)
        if path.suffix not in (".yaml", ".yml") and not path.exists():
            raise ConfigError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read model file {spec}: {e.strerror or e}; check the path") from None
        except yaml.YAMLError as e:
            raise ConfigError(" ".join(f"model file {spec} is not valid YAML ({e}); fix the syntax".split())) from None
        if not isinstance(data, dict):
            raise ConfigError(f"model file {spec} must hold a mapping of model fields (num_layers, d_model, ...)")
        spec = data.get("model", data)
    return model_from_spec(spec)


def parse_mesh(text: str, chips: int, microbatches: int = 1, remat: str = "none") -> Layout:
    sizes = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in MESH_AXES:
            raise ConfigError(f"--mesh {text!r}: write axis=size pairs over {', '.join(MESH_AXES)}, "
                              "e.g. data=8,fsdp=16,tensor=8")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {key}={value!r} is not a whole number") from None
        if sizes[key] <= 0:
            raise ConfigError(f"--mesh {key}={sizes[key]} must be positive")
    layout = Layout(**sizes, microbatches=microbatches, remat=remat)
    if layout.chips != chips:
        raise ConfigError(f"--mesh {text} multiplies to {layout.chips} chips but --chips is {chips}; "
                          "make the product equal the chip count")
    return layout


def positive(name: str, value: float) -> float:
    if value is None or not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value
