"""Memory per chip for a training layout: the one place chipwise estimates how many bytes a run needs (the
planner's layouts and the trainer's up-front check, train/setup.py, both ask `training_memory`).

The formulas follow what chipwise's trainer keeps alive (train/step.py, train/loss.py, model.py):
  - master parameters and their gradients in `train.param_dtype` (fp32, or bf16), sharded over fsdp x tensor x
    pipeline and replicated over data;
  - AdamW's two moments in `train.moments_dtype`, sharded like the parameters and, under ZeRO-1
    (`train.shard_optimizer`), over data too;
  - an fp32 gradient accumulator when a step has several micro-batches (the scan carry);
  - the weights the matmuls read in the compute dtype: under FSDP with scanned layers (`model.scan_layers`) one
    gathered layer and that layer's full weight gradient before its reduce-scatter (the backward scan: measured on
    XLA:CPU, about two layers' worth); otherwise, and under FSDP with unrolled layers (XLA then keeps every gathered
    layer: measured), the whole local model (without FSDP, none when the parameters are stored in the compute
    dtype: the matmuls then read them as they are);
  - activations saved for the backward pass, per token and layer, under each remat policy (below);
  - the LM head and the loss (train/loss.py): one chunk of logits at a time (bf16, its fp32 copy and gradient), the
    chunk split over the devices that split the batch, plus the head whole on each device in fp32 and its fp32
    gradient accumulated across chunks.
Activation counts are in elements of the compute dtype (2 bytes). Embedding-sized tensors (d_model wide) are
replicated across the tensor axis, as chipwise does today (no sequence parallelism); head- and FFN-wide
tensors are split by it. Checked against XLA's own memory analysis of the compiled step (tests/test_planner.py,
tests/test_precision.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

from chipwise.config import ModelConfig
from chipwise.flops import layer_matmul_params, param_count
from chipwise.sharding import logical_to_spec
from chipwise.train.loss import chunk_size, default_chunk_tokens

GIB = 2**30
COMPUTE_BYTES = 2  # bf16 activations and gathered weights
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # train.param_dtype and train.moments_dtype
ACCUM_BYTES_PER_PARAM = 4  # fp32 gradient accumulator across micro-batches
LOGIT_BYTES = 2 + 4 + 4  # bf16 logits, their fp32 copy for the loss, and the fp32 gradient
HEAD_BYTES = 4 + 4  # the LM head whole on each device (fp32) and its fp32 gradient summed across loss chunks
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


def loss_chunk_tokens_per_device(vocab_size: int, tokens: int, *, data: int, fsdp: int,
                                 chunk_tokens: int = 0) -> float:
    """Tokens of one loss chunk on one device (train/loss.py): `tokens` is one micro-batch of the whole mesh,
    `chunk_tokens` is `train.loss_chunk_tokens` (0: the default for the vocabulary). A chunk is split over the
    data x fsdp devices when they divide it (else data alone, else not at all), by the trainer's own rule."""
    chunk = chunk_size(tokens, chunk_tokens or default_chunk_tokens(vocab_size))
    mesh = SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": 1})  # logical_to_spec reads only sizes
    axes = logical_to_spec(("batch",), (chunk,), mesh)[0]
    split = 1 if axes is None else math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    return chunk / split


def training_memory(cfg: ModelConfig, seq_len: int, micro_batch_seqs: float, *, fsdp: int, tensor: int,
                    pipeline: int, microbatches: int, remat: str, data: int = 1, shard_optimizer: bool = False,
                    param_dtype: str = "float32", moments_dtype: str = "float32",
                    loss_chunk_tokens: int = 0) -> MemoryEstimate:
    """Peak bytes on one chip.

    micro_batch_seqs: sequences in one micro-batch of one data-parallel rank (all chips of a tensor group and a
    pipeline see the same tokens). With pipeline parallelism the first stage holds the activations of up to
    `pipeline` micro-batches in flight (1F1B schedule) for its share of the layers. `data` is the data-parallel
    degree (ZeRO-1 splits the moments over it; the loss chunk is split over data x fsdp); the dtypes and
    `loss_chunk_tokens` are the train config's (train.param_dtype, train.moments_dtype, train.loss_chunk_tokens).
    """
    shard = fsdp * tensor * pipeline
    n = param_count(cfg)
    param_bytes, moment_bytes = DTYPE_BYTES[param_dtype], DTYPE_BYTES[moments_dtype]
    layers_here = cfg.num_layers / pipeline
    tokens = micro_batch_seqs * seq_len
    in_flight = min(pipeline, microbatches)
    per_layer = activation_elements_per_token(cfg, remat, tensor)
    activations = layers_here * per_layer * tokens * in_flight * COMPUTE_BYTES
    if remat == "full":  # the layer being recomputed holds all of its activations once
        activations += activation_elements_per_token(cfg, "none", tensor) * tokens * COMPUTE_BYTES
    if fsdp > 1 and cfg.scanned:  # one gathered layer and its unreduced weight gradient
        weights_compute = 2 * layer_matmul_params(cfg) / tensor * COMPUTE_BYTES
    elif fsdp > 1 or param_bytes != COMPUTE_BYTES:  # the whole local model gathered, or cast for the matmuls
        weights_compute = n / (tensor * pipeline) * COMPUTE_BYTES
    else:
        weights_compute = 0.0
    chunk = loss_chunk_tokens_per_device(cfg.vocab_size, max(1, round(tokens * data * fsdp)), data=data, fsdp=fsdp,
                                         chunk_tokens=loss_chunk_tokens)
    head = cfg.d_model * cfg.vocab_size / tensor * HEAD_BYTES
    return MemoryEstimate(
        params=n / shard * param_bytes,
        grads=n / shard * param_bytes,
        optimizer=n / shard * 2 * moment_bytes / (data if shard_optimizer else 1),
        accumulator=n / shard * ACCUM_BYTES_PER_PARAM if microbatches > 1 else 0.0,
        weights_compute=weights_compute,
        activations=activations,
        logits=chunk * cfg.vocab_size / tensor * LOGIT_BYTES + head,
    )
