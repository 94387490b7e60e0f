"""The `chipwise` command. Bad input becomes one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from chipwise import __version__
from chipwise.errors import ChipwiseError

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own two-line usage dump becomes our one line
        raise ChipwiseError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="chipwise", description="Pre-train Llama-style models on any accelerator and measure "
                                             "what each chip costs.")
    p.add_argument("--version", action="version", version=f"chipwise {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help="train a model (see configs/ for examples)")
    t.add_argument("--config", help="YAML file with model/data/train/mesh/hardware sections")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value with a dotted key, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--resume", metavar="RUN_DIR", nargs="?", const="",
                   help="continue a run from its latest checkpoint (RUN_DIR, or the config's run_dir)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")

    s = sub.add_parser("sample", help="generate text from a trained run")
    s.add_argument("--run", required=True, metavar="RUN_DIR")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=100)
    s.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    s.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)

    pl = sub.add_parser("plan", help="predict step time, memory, cost and energy of a run on each accelerator")
    pl.add_argument("--model", required=True, help="a preset name or a YAML file of model fields")
    pl.add_argument("--accelerator", required=True, metavar="ID[,ID...]", help="catalog ids, comma-separated")
    pl.add_argument("--chips", required=True, type=int)
    pl.add_argument("--seq-len", required=True, type=int)
    pl.add_argument("--global-batch", required=True, type=int, metavar="SEQS", help="sequences per step")
    pl.add_argument("--tokens", type=float, help="training tokens in all (e.g. 2e12): adds time, cost, energy")
    pl.add_argument("--mesh", help="pin the layout, e.g. data=8,fsdp=16,tensor=8,pipeline=1 (else searched)")
    pl.add_argument("--remat", choices=("none", "dots", "full"), help="pin the remat policy (else searched)")
    pl.add_argument("--microbatches", type=int, help="pin micro-batches per step (else searched)")
    pl.add_argument("--baseline", metavar="ID", help="compare tokens per dollar and per kWh against this chip")
    pl.add_argument("--catalog", metavar="FILE", help="YAML overrides {id: {field: value}} (your prices, power)")
    pl.add_argument("--catalog-set", action="append", default=[], metavar="ID.FIELD=VALUE",
                    help="override one catalog figure, e.g. h100-sxm.price_per_chip_hour=2.1 (repeatable)")
    pl.add_argument("--calibration", metavar="DIR_OR_FILE", help="calibration profiles (default: the cache's)")
    pl.add_argument("--json", action="store_true", help="print a JSON list, one object per accelerator")
    pl.add_argument("--chart", metavar="PNG", help="write a chart of time to train against cost")
    pl.add_argument("--aot", action="store_true",
                    help="TPU only: compile chipwise's real train step for the planned topology (needs the tpu "
                         "extra) and show XLA's memory and FLOPs next to the model's")

    b = sub.add_parser("bench", help="measure this machine's chip and write a calibration profile for `plan`")
    b.add_argument("--accelerator", metavar="ID", help="catalog id of the local chip (default: detected)")
    b.add_argument("--out", metavar="FILE", help="where to write the profile (default: the cache)")
    b.add_argument("--quick", action="store_true", help="shorter GEMM timings")
    return p


def quiet_libtpu_off_tpu() -> None:
    """With the `tpu` extra installed on a machine without TPUs (to compile for TPU topologies, `plan --aot`),
    libtpu looks for TPU VM metadata at start-up and prints screens of warnings. Tell it there is none to find.
    Never on a TPU VM (its /dev/accel* or /dev/vfio devices exist) and never over the user's own settings."""
    if any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")) or "TPU_ACCELERATOR_TYPE" in os.environ:
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def _quiet_logs() -> None:
    quiet_libtpu_off_tpu()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train(args) -> int:
    from chipwise.config import apply_overrides, from_dict, load_config, to_dict
    from chipwise.train.loop import Trainer, load_run_config

    if args.resume is not None and args.overwrite:
        raise ChipwiseError("--resume and --overwrite contradict each other; pick one")
    run_dir = args.resume
    if run_dir == "":  # bare --resume: the run named by the config
        run_dir = load_config(args.config, args.overrides).run_dir
    if run_dir:  # a run continues under its own saved config; --set may still change e.g. train.steps
        cfg = from_dict(apply_overrides(to_dict(load_run_config(run_dir)), args.overrides + [f"run_dir={run_dir}"]))
    else:
        cfg = load_config(args.config, args.overrides)
    Trainer(cfg, resume=run_dir is not None, overwrite=args.overwrite).run()
    return 0


def _sample(args) -> int:
    from chipwise.sample import sample_from_run

    text = sample_from_run(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                           args.seed)
    print(text)
    return 0


def _plan(args) -> int:
    from chipwise.plan.planner import PlanRequest, catalog_overrides, plan, rank
    from chipwise.plan.render import print_table, to_json, write_chart
    from chipwise.plan.spec import load_model, parse_mesh, positive

    for name in ("chips", "seq_len", "global_batch", "tokens", "microbatches"):
        if getattr(args, name) is not None:
            positive("--" + name.replace("_", "-"), getattr(args, name))
    ids = [a.strip() for a in args.accelerator.split(",") if a.strip()]
    if not ids:
        raise ChipwiseError("--accelerator needs at least one catalog id, e.g. h100-sxm,trn2")
    mesh = parse_mesh(args.mesh, args.chips) if args.mesh else None
    req = PlanRequest(load_model(args.model), ids, args.chips, args.seq_len, args.global_batch, args.tokens, mesh,
                      args.remat, args.microbatches, args.baseline,
                      catalog_overrides(args.catalog, args.catalog_set), args.calibration)
    rows = rank(plan(req))
    if args.aot:
        from chipwise.plan.aot import aot_check, print_aot

        checks = [aot_check(req, r) for r in rows if r.accelerator.platform == "tpu"]
        if not checks:
            raise ChipwiseError("--aot compiles for TPU topologies only; add a tpu-* accelerator")
    if args.json:
        print(to_json(rows, args.baseline, {c.accelerator: c.as_dict() for c in checks} if args.aot else None))
    else:
        print_table(rows, req)
        if args.aot:
            for check in checks:
                print_aot(check)
    if args.chart:
        out = write_chart(rows, args.chart, args.tokens)
        print(f"chart written to {out}", file=sys.stderr)
    return 0


def _bench(args) -> int:
    import jax

    from chipwise import catalog
    from chipwise.plan.calibration import calibrate, profile_path, save_profile

    device = jax.devices()[0]
    if args.accelerator:
        acc = catalog.get(args.accelerator)
    else:
        acc = catalog.find_by_device_kind(device.device_kind)
        if acc is None:
            raise ChipwiseError(f"device kind {device.device_kind!r} is not in the accelerator catalog; add it to "
                                "catalog/accelerators.yaml or pass --accelerator ID")
    if acc.platform != device.platform:
        raise ChipwiseError(f"--accelerator {acc.id} is a {acc.platform} chip but this machine's devices are "
                            f"{device.platform}")
    profile = calibrate(acc, device, quick=args.quick)
    path = save_profile(profile, profile_path(acc.id, args.out))
    cm = profile["chip_model"]
    print(f"{acc.id} on {profile['machine']} (measured, {profile['dtype']}):")
    print(f"  GEMM peak {cm['peak_tflops'] * 1e3:,.1f} GFLOP/s, large-shape efficiency {cm['matmul_efficiency']:.2f}, "
          f"half speed at dimension {cm['matmul_half_dim']:.0f}; streaming bandwidth {cm['hbm_tbps'] * 1e3:,.1f} GB/s")
    for r in profile["measurements"]["train_steps"]:
        print(f"  train step {r['model']['num_layers']}x{r['model']['d_model']} seq {r['seq_len']} batch "
              f"{r['batch']}: {r['measured_s'] * 1e3:.1f} ms")
    print(f"  fitted: compute scale {cm['compute_scale']:.2f}, overhead {cm['step_overhead_s'] * 1e3:.1f} ms/step")
    print(f"profile written to {path}; `chipwise plan --accelerator {acc.id}` now uses it")
    return 0


def run_guarded(parser: argparse.ArgumentParser, handler, argv: list[str] | None = None) -> int:
    """Parse, set chipwise's JAX defaults and run `handler(args)`; user errors become one line and exit 2.

    Shared by the `chipwise` command and the scripts in benchmarks/.
    """
    try:
        args = parser.parse_args(argv)
        import jax

        jax.config.update("jax_default_prng_impl", "rbg")  # the PRNG that TPU and Trainium run fast
        return handler(args)
    except ChipwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    _quiet_logs()
    commands = {"train": _train, "sample": _sample, "plan": _plan, "bench": _bench}
    return run_guarded(build_parser(), lambda args: commands[args.command](args), argv)


if __name__ == "__main__":
    raise SystemExit(main())
