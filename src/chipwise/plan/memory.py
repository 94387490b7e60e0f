"""Memory per chip for a training layout: the one place chipwise estimates how many bytes a run needs (the
planner's layouts and the trainer's up-front check, train/setup.py, both ask `training_memory`).

The formulas follow what chipwise's trainer keeps alive (train/step.py, train/loss.py, model.py), term by term as
XLA's TPU compiler allocates them (`plan --aot`: peak_memory_in_bytes of the compiled step, and its live-range dump,
for llama3-8b at seq 8192 on v5p-8 with remat none, dots and full; docs/planner.md):
  - master parameters in `train.param_dtype` (fp32, or bf16), sharded over fsdp x tensor x pipeline and replicated
    over data; AdamW's two moments in `train.moments_dtype`, sharded like the parameters and, under ZeRO-1
    (`train.shard_optimizer`), over data too;
  - the step's gradient: in the parameter dtype with one micro-batch; with several, an fp32 accumulator (the scan
    carry) that each micro-batch's gradient is added into as the backward pass makes it, so the gradient is
    counted once;
  - the weights the matmuls read in the compute dtype: XLA casts the whole local model once, outside the layer
    scan (not at all when the parameters are stored in the compute dtype); under FSDP with scanned layers
    (`model.scan_layers`) also one gathered layer and that layer's full weight gradient before its
    reduce-scatter; under FSDP with unrolled layers XLA keeps every gathered layer;
  - activations saved for the backward pass, per token and layer, under each remat policy (below), and the
    working set of the one layer the backward pass is in;
  - the LM head and the loss (train/loss.py): one chunk of logits at a time (bf16, its fp32 copy and gradient), the
    chunk split over the devices that split the batch, plus the head gathered whole in the compute dtype and its
    fp32 gradient, summed across chunks, whole on each device until the backward pass ends.
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
from chipwise.plan import assumptions as A
from chipwise.flops import layer_matmul_params, layer_param_count, param_count
from chipwise.sharding import logical_to_spec, pipeline_stage_layers
from chipwise.train.loss import chunk_size, default_chunk_tokens

GIB = 2**30
COMPUTE_BYTES = 2  # bf16 activations and gathered weights
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # train.param_dtype and train.moments_dtype
ACCUM_BYTES_PER_PARAM = 4  # fp32 gradient accumulator across micro-batches
LOGIT_BYTES = 2 + 4 + 4  # bf16 logits, their fp32 copy for the loss, and the fp32 gradient
HEAD_BYTES = COMPUTE_BYTES + 4  # the LM head gathered whole in the compute dtype, and its fp32 gradient
# Share of HBM a run may fill: the runtime (CUDA context, XLA's reserved and scratch buffers) and
# fragmentation take the rest. MaxText and torchtitan users report OOMs above ~90-95% of nominal HBM.
USABLE_HBM_FRACTION = 0.9


def kv_elements_per_token(cfg: ModelConfig, tensor: int) -> float:
    """Elements of K (or of V) per token on one chip of a tensor group of `tensor`: KV heads replicate past their
    count."""
    return cfg.num_kv_heads * cfg.head_dim / min(tensor, cfg.num_kv_heads)


def activation_elements_per_token(cfg: ModelConfig, remat: str, tensor: int) -> float:
    """Elements one layer keeps for its backward pass, per token, on one chip of a tensor group of `tensor`.

    Counted from the buffers XLA keeps across the layer scan (llama3-8b, seq 8192, TPU v5p, splash attention):
    none: everything JAX's linearisation saves: five d-wide tensors (the layer input, both norm outputs, the
          residual after attention, the attention output), q and k with rotary applied in fp32 (8 H hd in bf16
          units), k and v and the kernel's output-sized statistics (3 KV hd), the kernel's fp32 log-sum-exp (2 H),
          and in a SwiGLU FFN gate, up, sigmoid(gate), silu(gate), their product and its cast (6 d_ff; a GELU FFN
          is taken as 4 d_ff, not measured).
    dots: only matmul outputs (jax's dots_with_no_batch_dims_saveable) and the layer input: q, k and v, the two
          projections back to d and the input (3 d), gate and up (2 d_ff; GELU 1). The attention kernel's output
          is not a matmul: the backward pass recomputes it.
    full: only the layer's input (d); the layer is recomputed in the backward pass.
    """
    d, f = cfg.d_model, cfg.d_ff
    heads = cfg.num_heads * cfg.head_dim / tensor
    kv = kv_elements_per_token(cfg, tensor)
    swiglu = cfg.ffn == "swiglu"
    if remat == "none":
        return 5 * d + 8 * heads + 3 * kv + 2 * cfg.num_heads / tensor + (6 if swiglu else 4) * f / tensor
    if remat == "dots":
        return 3 * d + heads + 2 * kv + (2 if swiglu else 1) * f / tensor
    if remat == "full":
        return float(d)
    raise ValueError(f"unknown remat policy {remat!r}")


def backward_working_elements_per_token(cfg: ModelConfig, tensor: int) -> float:
    """Elements per token the backward pass of one layer holds beyond what the layers saved (its recomputed or
    saved FFN activations and their gradients): 2 d_ff + d, measured under full remat (XLA frees the layer's
    tensors as their gradients are made, so this is far below the layer's whole activation set)."""
    return 2 * cfg.d_ff / tensor + cfg.d_model


def stage_param_count(cfg: ModelConfig, pipeline: int, repeats: int = 1, schedule: str = "chipwise") -> float:
    """Parameters one pipeline stage holds: the layer slots of the most loaded stage (train/pipeline.py gives every
    stage as many: `repeats` groups of the largest group's size), plus the embedding, the final norm and the head,
    whole where the schedule runs them on every stage (chipwise's) or an even share where the first and last
    stages hold them (1f1b). All of them when pipeline is 1."""
    slots = repeats * max(pipeline_stage_layers(cfg.num_layers, pipeline * repeats))
    rest = param_count(cfg) - cfg.num_layers * layer_param_count(cfg)
    return slots * layer_param_count(cfg) + (rest if A.PIPELINE_SCHEDULES[schedule]["head_on_every_stage"]
                                             else rest / pipeline)


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
                    pipeline: int, microbatches: int, remat: str, data: int = 1, context: int = 1, repeats: int = 1,
                    schedule: str = "chipwise",
                    shard_optimizer: bool = False, param_dtype: str = "float32", moments_dtype: str = "float32",
                    loss_chunk_tokens: int = 0) -> MemoryEstimate:
    """Peak bytes on one chip.

    micro_batch_seqs: sequences in one micro-batch of one data-parallel rank (all chips of a tensor group and a
    pipeline see the same tokens; `context` chips split each of its sequences, train/context.py). With pipeline
    parallelism (`microbatches` are then the pipeline's, with no accumulation) chipwise's schedule
    (train/pipeline.py, `repeats` passes) keeps one stage input per tick (repeats x microbatches + pipeline - 1),
    the micro-batches circulating, and the activations of one group of layers for one micro-batch while its
    backward pass recomputes it; every group has as many layer slots as the largest (sharding.pipeline_stage_layers:
    first and last lighter), empty slots held as zeros. The `1f1b` schedule (published runs) holds up to `pipeline`
    micro-batches' activations instead (assumptions.PIPELINE_SCHEDULES). `data` is the data-parallel degree
    (ZeRO-1 splits the moments over it; the loss chunk is split over data x fsdp); the dtypes and
    `loss_chunk_tokens` are the train config's (train.param_dtype, train.moments_dtype, train.loss_chunk_tokens).
    """
    stages = pipeline_stage_layers(cfg.num_layers, pipeline * repeats)
    n = stage_param_count(cfg, pipeline, repeats, schedule)
    shard = fsdp * tensor  # of the stage's parameters
    param_bytes, moment_bytes = DTYPE_BYTES[param_dtype], DTYPE_BYTES[moments_dtype]
    tokens = micro_batch_seqs * seq_len / context  # this chip's share of the micro-batch
    per_layer = activation_elements_per_token(cfg, remat, tensor)
    if pipeline > 1 and A.PIPELINE_SCHEDULES[schedule]["in_flight"] == "all":
        # chipwise's: a d-wide stage input per tick, the micro-batches circulating, one group being recomputed
        held = (repeats * microbatches + pipeline - 1 + 2 * microbatches) * cfg.d_model
        saved = max(stages)
    elif pipeline > 1:  # 1F1B: stage i holds the activations of up to (pipeline - i) micro-batches in flight
        held, saved = 0, max(layers * min(pipeline - i, microbatches) for i, layers in enumerate(stages))
    else:
        held, saved = 0, cfg.num_layers
    # Context parallelism: the layer being computed also holds K and V gathered from the other context chips.
    gathered_kv = 2 * kv_elements_per_token(cfg, tensor) * (context - 1)
    activations = (held + saved * per_layer + backward_working_elements_per_token(cfg, tensor) + gathered_kv) \
        * tokens * COMPUTE_BYTES
    cast = n / shard * COMPUTE_BYTES if param_bytes != COMPUTE_BYTES else 0.0  # the local model, cast once
    if fsdp > 1 and cfg.scanned:  # plus one gathered layer and its unreduced weight gradient
        weights_compute = cast + 2 * layer_matmul_params(cfg) / tensor * COMPUTE_BYTES
    elif fsdp > 1:  # unrolled: every layer gathered, and kept
        weights_compute = n / tensor * COMPUTE_BYTES
    else:
        weights_compute = cast
    chunk = loss_chunk_tokens_per_device(cfg.vocab_size, max(1, round(micro_batch_seqs * seq_len * data * fsdp)),
                                         data=data, fsdp=fsdp,
                                         chunk_tokens=loss_chunk_tokens)
    head = cfg.d_model * cfg.vocab_size / tensor * HEAD_BYTES
    accumulate = microbatches > 1 and pipeline == 1  # a pipeline's micro-batches share one backward pass
    return MemoryEstimate(
        params=n / shard * param_bytes,
        grads=0.0 if accumulate else n / shard * param_bytes,  # with micro-batches the accumulator holds it
        optimizer=n / shard * 2 * moment_bytes / (data if shard_optimizer else 1),
        accumulator=n / shard * ACCUM_BYTES_PER_PARAM if accumulate else 0.0,
        weights_compute=weights_compute,
        activations=activations,
        logits=chunk * cfg.vocab_size / tensor * LOGIT_BYTES + head,
    )
