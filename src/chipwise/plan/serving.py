"""Serving a model on one chip type: time to first token (TTFT), time per output token (TPOT), output tokens per
second, the largest batch whose KV cache fits, memory per chip, dollars and kWh per million output tokens, and the
tensor-parallel degree to serve with. Modelled, not measured; every constant is in assumptions.py (SERVING,
ALLREDUCE_LATENCY_S, KV_CACHE_BYTES), FLOPs come from flops.py and the KV cache's size from memory.py.

A replica is `tensor` chips holding one copy of the weights; the chips are split into chips / tensor replicas,
each serving its own requests. A decode step makes one token for every sequence a replica holds:

    step = max(bytes read / (bandwidth x efficiency), FLOPs / (peak x efficiency)) + 2 x layers x all-reduce

The bytes are this chip's share of the weights and the KV cache of every sequence at its context; the all-reduces
(after attention's and the FFN's output projections) carry batch x d_model activations, so at small batches their
latency (per fabric) is what costs. A prefill processes prompts:

    max(FLOPs / (peak x efficiency), weight bytes / bandwidth) + the all-reduces over the prompt tokens + overhead

Two ways to batch. `batch`: static batches (B sequences over all chips) prefilled together and decoded to the end;
TTFT is the whole batch's prefill. `concurrency`: C requests always in flight (continuous batching); a new prompt
is prefilled alone between decode steps, so TTFT is one prompt's prefill, and a request's decode also waits for the
prefills of the C - 1 others that start while it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from chipwise import catalog
from chipwise.catalog import Accelerator
from chipwise.catalog.power import PowerRange
from chipwise.config import ModelConfig
from chipwise.errors import ConfigError
from chipwise.flops import forward_flops_per_token, matmul_params, param_count
from chipwise.plan import assumptions as A
from chipwise.plan.memory import GIB, USABLE_HBM_FRACTION, kv_elements_per_token

WEIGHT_BYTES = A.WEIGHT_BYTES
ACTIVATION_BYTES = 2  # the all-reduced activations are bf16


@dataclass(frozen=True)
class ServeRequest:
    model: ModelConfig
    accelerators: list[str]
    chips: int
    input_len: int
    output_len: int
    batch: int | None = None  # sequences per static batch, over all chips
    concurrency: int | None = None  # requests in flight, over all chips
    weights_dtype: str = "bf16"
    tensor: int | None = None  # pins the tensor-parallel degree (else chosen)
    max_tpot_s: float | None = None  # a latency target: the TP degree (and concurrency, if not given) meet it
    catalog_overrides: dict | None = None
    calibration_dir: str | None = None  # where `chipwise bench --serve` profiles are (default: the cache's)


@dataclass
class ServeEstimate:
    accelerator: Accelerator
    chips: int
    tensor: int
    mode: str  # "batch" or "concurrency"
    per_replica: int  # sequences a replica decodes together
    ttft_s: float
    tpot_s: float
    output_tokens_per_s: float
    max_batch: int  # sequences whose KV cache fits, over all chips
    memory_per_chip_gib: float
    usable_gib: float
    parts: dict[str, float]  # seconds: the decode step's and the prefill's parts
    weights_dtype: str = "bf16"
    meets_target: bool | None = None  # against max_tpot_s; None without one
    considered: list = field(default_factory=list)  # (tensor, reason not chosen) for the other degrees
    assumptions: A.ServingAssumptions | None = None  # the constants used (a calibration's, or the platform's)

    @property
    def replicas(self) -> int:
        return self.chips // self.tensor

    @property
    def fits(self) -> bool:
        return self.memory_per_chip_gib <= self.usable_gib

    @property
    def sequences(self) -> int:
        """Sequences in flight over all chips."""
        return self.per_replica * self.replicas

    def usd_per_million_output_tokens(self) -> float | None:
        price = self.accelerator.price_per_chip_hour
        return price * self.chips / 3600 / self.output_tokens_per_s * 1e6 if price else None

    def kwh_per_million_output_tokens(self) -> tuple[float, float] | None:
        """(low, high): equal for a chip with one power figure; None where the catalog has none."""
        watts: PowerRange | None = self.accelerator.power_range()
        return watts.scale(self.chips / 1000 / 3600 / self.output_tokens_per_s * 1e6) if watts else None

    def as_dict(self) -> dict:
        acc, kwh, watts = self.accelerator, self.kwh_per_million_output_tokens(), self.accelerator.power_range()
        return {
            "accelerator": acc.id, "chips": self.chips, "tensor_parallel": self.tensor, "replicas": self.replicas,
            "mode": self.mode, "sequences_in_flight": self.sequences, "weights_dtype": self.weights_dtype,
            "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "output_tokens_per_s": self.output_tokens_per_s,
            "output_tokens_per_s_per_chip": self.output_tokens_per_s / self.chips, "max_batch": self.max_batch,
            "memory_per_chip_gib": self.memory_per_chip_gib, "usable_memory_per_chip_gib": self.usable_gib,
            "fits": self.fits, "meets_tpot_target": self.meets_target,
            "usd_per_million_output_tokens": self.usd_per_million_output_tokens(),
            # One figure only where the chip's power is one figure; a range's ends are in the *_range field.
            "kwh_per_million_output_tokens": kwh[0] if kwh and watts.is_point else None,
            "kwh_per_million_output_tokens_range": list(kwh) if kwh else None,
            "price_per_chip_hour": acc.price_per_chip_hour,
            "power_watts_range": [watts.low, watts.high] if watts else None,
            "power_basis": watts.basis if watts else None, "power_unknown": acc.power_unknown,
            "modelled": True, "parts_s": self.parts,
            "tensor_parallel_considered": [{"tensor_parallel": t, "why_not": why} for t, why in self.considered],
        }


# ---------------------------------------------------------------------------------------------- the pieces


def weights_bytes(cfg: ModelConfig, dtype: str) -> float:
    """Every stored weight (embedding included: it sits in memory even though a step reads only its rows)."""
    return param_count(cfg) * WEIGHT_BYTES[dtype]


def kv_bytes_per_token(cfg: ModelConfig, tensor: int, weights_dtype: str = "bf16") -> float:
    """K and V of one token, every layer, on one chip of a tensor group (KV heads replicate past their count)."""
    return 2 * cfg.num_layers * kv_elements_per_token(cfg, tensor) * A.KV_CACHE_BYTES[weights_dtype]


def allreduce_s(acc: Accelerator, tensor: int, nbytes: float) -> float:
    """One all-reduce of `nbytes` over `tensor` chips of the fabric: latency plus a ring's bandwidth term."""
    if tensor <= 1:
        return 0.0
    if acc.fabric.name not in A.ALLREDUCE_LATENCY_S or not acc.fabric.gbps_per_chip:
        raise ConfigError(f"{acc.id}: no all-reduce latency or bandwidth for fabric {acc.fabric.name!r} "
                          "(plan/assumptions.py ALLREDUCE_LATENCY_S, catalog fabric); serve it with tensor=1")
    base, per_step = A.ALLREDUCE_LATENCY_S[acc.fabric.name]
    steps = 2 * (tensor - 1)
    bandwidth = acc.fabric.gbps_per_chip * 1e9 * A.FABRIC_EFFICIENCY[acc.fabric.kind]
    return base + steps * per_step + steps / tensor * nbytes / bandwidth


def _peak_flops(acc: Accelerator, dtype: str) -> float:
    peak = {"fp8": acc.fp8_tflops, "fp32": acc.fp32_tflops}.get(dtype) or acc.bf16_tflops
    if not peak or not acc.hbm_tbps or not acc.hbm_gib:
        raise ConfigError(f"{acc.id} has no bf16 peak, memory bandwidth or memory size in the catalog; calibrate this "
                          "machine's CPU with `chipwise bench --serve`, pick a chip "
                          "that has them or set them with --catalog-set")
    return peak * 1e12


@dataclass(frozen=True)
class _Chip:
    """What one chip of a replica does: the platform's efficiencies (or a `chipwise bench --serve` calibration's)
    applied to the catalog's figures (or the measured ones)."""
    acc: Accelerator
    cfg: ModelConfig
    tensor: int
    dtype: str
    calibrated: A.ServingAssumptions | None = None

    @property
    def assume(self) -> A.ServingAssumptions:
        return self.calibrated or A.SERVING[self.acc.platform]

    @property
    def bandwidth(self) -> float:
        return self.acc.hbm_tbps * 1e12 * self.assume.decode_bandwidth_efficiency

    @property
    def flops_rate(self) -> float:
        return _peak_flops(self.acc, self.dtype) * self.assume.prefill_efficiency

    @property
    def decode_flops_rate(self) -> float:
        return _peak_flops(self.acc, self.dtype) * (self.assume.decode_compute_efficiency
                                                     or self.assume.prefill_efficiency)

    def combine(self, memory: float, compute: float) -> float:
        """A roofline (the slower of the two) where traffic and compute overlap, else their sum."""
        return max(memory, compute) if self.assume.overlap else memory + compute

    def weights_read_s(self) -> float:
        """A pass over the weights that multiply: every layer and the LM head (the embedding is a lookup)."""
        return matmul_params(self.cfg) * WEIGHT_BYTES[self.dtype] / self.tensor / self.bandwidth

    def comm_s(self, tokens: float) -> float:
        nbytes = tokens * self.cfg.d_model * ACTIVATION_BYTES
        return 2 * self.cfg.num_layers * allreduce_s(self.acc, self.tensor, nbytes)

    def decode_step(self, batch: int, context: float) -> dict[str, float]:
        kv = batch * context * kv_bytes_per_token(self.cfg, self.tensor, self.dtype) / self.bandwidth
        flops = batch * forward_flops_per_token(self.cfg, max(1, round(context)), causal=False).total
        compute = flops / self.tensor / self.decode_flops_rate
        memory = self.weights_read_s() + kv
        step = self.combine(memory, compute) + self.comm_s(batch) + self.assume.decode_step_overhead_s
        return {"decode_weights_s": self.weights_read_s(), "decode_kv_s": kv, "decode_compute_s": compute,
                "decode_comm_s": self.comm_s(batch), "decode_step_s": step}

    def prefill_compute_s(self, sequences: int, input_len: int) -> float:
        """The prompts' FLOPs at the prefill rate; only each prompt's last token needs its logits."""
        per_token = forward_flops_per_token(self.cfg, input_len).total
        head = 2 * self.cfg.d_model * self.cfg.vocab_size
        return sequences * (input_len * per_token - (input_len - 1) * head) / self.tensor / self.flops_rate

    def prefill(self, sequences: int, input_len: int) -> float:
        """Device time to prefill `sequences` prompts together."""
        return (self.combine(self.weights_read_s(), self.prefill_compute_s(sequences, input_len))
                + self.comm_s(sequences * input_len))


def tensor_degrees(cfg: ModelConfig, acc: Accelerator, chips: int) -> list[int]:
    """Tensor-parallel degrees worth weighing: divisors of the chips, inside one fabric domain (1 without a fabric),
    splitting the query heads evenly and the KV heads evenly or into whole replicas."""
    domain = (acc.fabric.domain_chips or 1) if acc.fabric.kind else 1
    kv = cfg.num_kv_heads
    return [t for t in range(1, min(chips, domain) + 1)
            if chips % t == 0 and cfg.num_heads % t == 0 and (kv % t == 0 or t % kv == 0)]


def estimate(req: ServeRequest, acc: Accelerator, tensor: int, per_replica: int | None = None,
             calibrated: A.ServingAssumptions | None = None) -> ServeEstimate:
    """One layout: `tensor` chips a replica, `per_replica` sequences each (else from --batch or --concurrency);
    `calibrated`: the constants `chipwise bench --serve` fitted for this chip (`acc` then carries its measured
    peak, bandwidth and memory)."""
    cfg, chip = req.model, _Chip(acc, req.model, tensor, req.weights_dtype, calibrated)
    _peak_flops(acc, req.weights_dtype)  # refuses a chip without the figures the model needs, in one line
    replicas = req.chips // tensor
    mode = "batch" if req.batch else "concurrency"
    wanted = req.batch or req.concurrency or 1
    b = per_replica or math.ceil(wanted / replicas)
    active = replicas if per_replica else math.ceil(wanted / b)  # replicas with work (a small batch leaves some idle)
    i, o = req.input_len, req.output_len
    decode = chip.decode_step(b, i + o / 2)  # the KV cache grows from i to i + o over the output: its mean
    step, overhead = decode["decode_step_s"], chip.assume.request_overhead_s
    # Every prefill also pays the engine's cost per sequence in flight (0 for the published engines).
    seqs = b * chip.assume.sequence_overhead_s
    if mode == "batch":
        prefill = chip.prefill(b, i) + seqs
        ttft, tpot = prefill + overhead, step
        busy = prefill + (o - 1) * step  # a static batch: prefill, then decode to the end
    else:
        prefill = chip.prefill(1, i) + seqs
        ttft, tpot = prefill + overhead, step + (b - 1) * prefill / max(o - 1, 1)
        busy = b * prefill + (o - 1) * step  # each slot turns over once: b prefills between the steps
    usable = acc.hbm_gib * USABLE_HBM_FRACTION
    weights = weights_bytes(cfg, req.weights_dtype) / tensor
    per_sequence = (i + o) * kv_bytes_per_token(cfg, tensor, req.weights_dtype)  # a slot holds its whole length
    max_per_replica = max(0, math.floor((usable * GIB - weights) / per_sequence))
    return ServeEstimate(acc, req.chips, tensor, mode, b, ttft, tpot, active * b * o / busy,
                         max_per_replica * replicas, (weights + b * per_sequence) / GIB, usable,
                         {**decode, "prefill_s": prefill, "request_overhead_s": overhead}, req.weights_dtype,
                         assumptions=chip.assume)


def _largest_meeting(req: ServeRequest, acc: Accelerator, tensor: int, calibrated=None) -> ServeEstimate:
    """The most sequences per replica whose KV cache fits and whose TPOT meets the target (TPOT grows with them)."""
    one = estimate(req, acc, tensor, 1, calibrated)
    lo, hi = 1, max(1, one.max_batch // one.replicas)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(req, acc, tensor, mid, calibrated).tpot_s <= req.max_tpot_s:
            lo = mid
        else:
            hi = mid - 1
    return estimate(req, acc, tensor, lo, calibrated)


def plan_one(req: ServeRequest, acc: Accelerator, calibrated: A.ServingAssumptions | None = None) -> ServeEstimate:
    """The tensor-parallel degree to serve with. Rule: of the degrees whose memory fits and whose TPOT meets the
    target (all that fit, without one), the most output tokens per second, which at a fixed chip count is also the
    fewest dollars and kWh per token; ties go to the lower TPOT. None meets the target: the lowest TPOT that fits.
    Without --batch or --concurrency the target also sets the sequences per replica: the most that meet it."""
    if req.tensor:
        if req.chips % req.tensor:
            raise ConfigError(f"--tensor-parallel {req.tensor} does not divide --chips {req.chips}")
        degrees = [req.tensor]
    else:
        degrees = tensor_degrees(req.model, acc, req.chips)
    searched = req.batch is None and req.concurrency is None
    options = [_largest_meeting(req, acc, t, calibrated) if searched else estimate(req, acc, t, None, calibrated)
               for t in degrees]
    fitting = [e for e in options if e.fits]
    if not fitting:
        return min(options, key=lambda e: e.memory_per_chip_gib)
    target = req.max_tpot_s
    meeting = [e for e in fitting if target is None or e.tpot_s <= target]
    best = (max(meeting, key=lambda e: (e.output_tokens_per_s, -e.tpot_s)) if meeting
            else min(fitting, key=lambda e: e.tpot_s))
    why = {id(e): ("does not fit" if not e.fits else "misses the TPOT target" if e not in meeting
                   else "fewer output tokens/s") for e in options}
    return replace(best, meets_target=None if target is None else best in meeting,
                   considered=[(e.tensor, why[id(e)]) for e in options if e is not best])


def plan_serving(req: ServeRequest) -> list[ServeEstimate]:
    """One estimate per accelerator, fitting ones first, most output tokens per second per chip first."""
    if req.batch is not None and req.concurrency is not None:
        raise ConfigError("--batch and --concurrency are two ways to batch; give one of them")
    if req.batch is None and req.concurrency is None and req.max_tpot_s is None:
        raise ConfigError("give --batch B (static batches), --concurrency C (requests in flight) or --max-tpot-ms "
                          "(the most concurrency that meets it)")
    if req.weights_dtype not in WEIGHT_BYTES:
        raise ConfigError(f"--weights-dtype {req.weights_dtype!r}: use one of {', '.join(WEIGHT_BYTES)}")
    cat = catalog.load_catalog(req.catalog_overrides)
    from chipwise.plan.calibration import calibrated_chip

    rows = [plan_one(req, *calibrated_chip(catalog.get(acc_id, cat), req.calibration_dir))
            for acc_id in dict.fromkeys(req.accelerators)]
    if not any(r.fits for r in rows):
        raise ConfigError(_nothing_fits(req, rows))
    return sorted(rows, key=lambda r: (not r.fits, -r.output_tokens_per_s / r.chips))


def _nothing_fits(req: ServeRequest, rows: list[ServeEstimate]) -> str:
    """Why no accelerator can serve the request: the weights alone, or the KV cache of the batch asked for."""
    r = min(rows, key=lambda e: e.memory_per_chip_gib - e.usable_gib)
    weights = weights_bytes(req.model, req.weights_dtype) / r.tensor / GIB
    where = f"{req.chips} {r.accelerator.id} (tensor={r.tensor}, usable {r.usable_gib:.1f} GiB per chip)"
    if weights > r.usable_gib:
        return (f"the model is larger than the chips' memory: its {req.weights_dtype} weights need {weights:.1f} GiB "
                f"per chip on {where}; add chips or use a smaller --weights-dtype")
    return (f"the KV cache of {r.sequences} sequences of {req.input_len + req.output_len} tokens does not fit on "
            f"{where}: {r.memory_per_chip_gib:.1f} GiB per chip; the largest batch that fits is {r.max_batch}, "
            "so lower --batch/--concurrency, shorten the lengths or add chips")
