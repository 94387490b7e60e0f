"""`chipwise plan --serve`: the serving planner's flags on the `plan` command, and its command."""

from __future__ import annotations

from chipwise.errors import ChipwiseError

# Flags of a training plan that mean nothing to a serving one, and the reverse: either given to the other is a
# mistake, said in one line rather than ignored.
TRAINING_ONLY = ("seq_len", "global_batch", "tokens", "mesh", "remat", "microbatches", "baseline", "chart",
                 "emit_config", "stack")
SERVING_ONLY = ("input_len", "output_len", "batch", "concurrency", "tensor_parallel", "max_tpot_ms")


def add_serve_arguments(pl, finite_float) -> None:
    """The serving flags on `plan`'s parser; `finite_float` is plan's own type for a float flag."""
    from chipwise.plan.assumptions import WEIGHT_BYTES  # not serving.py: building the parser must not import JAX

    g = pl.add_argument_group("serving (--serve): TTFT, TPOT, throughput, cost and energy per output token")
    g.add_argument("--serve", action="store_true", help="plan serving instead of training")
    g.add_argument("--input-len", type=int, metavar="TOKENS", help="prompt tokens per request")
    g.add_argument("--output-len", type=int, metavar="TOKENS", help="output tokens per request")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--batch", type=int, metavar="SEQS", help="static batches of SEQS sequences over all chips")
    how.add_argument("--concurrency", type=int, metavar="REQS",
                     help="REQS requests in flight over all chips (continuous batching)")
    g.add_argument("--weights-dtype", default="bf16", choices=tuple(WEIGHT_BYTES), help="how the weights are stored")
    g.add_argument("--tensor-parallel", type=int, metavar="CHIPS", help="pin the tensor-parallel degree (else chosen)")
    g.add_argument("--max-tpot-ms", type=finite_float, metavar="MS",
                   help="latency target: choose the tensor-parallel degree (and, without --batch/--concurrency, the "
                        "most concurrency) that meets it")


def _given(args, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) not in (None, False, [])]


def refuse_serving_flags(args) -> None:
    """A training plan: no serving flags, and the training sizes it needs."""
    if extra := _given(args, SERVING_ONLY):
        raise ChipwiseError(f"{', '.join(extra)} plan serving: add --serve (or drop them for a training plan)")
    if args.seq_len is None or args.global_batch is None:
        raise ChipwiseError("a training plan needs --seq-len and --global-batch (or --serve with --input-len and "
                            "--output-len to plan serving)")


def serve_command(args) -> int:
    from chipwise.plan.planner import catalog_overrides
    from chipwise.plan.serving import ServeRequest, plan_serving
    from chipwise.plan.serving_render import print_serving_table, serving_json
    from chipwise.plan.spec import load_model, positive

    if extra := _given(args, TRAINING_ONLY + ("aot",)):
        raise ChipwiseError(f"{', '.join(extra)} belong to a training plan, not to --serve")
    if args.input_len is None or args.output_len is None:
        raise ChipwiseError("--serve needs --input-len and --output-len (tokens per request)")
    for flag in ("chips", "input_len", "output_len", "batch", "concurrency", "tensor_parallel", "max_tpot_ms"):
        if getattr(args, flag) is not None:
            positive("--" + flag.replace("_", "-"), getattr(args, flag))
    ids = [a.strip() for a in args.accelerator.split(",") if a.strip()]
    if not ids:
        raise ChipwiseError("--accelerator needs at least one catalog id, e.g. inf2,h100-sxm")
    req = ServeRequest(load_model(args.model), ids, args.chips, args.input_len, args.output_len, batch=args.batch,
                       concurrency=args.concurrency, weights_dtype=args.weights_dtype, tensor=args.tensor_parallel,
                       max_tpot_s=args.max_tpot_ms / 1e3 if args.max_tpot_ms else None,
                       catalog_overrides=catalog_overrides(args.catalog, args.catalog_set),
                       calibration_dir=args.calibration)
    rows = plan_serving(req)
    if args.json:
        print(serving_json(rows))
    else:
        print_serving_table(rows, req)
    return 0
