"""The `chipwise plan` and `chipwise bench` commands (the planner lives in chipwise.plan)."""

from __future__ import annotations

import argparse
import math
import sys

from chipwise.errors import ChipwiseError


def add_commands(sub) -> None:
    pl = sub.add_parser("plan", help="predict step time, memory, cost and energy of a run on each accelerator")
    pl.add_argument("--model", required=True, help="a preset name or a YAML file of model fields")
    pl.add_argument("--accelerator", required=True, metavar="ID[,ID...]", help="catalog ids, comma-separated")
    pl.add_argument("--chips", required=True, type=int)
    pl.add_argument("--seq-len", type=int, help="training: tokens per sequence (required without --serve)")
    pl.add_argument("--global-batch", type=int, metavar="SEQS",
                    help="training: sequences per step (required without --serve)")
    pl.add_argument("--tokens", type=finite_float, help="training tokens in all (e.g. 2e12): adds time, cost, energy")
    pl.add_argument("--mesh", help="pin the layout, e.g. data=8,fsdp=16,tensor=8,pipeline=1 (else searched)")
    pl.add_argument("--remat", choices=("none", "dots", "full"), help="pin the remat policy (else searched)")
    pl.add_argument("--microbatches", type=int, help="pin micro-batches per step (else searched)")
    pl.add_argument("--baseline", metavar="ID", help="compare tokens per dollar and per kWh against this chip")
    pl.add_argument("--catalog", metavar="FILE", help="YAML overrides {id: {field: value}} (your prices, power)")
    pl.add_argument("--catalog-set", action="append", default=[], metavar="ID.FIELD=VALUE",
                    help="override one catalog figure, e.g. h100-sxm.price_per_chip_hour=2.1 (repeatable)")
    pl.add_argument("--calibration", metavar="DIR_OR_FILE", help="calibration profiles (default: the cache's)")
    pl.add_argument("--stack", action="append", default=[], metavar="PLATFORM=STACK",
                    help="plan a platform at what another software stack achieved in published runs, e.g. "
                         "gpu=pytorch (default: chipwise's trainer, XLA; repeatable)")
    pl.add_argument("--json", action="store_true", help="print a JSON list, one object per accelerator")
    pl.add_argument("--chart", metavar="PNG", help="write a chart of time to train against cost")
    pl.add_argument("--emit-config", metavar="FILE",
                    help="write the first row's layout (mesh, micro-batches, remat, ZeRO-1, dtypes, batch) as a "
                         "config that `chipwise train --config FILE` runs; FILE must not exist")
    pl.add_argument("--aot", action="store_true",
                    help="TPU only: compile chipwise's real train step for the planned topology (needs the tpu "
                         "extra) and show XLA's memory and FLOPs next to the model's")

    from chipwise.plan.serving_cli import add_serve_arguments

    add_serve_arguments(pl, finite_float)

    b = sub.add_parser("bench", help="measure this machine's chip and write a calibration profile for `plan`")
    b.add_argument("--accelerator", metavar="ID", help="catalog id of the local chip (default: detected)")
    b.add_argument("--out", metavar="FILE", help="where to write the profile (default: the cache)")
    b.add_argument("--quick", action="store_true", help="shorter GEMM timings")
    b.add_argument("--serve", action="store_true",
                   help="calibrate the serving planner instead: time chipwise's serving engine (prefill and decode "
                        "steps) and fit its constants for this machine (`plan --serve` then uses them)")


def finite_float(text: str) -> float:
    """argparse type of every float on the plan command line: float() takes "inf" and "nan", which would carry
    through the arithmetic into the table and the JSON (which has no Infinity)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (write e.g. 2e12)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a real amount (e.g. 2e12)")
    return value


def check_finite_settings(settings: list[str]) -> None:
    """--catalog-set values are read as YAML, where .inf and .nan are numbers: refused here, for the same reason."""
    import yaml

    for text in settings:
        _, sep, raw = text.partition("=")
        try:
            value = yaml.safe_load(raw) if sep and raw.strip() else None
        except yaml.YAMLError:
            continue  # not a number: the catalog's own checks name the field and its type
        if isinstance(value, float) and not math.isfinite(value):
            raise ChipwiseError(f"--catalog-set {text!r}: {raw.strip()} is not a finite number; give a real figure")


def parse_stacks(settings: list[str]) -> dict[str, str] | None:
    """--stack gpu=pytorch ... -> {"gpu": "pytorch"}; which pairs exist is checked by the planner."""
    stacks = {}
    for text in settings:
        platform, sep, stack = text.partition("=")
        if not sep or not platform.strip() or not stack.strip():
            raise ChipwiseError(f"--stack {text!r}: write PLATFORM=STACK, e.g. gpu=pytorch")
        stacks[platform.strip()] = stack.strip()
    return stacks or None


def plan_command(args) -> int:
    check_finite_settings(args.catalog_set)
    if args.serve:
        from chipwise.plan.serving_cli import serve_command

        return serve_command(args)
    from chipwise.plan.planner import PlanRequest, catalog_overrides, plan, rank
    from chipwise.plan.render import print_table, to_json, write_chart
    from chipwise.plan.serving_cli import refuse_serving_flags
    from chipwise.plan.spec import load_model, parse_mesh, positive

    refuse_serving_flags(args)
    for name in ("chips", "seq_len", "global_batch", "tokens", "microbatches"):
        if getattr(args, name) is not None:
            positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.emit_config:
        from chipwise.plan.emit import check_target

        check_target(args.emit_config)
    ids = [a.strip() for a in args.accelerator.split(",") if a.strip()]
    if not ids:
        raise ChipwiseError("--accelerator needs at least one catalog id, e.g. h100-sxm,trn2")
    mesh = parse_mesh(args.mesh, args.chips) if args.mesh else None
    req = PlanRequest(load_model(args.model), ids, args.chips, args.seq_len, args.global_batch, args.tokens, mesh,
                      args.remat, args.microbatches, args.baseline,
                      catalog_overrides(args.catalog, args.catalog_set), args.calibration,
                      stacks=parse_stacks(args.stack))
    rows = rank(plan(req))
    if args.emit_config:  # checked now, written last: a command refused on the way writes nothing
        from chipwise.plan.emit import config_text, write_new_file

        emitted = config_text(req, rows[0])
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
    if args.emit_config:
        out = write_new_file(args.emit_config, emitted)
        print(f"config for {rows[0].accelerator.id} ({rows[0].estimate.layout.describe()}) written to {out}",
              file=sys.stderr)
    return 0


def bench_command(args) -> int:
    import jax

    from chipwise import catalog
    from chipwise.plan.calibration import calibrate, find_profile, profile_path, save_profile

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
    if args.serve:
        from chipwise.plan.serving_calibration import calibrate_serving, print_serving, write_serving

        path = profile_path(acc.id, args.out)
        section = calibrate_serving(acc, device, rounds=2 if args.quick else 4)
        write_serving(path, acc, device, section)
        print_serving(acc, path, section)
        return 0
    profile = calibrate(acc, device, quick=args.quick)
    path = profile_path(acc.id, args.out)
    kept = find_profile(acc, path, need="serving") if path.exists() else None
    if kept is not None:  # a serving calibration of this machine stays beside the new training one
        profile["serving"] = kept["serving"]
    path = save_profile(profile, path)
    cm = profile["chip_model"]
    print(f"{acc.id} on {profile['machine']} (measured, {profile['dtype']}):")
    print(f"  GEMM peak {cm['peak_tflops'] * 1e3:,.1f} GFLOP/s, large-shape efficiency {cm['matmul_efficiency']:.2f}, "
          f"half speed at dimension {cm['matmul_half_dim']:.0f}; streaming bandwidth {cm['hbm_tbps'] * 1e3:,.1f} GB/s")
    for r in profile["measurements"]["train_steps"]:
        print(f"  train step {r['model']['num_layers']}x{r['model']['d_model']} seq {r['seq_len']} batch "
              f"{r['batch']}: {r['measured_s'] * 1e3:.1f} ms")
    print(f"  fitted: measured/modelled time of GEMMs {cm['matmul_scale']:.2f}, attention {cm['attention_scale']:.2f}, "
          f"element-wise {cm['elementwise_scale']:.2f}, loss {cm['loss_scale']:.2f}; overhead "
          f"{cm['layer_overhead_s'] * 1e3:.2f} ms/layer, {cm['step_overhead_s'] * 1e3:.2f} ms/step")
    for r in profile["validation"]:
        print(f"  held out {r['model']['num_layers']}x{r['model']['d_model']} seq {r['seq_len']} batch {r['batch']}: "
              f"predicted {r['predicted_s'] * 1e3:.1f} ms, measured {r['measured_s'] * 1e3:.1f} ms "
              f"({r['error']:+.0%})")
    print(f"profile written to {path}; `chipwise plan --accelerator {acc.id}` now uses it")
    return 0


COMMANDS = {"plan": plan_command, "bench": bench_command}
