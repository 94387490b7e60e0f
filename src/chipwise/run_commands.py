"""The subcommands that read a finished run directory: `chipwise export` and `chipwise report`.

Both import their heavy modules only when run, so `chipwise --help` stays fast.
"""

from __future__ import annotations


def add_commands(sub) -> None:
    e = sub.add_parser("export", help="write a run's latest checkpoint as a Hugging Face Llama checkpoint or a "
                                      "llama.cpp GGUF file")
    e.add_argument("--run", required=True, metavar="RUN_DIR")
    e.add_argument("--out", required=True, metavar="DIR|FILE.gguf",
                   help="a new or empty directory (hf), or a new file (gguf)")
    e.add_argument("--format", choices=("hf", "gguf"),
                   help="hf: a Hugging Face Llama directory; gguf: one fp32 GGUF file for llama.cpp, Ollama and "
                        "LM Studio (default: gguf when --out ends in .gguf, else hf)")
    e.add_argument("--max-shard-size", metavar="SIZE",
                   help="hf only: split model.safetensors into shards of at most SIZE (e.g. 5GB, 200MiB; default "
                        "5GB)")
    e.add_argument("--overwrite", action="store_true", help="replace the checkpoint files already in DIR, or FILE")

    r = sub.add_parser("report", help="an HTML page of one or more runs: loss, throughput, MFU, cost, provenance")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="several runs are drawn on the same axes")
    r.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory for index.html and PNGs")
    r.add_argument("--overwrite", action="store_true", help="replace a report already in DIR")


def _export(args) -> int:
    from chipwise.errors import ChipwiseError
    from chipwise.hf import export_run

    if (args.format or ("gguf" if args.out.lower().endswith(".gguf") else "hf")) == "gguf":
        from chipwise.hf.gguf_export import export_run_gguf

        if args.max_shard_size is not None:
            raise ChipwiseError("--max-shard-size applies to --format hf only; a GGUF export is one file")
        path = export_run_gguf(args.run, args.out, args.overwrite)
        print(f"wrote a llama.cpp GGUF file (fp32) to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0
    files = export_run(args.run, args.out, args.max_shard_size or "5GB", args.overwrite)
    print(f"wrote a Hugging Face Llama checkpoint to {args.out} ({', '.join(files)})")
    return 0


def _report(args) -> int:
    from chipwise.report.html import write_report

    page = write_report(args.runs, args.out, args.overwrite)
    print(f"wrote {page}")
    return 0


COMMANDS = {"export": _export, "report": _report}
