"""The planner's assumptions: every constant the step-time model uses that the catalog does not publish.

Each figure says where it comes from. The share of its peak each platform's software stack reaches on a training
step's matmuls and attention, and the achieved time of collectives, are not here: they are fitted across the
published runs (plan/fit.py, written to achieved_efficiency.yaml). A calibration profile written by `chipwise
bench` replaces the compute and memory figures for the chip it measured.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlatformAssumptions:
    # The attention kernel's share of peak relative to the large GEMMs' (the GEMMs' share itself is fitted).
    attention_to_matmul: float
    # The matrix unit's tile: each GEMM dimension is padded up to a multiple of it (quantisation waste).
    tile: int
    # Fraction of the HBM bandwidth element-wise kernels reach.
    memory_efficiency: float
    # Attention keeps S x S scores out of memory (flash-style kernel) on this platform.
    flash_attention: bool
    # Host/launch overhead per step (s): dispatch, the step's scalar outputs, Python; small on accelerators.
    step_overhead_s: float


PLATFORMS: dict[str, PlatformAssumptions] = {
    # FlashAttention-2/cuDNN reach ~40-55% of H100's peak forward+backward (Dao, FlashAttention-3 paper, Fig. 5)
    # where cuBLAS GEMMs reach ~75%: two thirds; tensor-core tiles are 128 wide in cuBLAS's common kernels;
    # STREAM-like kernels reach ~80-90% of HBM bandwidth.
    "gpu": PlatformAssumptions(2 / 3, 128, 0.8, True, 2e-3),
    # TPU MXUs are 128x128 (v4, v5e, v5p); splash attention ~60% of peak where large GEMMs reach ~75%.
    "tpu": PlatformAssumptions(0.8, 128, 0.85, True, 2e-3),
    # Trainium's tensor engine is a 128x128 systolic array (Neuron architecture docs); NKI flash kernels are newer
    # than the GPUs': 0.45 where GEMMs reach 0.75.
    "neuron": PlatformAssumptions(0.6, 128, 0.8, True, 3e-3),
    # A CPU has no catalog peak: `chipwise bench` must calibrate it, and its profile replaces these placeholders
    # (XLA:CPU attention materialises the S x S scores).
    "cpu": PlatformAssumptions(1.0, 8, 1.0, False, 5e-3),
}

# The software stacks a platform's published runs used, and the one chipwise's own trainer is (JAX, so XLA, and on
# Trainium the Neuron compiler behind XLA): a plan uses the trainer's unless `--stack PLATFORM=STACK` names another.
PLATFORM_STACKS: dict[str, tuple[str, ...]] = {"gpu": ("xla", "pytorch"), "tpu": ("xla",), "neuron": ("neuron",),
                                               "cpu": ("xla",)}
TRAINER_STACK: dict[str, str] = {"gpu": "xla", "tpu": "xla", "neuron": "neuron", "cpu": "xla"}

# The fit (plan/fit.py). Shares of peak are searched between 0.1 and 1, the collectives' achieved/modelled time
# between 1/8 and 2. A stack's share is pulled toward its platform's, and a platform's toward all runs', with the
# weight of this many cases (a stack with one published run lands halfway between that run and its platform).
EFFICIENCY_RANGE = (0.1, 1.0)
COLLECTIVE_SCALE_RANGE = (0.125, 2.0)
PRIOR_CASES = 1.0
# Before the fit every platform assumed 0.75 of peak on large GEMMs (cuBLAS on H100 sustains ~700-750 of 989
# TFLOP/s): the "before" column of docs/planner.md's validation table, nothing else.
UNFITTED_MATMUL_EFFICIENCY = 0.75
# Prediction ranges cover this share of outcomes (two-sided), from a platform's leave-one-out errors pooled with
# all platforms' as if they were this many more cases: a platform with few runs gets nearly the all-platform spread,
# widened by Student's t at few degrees of freedom (a platform with none: all runs' spread, t at 2 degrees).
RANGE_COVERAGE = 0.8
RANGE_PRIOR_CASES = 3.0

# Chips whose matrix unit is 256x256 (Trillium and Ironwood TensorCores: Google's v6e and v7 docs).
TILE_OVERRIDES = {"tpu-v6e": 256, "tpu-v7": 256}

# Share of a fabric's one-way, all-links-summed bandwidth one collective over one mesh axis achieves, by the
# catalog's fabric.kind:
#  - switched (NVSwitch, NeuronSwitch: all-to-all): NCCL's ring all-reduce bus bandwidth is ~80% of NVLink's
#    (nccl-tests on DGX H100: ~360-370 of 450 GB/s).
#  - torus (TPU ICI, NeuronLink): a ring along one torus dimension uses 2 of the chip's 4 (2D) or 6 (3D) links;
#    XLA spreads an axis over several dimensions when the mesh allows, so we take half of the summed links.
#  - ring: both links of the ring.
FABRIC_EFFICIENCY = {"switched": 0.8, "torus": 0.5, "ring": 0.8}
# Data-centre network (EFA, DCN): ~70% of line rate for large collectives (AWS EFA NCCL tests).
NETWORK_EFFICIENCY = 0.7
# Per-collective latency (s): NVLink/ICI collectives cost a few microseconds; across the network tens.
FABRIC_LATENCY_S = 5e-6
NETWORK_LATENCY_S = 30e-6

# FSDP's all-gathers and reduce-scatters, and data-parallel gradient all-reduces, run while other layers
# compute (XLA's latency-hiding scheduler); only the first layer's gather and whatever exceeds the compute
# time stay on the critical path. Tensor-parallel collectives sit between dependent matmuls: never hidden.
# Pipeline bubbles follow 1F1B: (stages - 1) / micro-batches of the ideal time.

# Executed attention FLOPs relative to the model count (flops.py, causal): a flash kernel's backward recomputes
# the scores (fwd 2 matmuls + bwd 5 = 7 vs 6 counted). A dense kernel (CPU) computes the full S x S square and is
# modelled as its GEMMs per sequence and head (perf.py).
FLASH_ATTENTION_EXECUTED = 7 / 6
# Passes over the S x S scores a dense attention makes (fp32, forward and backward): write scores, softmax
# read/write, save probabilities, read them twice in the backward, write and read their gradient.
DENSE_SCORE_PASSES = 8

# Bytes element-wise kernels move per token and layer, forward, in units of the compute dtype: two RMSNorms
# (read+write d each, twice), RoPE on q and k, two residual adds (read 2 d, write d), the FFN gate
# (read 2 d_ff, write d_ff). The backward pass moves about twice as much.
BACKWARD_ELEMENTWISE_FACTOR = 2.0
# The LM head's loss: fp32 logits written, read for max and sum, probabilities and their gradient.
LOSS_PASSES = 6
# AdamW update per parameter shard: read param, grad, m, v and write param, m, v (fp32), write the bf16 copy.
OPTIMIZER_BYTES_PER_PARAM = 7 * 4 + 2

# Extra compute under each remat policy, as a share of the forward pass redone in the backward.
REMAT_RECOMPUTE = {"none": 0.0, "dots": 0.0, "full": 1.0}
# `dots` saves matmul outputs but recomputes the element-wise work.
REMAT_ELEMENTWISE_RECOMPUTE = {"none": 0.0, "dots": 1.0, "full": 1.0}

# Pipeline schedules the model knows. `chipwise` is what train/pipeline.py runs: GPipe or circular (repeats > 1),
# each tick keeping only its stage's input and recomputing the stage forward before its gradient; the embedding, the
# head and the loss run outside the pipeline on every stage's chips. `1f1b` is Megatron's and Meta's (the published
# runs): one forward one backward, activations of up to `pipeline` micro-batches in flight, no stage recompute,
# the embedding on the first stage and the head with the loss on the last (balanced by lighter first and last
# stages, so their cost is spread here). Both leave a bubble of (pipeline - 1) / (repeats x micro-batches) of the
# layers' work.
PIPELINE_SCHEDULES = {
    "chipwise": dict(stage_recompute=1.0, head_on_every_stage=True, in_flight="all"),
    "1f1b": dict(stage_recompute=0.0, head_on_every_stage=False, in_flight="pipeline"),
}

# ------------------------------------------------------------------------------------------------- serving
# The serving planner (plan/serving.py). Per platform, three figures a serving engine reaches; those marked
# "fitted" were chosen across the published serving cases of that platform (docs/planner.md, Serving), none per case.


@dataclass(frozen=True)
class ServingAssumptions:
    # Share of HBM (DRAM on CPUs) bandwidth a decode step's reads of the weights and the KV cache reach.
    decode_bandwidth_efficiency: float
    # Share of the dense peak the prefill's GEMMs reach (fp8 peak for fp8 weights where the chip has one, else bf16).
    prefill_efficiency: float
    # Fixed time per request in the time to first token: scheduling, tokenisation, the engine's host work.
    request_overhead_s: float
    # The rest is fitted by `chipwise bench --serve` for the engine it measures (chipwise serve on this CPU); the
    # published cases fold such costs into the shares above, so for them these keep their neutral values.
    # Fixed host time per decode step (the scheduler, dispatch).
    decode_step_overhead_s: float = 0.0
    # Time per sequence in flight added to every prefill (chipwise's engine moves every slot's cache rows when it
    # prefills one: measured on this project's CPU, the time to first token grows with the slots, not the prompt).
    sequence_overhead_s: float = 0.0
    # Share of the peak a decode step's matmuls (a few rows each) reach; None: the prefill's share.
    decode_compute_efficiency: float | None = None
    # Memory traffic and compute overlap (a step takes the slower: a roofline); False: they add up, as XLA:CPU runs
    # a decode step's reads and matmuls one after the other.
    overlap: bool = True


SERVING: dict[str, ServingAssumptions] = {
    # TensorRT-LLM / vLLM decode kernels read weights at ~75% of HBM bandwidth (the H100 here copies at ~90%,
    # catalog notes; a GEMV with dequantisation and a fused epilogue reaches less); prefill GEMMs at half the peak,
    # below training's 0.75 because fp8 GEMMs and the attention of long prompts reach a smaller share.
    "gpu": ServingAssumptions(0.75, 0.5, 5e-3),
    # No published TTFT or TPOT case on TPU: the training figures' HBM share (0.85) less the GPUs' 0.05 decode
    # penalty, and the GPUs' prefill share.
    "tpu": ServingAssumptions(0.8, 0.5, 5e-3),
    # Fitted across S1-S3 (inf2) and S6 (trn2): transformers-neuronx and NxD Inference prefill at ~30% of the peak
    # and spend ~20 ms per request before the prefill's compute (host, bucketed graph launch).
    "neuron": ServingAssumptions(0.7, 0.3, 20e-3),
    # Informed by S7 alone (llama.cpp on Graviton4, the only CPU case): 70% of the DRAM bandwidth in decode and 45%
    # of the bf16 peak in prefill; llama.cpp has no server in the loop.
    "cpu": ServingAssumptions(0.7, 0.45, 0.0),
}

# All-reduce latency over each fabric (catalog fabric.name), as (base_s, per_step_s): a ring all-reduce over t chips
# takes 2 (t - 1) steps (a reduce-scatter then an all-gather), so latency = base + 2 (t - 1) x per_step. Decode under
# tensor parallelism pays two of them per layer with a few kilobytes each: their latency, not bandwidth, counts.
#  - NVLink: NCCL's own tuning model for a ring all-reduce with its low-latency protocol over NVLink, 3.6 us base and
#    0.47 us a step (NVIDIA/nccl src/graph/tuning.cc, baseLat and hwLat).
#  - ICI: "each hop over an ICI link ... typically around 1us" (jax-ml scaling-book, sharding chapter); a
#    bidirectional ring covers an all-reduce in about t hops, i.e. 2 (t - 1) steps of 0.5 us.
#  - NeuronLink: no published figure; 3.2 us a step is fitted across S1-S3 (12 inf2 chips) and S6 (16 trn2 chips),
#    whose decode time beyond the weights' bandwidth grows with the layer count, as per-layer latency does.
ALLREDUCE_LATENCY_S: dict[str, tuple[float, float]] = {
    "NVLink3": (3.6e-6, 0.47e-6),
    "NVLink4": (3.6e-6, 0.47e-6),
    "NVLink5": (3.6e-6, 0.47e-6),
    "ICI": (0.0, 0.5e-6),
    "NeuronLink-v2": (0.0, 3.2e-6),
    "NeuronLink-v3": (0.0, 3.2e-6),
    "NeuronLink-v4": (0.0, 3.2e-6),
}

# Bytes per KV-cache element by the weights' dtype: bf16 for every quantised or bf16 format (the engines' default;
# an fp8 cache would halve it), fp32 beside fp32 weights (chipwise serve's CPU engine keeps both in fp32).
KV_CACHE_BYTES = {"bf16": 2, "fp8": 2, "int8": 2, "q4_0": 2, "fp32": 4}
# Bytes per weight of each storage format `plan --serve --weights-dtype` takes. q4_0 is llama.cpp's: blocks of 32
# 4-bit weights with one fp16 scale, 18 bytes per 32 weights. int8 and q4_0 are weight-only formats: their matmuls
# run at the bf16 rate; fp8 runs at the fp8 rate where the chip has one, fp32 at the fp32 rate where it has one.
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "q4_0": 18 / 32, "fp32": 4.0}
