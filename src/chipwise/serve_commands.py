"""The serving subcommands: `chipwise serve` (an OpenAI-compatible server) and `chipwise bench-serve` (a load
generator for any OpenAI-compatible server). Heavy modules are imported only when a command runs."""

from __future__ import annotations

import sys

from chipwise.errors import ChipwiseError
from chipwise.serve import bench


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="serve a model through an OpenAI-compatible HTTP API (continuous batching)")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a chipwise run: its newest intact checkpoint")
    source.add_argument("--hf", metavar="DIR|FILE.gguf",
                        help="a local Hugging Face Llama directory (safetensors), or a Llama GGUF file")
    s.add_argument("--name", help="the model name clients send (default: the directory's name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=8, help="requests decoded together (the decode batch)")
    s.add_argument("--max-seq-len", type=int, help="context per request, prompt + reply (default: the model's)")
    s.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per step between decode steps (long prompts take several)")
    s.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot; more get 429")
    s.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="compute, weight and KV cache dtype (auto: the platform's training default)")
    s.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split heads and MLP over N devices (the training mesh's `tensor` axis)")
    s.add_argument("--accelerator", metavar="ID", help="the catalog chip serving, for the cost and energy metrics "
                   "(default: the chip JAX reports, where the catalog knows it)")
    s.add_argument("--chips", type=int, default=1, help="chips serving, for the cost and energy metrics")
    s.add_argument("--price-per-hour", type=float, metavar="USD", help="price per chip-hour (overrides the catalog)")
    s.add_argument("--power-watts", type=float, metavar="W", help="power per chip (overrides the catalog)")
    bench.add_parser(sub)


def _serve(args) -> int:
    import jax

    from chipwise.serve.engine import Engine
    from chipwise.serve.metrics import ServerMetrics
    from chipwise.serve.model_source import load
    from chipwise.serve.server import build_app, run
    from chipwise.train.compiled_step import compute_dtype

    for flag, value in (("--slots", args.slots), ("--prefill-chunk", args.prefill_chunk),
                        ("--max-queue", args.max_queue), ("--tensor-parallel", args.tensor_parallel),
                        ("--chips", args.chips), ("--max-seq-len", args.max_seq_len or 1)):
        if value < 1:
            raise ChipwiseError(f"{flag} must be at least 1 (got {value})")
    if not 0 < args.port < 65536:
        raise ChipwiseError(f"--port must lie in 1..65535 (got {args.port})")
    devices = jax.devices()
    if args.tensor_parallel > len(devices):
        raise ChipwiseError(f"--tensor-parallel {args.tensor_parallel} needs that many devices; "
                            f"{len(devices)} are present")
    platform = devices[0].platform
    served = load(args.run, args.hf, args.name, platform)
    mesh, shardings = _tensor_parallel(served, devices[: args.tensor_parallel])
    engine = Engine(served, slots=args.slots, max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
                    max_queue=args.max_queue, dtype=compute_dtype(args.dtype, platform), mesh=mesh,
                    shardings=shardings)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log("compiling the prefill and decode programs ...")
    engine.warm_up()
    metrics = ServerMetrics(engine, served.name, _pricing(args, devices[0].device_kind))
    engine.start()
    run(build_app(engine, served, metrics), engine, args.host, args.port, log)
    return 0


def _pricing(args, device_kind: str):
    """The serving chips' price and power for the metrics: the flags, else --accelerator's or the detected chip's
    catalog figures (an unknown chip has none: it never borrows another's)."""
    from chipwise import catalog
    from chipwise.serve.pricing import resolve_pricing

    accelerator = args.accelerator
    if accelerator is None:
        found = catalog.find_by_device_kind(device_kind)
        accelerator = found.id if found is not None else None
    return resolve_pricing(accelerator, args.chips, args.price_per_hour, args.power_watts)


def _tensor_parallel(served, devices):
    """(mesh, parameter shardings) over `devices` on the training mesh's `tensor` axis; (None, None) for one."""
    if len(devices) == 1:
        return None, None
    from flax import nnx

    from chipwise.config import MeshConfig
    from chipwise.model import param_axes
    from chipwise.sharding import make_mesh, tree_shardings

    mesh = make_mesh(MeshConfig(data=1, tensor=len(devices)), devices)
    model = nnx.merge(served.graphdef, served.params)
    axes = nnx.to_pure_dict(param_axes(model))
    shapes = __import__("jax").tree.map(lambda p: tuple(p.shape), served.params)
    return mesh, tree_shardings(axes, shapes, mesh)


COMMANDS = {"serve": _serve, "bench-serve": bench.command}
