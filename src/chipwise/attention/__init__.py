"""One registry of attention implementations, keyed by backend.

Every implementation takes q [batch, q_len, heads, head_dim] and k, v [batch, kv_len, kv_heads, head_dim]
(grouped-query: heads is a multiple of kv_heads) and returns [batch, q_len, heads, head_dim]. Backend packages
(cuDNN through jax's GPU plugin, Pallas TPU kernels, the Neuron plugin) are imported only when that backend is
chosen, and each falls back to the reference with a logged reason when it cannot take the shape.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("chipwise.attention")

# Preference order per platform; the reference (XLA) runs everywhere and is always last.
REGISTRY: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu_fused", "reference"),
    "gpu": ("cudnn", "reference"),
    "tpu": ("splash", "reference"),
    "neuron": ("nki", "reference"),
}

# implementation name -> module in this package that defines `unsupported_reason(...)` and `attend(...)`.
MODULES = {
    "reference": "reference",
    "cpu_fused": "cpu_fused",
    "cudnn": "cudnn",
    "splash": "tpu_splash",
    "nki": "neuron_nki",
}


@dataclass(frozen=True)
class AttentionChoice:
    name: str
    fn: Callable
    fallback_reason: str = ""  # why a preferred implementation was not used, if any


def _module(name: str):
    return importlib.import_module(f"chipwise.attention.{MODULES[name]}")


def select(platform: str, *, seq_len: int, head_dim: int, num_heads: int, num_kv_heads: int, dtype,
           override: str = "auto", document_masking: bool = False) -> AttentionChoice:
    """Pick the implementation for `platform` and this shape; `override` forces one by name. With
    `document_masking` only implementations that take segment ids (attend(..., segment_ids=)) are chosen."""
    candidates = REGISTRY.get(platform, ("reference",)) if override == "auto" else (override, "reference")
    reasons = []
    for name in candidates:
        if name not in MODULES:
            raise ValueError(f"unknown attention implementation {name!r}; known: {', '.join(MODULES)}")
        try:
            mod = _module(name)
            why = mod.unsupported_reason(platform=platform, seq_len=seq_len, head_dim=head_dim,
                                         num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=dtype,
                                         document_masking=document_masking)
        except ImportError as e:  # the backend's package is not installed here
            why = f"cannot import its backend package ({e})"
        if why is None:
            reason = "; ".join(reasons)
            if reason:
                log.info("attention: using %s (%s)", name, reason)
            return AttentionChoice(name, mod.attend, reason)
        reasons.append(f"{name} not used: {why}")
    raise AssertionError("the reference attention must accept every shape")  # pragma: no cover
