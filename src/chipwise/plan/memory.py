"""Memory per chip for a training layout: the one place chipwise estimates how many bytes a run needs.

The formulas follow what chipwise's trainer keeps alive (train/step.py, model.py):
  - fp32 master parameters, fp32 gradients and AdamW's two fp32 moments (16 bytes per parameter), sharded over
    fsdp x tensor x pipeline and replicated over data;
  - a gradient accumulator (4 bytes per parameter shard) when a step has several micro-batches (the scan carry);
  - the bf16 copy of the weights the matmuls read: one layer at a time (plus one prefetched) under FSDP, the
    whole local model otherwise;
  - activations saved for the backward pass, per token and layer, under each remat policy (below);
  - the logits of the LM head, cast to fp32 for the loss (next_token_loss), with their gradient.
Activation counts are in elements of the compute dtype (2 bytes). Embedding-sized tensors (d_model wide) are
replicated across the tensor axis, as chipwise does today (no sequence parallelism); head- and FFN-wide
tensors are split by it. Checked against XLA's own memory analysis of the compiled step (tests/test_planner.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from chipwise.config import ModelConfig
from chipwise.flops import layer_matmul_params, param_count

GIB = 2**30
COMPUTE_BYTES = 2  # bf16 activations and gathered weights
STATE_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 master + fp32 gradient + AdamW m and v
ACCUM_BYTES_PER_PARAM = 4  # fp32 gradient accumulator across micro-batches
LOGIT_BYTES = 2 + 4 + 4  # bf16 logits, their fp32 copy for the loss, and the fp32 gradient
# Share of HBM a run may fill: the runtime (CUDA context, XLA's reserved and scratch buffers) and
# fragmentation take the rest. MaxText and torchtitan users report OOMs above ~90-95% of nominal HBM.
USABLE_HBM_FRACTION = 0.9


def activation_elements_per_token(cfg: ModelConfig, remat: str, tensor: int) -> float:
    """Elements one layer keeps for its backward pass, per token, on one chip of a tensor group of `tensor`.

    none: every input a backward needs: the two norm inputs and outputs (4 d), q, k, v and the attention
          output (2 H hd + 2 KV hd), the FFN's gate, up and their product (3 d_ff; GELU 2 d_ff).
    dots: only matmul outputs (jax's dots_with_no_batch_dims_saveable) and the layer input: q, k, v, attention
          output, the two projections back to d (2 d), gate and up (2 d_ff), plus the input (d).
    full: only the layer's input (d); the layer is recomputed in the backward pass.
    """
    d, f = cfg.d_model, cfg.d_ff
    heads = cfg.num_heads * cfg.head_dim / tensor
    kv = cfg.num_kv_heads * cfg.head_dim / min(tensor, cfg.num_kv_heads)  # kv heads replicate past their count
    ffn_saved = {"none": 3 if cfg.ffn == "swiglu" else 2, "dots": 2 if cfg.ffn == "swiglu" else 1}
    if remat == "none":
        return 4 * d + 2 * heads + 2 * kv + ffn_saved["none"] * f / tensor
    if remat == "dots":
        return 3 * d + 2 * heads + 2 * kv + ffn_saved["dots"] * f / tensor
    if remat == "full":
        return float(d)
    raise ValueError(f"unknown remat policy {remat!r}")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per chip, by what holds them."""
    params: float
    grads: float
    optimizer: float
    accumulator: float
    weights_compute: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return (self.params + self.grads + self.optimizer + self.accumulator + self.weights_compute
                + self.activations + self.logits)

    def as_gib(self) -> dict[str, float]:
        parts = {k: getattr(self, k) / GIB for k in
                 ("params", "grads", "optimizer", "accumulator", "weights_compute", "activations", "logits")}
        return {**parts, "total": self.total / GIB}


def training_memory(cfg: ModelConfig, seq_len: int, micro_batch_seqs: float, *, fsdp: int, tensor: int,
                    pipeline: int, microbatches: int, remat: str) -> MemoryEstimate:
    """Peak bytes on one chip.

    micro_batch_seqs: sequences in one micro-batch of one data-parallel rank (all chips of a tensor group and a
    pipeline see the same tokens). With pipeline parallelism the first stage holds the activations of up to
    `pipeline` micro-batches in flight (1F1B schedule) for its share of the layers.
    """
    shard = fsdp * tensor * pipeline
    n = param_count(cfg)
    layers_here = cfg.num_layers / pipeline
    tokens = micro_batch_seqs * seq_len
    in_flight = min(pipeline, microbatches)
    per_layer = activation_elements_per_token(cfg, remat, tensor)
    activations = layers_here * per_layer * tokens * in_flight * COMPUTE_BYTES
    if remat == "full":  # the layer being recomputed holds all of its activations once
        activations += activation_elements_per_token(cfg, "none", tensor) * tokens * COMPUTE_BYTES
    if fsdp > 1:  # gathered one layer at a time, the next one prefetched
        weights_compute = 2 * layer_matmul_params(cfg) / tensor * COMPUTE_BYTES
    else:
        weights_compute = n / (tensor * pipeline) * COMPUTE_BYTES
    return MemoryEstimate(
        params=n / shard * 4,
        grads=n / shard * 4,
        optimizer=n / shard * 8,
        accumulator=n / shard * ACCUM_BYTES_PER_PARAM if microbatches > 1 else 0.0,
        weights_compute=weights_compute,
        activations=activations,
        logits=tokens * cfg.vocab_size / tensor * LOGIT_BYTES,
    )
