"""Peak host memory of `chipwise export --run RUN` (the newest checkpoint's params restored, then written as a
Hugging Face checkpoint) at this checkout and at another commit, on one run.

    python benchmarks/export_memory.py --against REF [--repeats 2] [--dir DIR] [--wait-quiet SECONDS]

A run is trained for 2 steps with this checkout (d_model 1024, 8 layers, d_ff 2816, the stdlib's textwrap.py as its
corpus: about 108M parameters, a 1.3 GB checkpoint of float32 params and Adam's two moments). REF is checked out
into a git worktree. Each export runs in a fresh `python -m chipwise` process, the two versions alternating; its
peak resident memory is the child's ru_maxrss (getrusage), and the exported model.safetensors of both versions must
be byte-identical. What it shows: whether export reads only the params (a partial restore) or the whole train state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from chipwise.plan.calibration import cpu_model
from quiet import load, wait_quiet

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.d_model=1024", "model.num_layers=8", "model.num_heads=8", "model.num_kv_heads=8",
         "model.d_ff=2816", "model.max_seq_len=64"]
TRAIN = ["train.steps=2", "train.checkpoint_every=2", "train.batch_size=2", "train.seq_len=64",
         "train.eval_every=1000"]


def chipwise(args: list[str], src: Path) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of one `chipwise` command run from the source tree `src`, in a child process that
    is this one's only child at the time (ru_maxrss of children is the largest of any waited-for child)."""
    code = "import sys; from chipwise.cli import main; sys.exit(main(sys.argv[1:]))"
    runner = [sys.executable, "-c",
              f"import resource, subprocess, sys; r = subprocess.run({[sys.executable, '-c', code]!r} + sys.argv[1:]);"
              " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"]
    t = time.perf_counter()
    done = subprocess.run([*runner, *args], env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"chipwise {' '.join(args[:3])} failed at {src}: {done.stderr.strip()[-500:]}")
    return int(done.stdout.strip().splitlines()[-1]) * 1024 / 1e9, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="the git commit to compare with")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="seconds to wait for load < 1 first")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chipwise-export-mem-", dir=args.dir))
    old = work / "old"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.against],
                       check=True)
        (work / "corpus").mkdir()
        shutil.copy(textwrap.__file__, work / "corpus")
        settings = [*MODEL, *TRAIN, f"data.sources=[{work / 'corpus'}]", f"run_dir={work / 'run'}"]
        chipwise(["train", "--config", str(ROOT / "configs/demo.yaml"),
                  *[x for s in settings for x in ("--set", s)]], ROOT / "src")
        size = sum(p.stat().st_size for p in (work / "run" / "checkpoints").rglob("*") if p.is_file())
        wait_quiet(args.wait_quiet)
        rows = []
        for k in range(args.repeats):
            for name, src in (("this checkout", ROOT / "src"), (args.against, old / "src")):
                out = work / f"export-{k}-{len(rows)}"
                peak, seconds = chipwise(["export", "--run", str(work / "run"), "--out", str(out)], src)
                rows.append((name, peak, seconds, (out / "model.safetensors").read_bytes()))
        same = len({r[3] for r in rows}) == 1
        params = len(rows[0][3]) / 1e9
        print(f"Checkpoint {size / 1e9:.2f} GB (params and Adam's moments); exported weights {params:.2f} GB; "
              f"exports byte-identical: {'yes' if same else 'NO'}; machine: {cpu_model()}, {os.cpu_count()} CPUs, "
              f"load {load():.2f} after.\n")
        print("| code | peak RSS | time |\n|---|---:|---:|")
        for name, peak, seconds, _ in rows:
            print(f"| {name} | {peak:.2f} GB | {seconds:.1f} s |")
        return 0 if same else 1
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
