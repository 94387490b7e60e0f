"""The width sweep of benchmarks/train_step.py (`--widths 128,384,768`): the same comparison for Llama-shaped
models of several widths, so that where chipwise stands against PyTorch can be read across sizes, and one table
with the CPU model named, comparable between machines."""

from __future__ import annotations

import os

from chipwise.errors import ChipwiseError

WIDTH_DEPTHS = {128: 6, 384: 6, 768: 4}  # layers per width, so that a step takes a few seconds on 2 cores


def width_overrides(width: int, seq_len: int) -> list[str]:
    """A Llama-shaped model of `width` for the sweep: heads of 64, d_ff about 8/3 x width (a multiple of 64)."""
    if width % 64 or width <= 0:
        raise ChipwiseError(f"--widths takes positive multiples of 64, got {width}")
    heads, d_ff = width // 64, max(64, round(8 * width / 3 / 64) * 64)
    return [f"model.d_model={width}", f"model.num_heads={heads}", f"model.num_kv_heads={heads}", f"model.d_ff={d_ff}",
            f"model.num_layers={WIDTH_DEPTHS.get(width, 4)}", "model.vocab_size=8192", f"model.max_seq_len={seq_len}"]




def sweep(args, run_one) -> int:
    """run_one for each width of --widths, then one table: tokens/s of each implementation, and chipwise's ratio."""
    from chipwise.plan.calibration import cpu_model

    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        raise ChipwiseError(f"--widths takes comma-separated whole numbers, e.g. 128,384,768; got {args.widths!r}")
    base, rows = list(args.overrides), []
    for width in widths:
        args.overrides = base + width_overrides(width, args.seq_len)
        print(f"\n===== width {width} =====")
        rows.append((width, run_one(args)))
    names = [r.name for r in rows[0][1]]
    print(f"\n| width | layers | {' | '.join(f'{n}, tokens/s' for n in names)} | chipwise against |")
    print("|---:|---:|" + "---:|" * len(names) + "---|")
    for width, results in rows:
        ratios = ", ".join(f"{results[0].tokens_per_s / r.tokens_per_s:.2f}x {r.name.split(' (')[0]}"
                           for r in results[1:])
        print(f"| {width} | {WIDTH_DEPTHS.get(width, 4)} | " + " | ".join(f"{r.tokens_per_s:,.0f}" for r in results)
              + f" | {ratios or 'n/a'} |")
    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} cores; batch {args.batch_size} x seq {args.seq_len}, heads of "
          f"64, d_ff 8/3 x width, vocab 8192; {args.steps} timed steps after {args.warmup} warm-up, tokens/s over "
          "the timed steps with one block at the end.")
    return 0
