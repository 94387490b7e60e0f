"""Checkpoint saves and restores with their checksums (train/checkpoint.py, train/integrity.py) against the disk.

    python benchmarks/checkpoint_integrity.py [--gb 2] [--saves 3] [--stacked] [--compress] [--keep-cache]
                                              [--gap SECONDS] [--dir DIR] [--wait-quiet 1200] [--markdown]

A train state of about --gb GB (float32 parameters of a Llama-like layout plus Adam's two moments, built directly
as arrays sharded over 8 simulated CPU devices, fsdp=8; one array per layer and matrix, as chipwise lays a model
out on CPUs, or with --stacked the layers stacked, as on GPUs, TPUs and Trainium) is saved with chipwise's own
`Checkpoints` class, each save waited for before the next starts (as in training, where saves are steps apart): a
first save, reported on its own (it pays for whatever state the process and the page cache start in), then
--saves more, the medians of which are compared with the disk.

Reported:

- blocked: how long the `save()` call keeps the caller (the train loop) waiting;
- total save: from the call until the checkpoint is published with its checksums (`wait()` returns);
- hashing: the part of that total spent hashing (in Orbax's background thread);
- restore: the newest checkpoint, --saves times, each with the page cache dropped first: as a resume restores it
  (`restore_latest`: the checksums checked in a thread while Orbax reads the same files); and, for comparison,
  `verify` alone and Orbax's restore alone;
- the disk itself, measured in the same run and the same directory with `dd`: after each save, a write of the same
  size into a new file kept until the end (as checkpoints are), with conv=fdatasync and then its pages dropped from
  the page cache (posix_fadvise), as a save's files are (integrity.digest_files), so that both meet the page
  cache in the same state. It is written in 1 MiB blocks (the targets' peer), then again in 64 MiB blocks for
  comparison: tensorstore writes each file in writev calls of many MiB, and a VM whose free page reporting
  starts at 2 MiB blocks makes writes of 2 MiB and more far slower once its free memory has been reported (the
  machine line names the order). After the restores, reads of those files with the page cache dropped (as root;
  otherwise with iflag=direct); for what the page cache does to a writer that keeps its pages there, the same
  writes without the drop, one after another; and 2 x --saves of the dropping writes back to back, nothing in
  between.

--gap idles that many seconds before each save and each `dd` write after the first save, as saves are minutes
apart in training (0: back to back). --compress saves with Orbax's zstd (train.compress_checkpoints);
--keep-cache leaves the saved files in the page cache (chipwise drops each file's pages once it is hashed,
integrity.digest_files).

Targets (issue): blocked under 10% of the total save; save and restore at least half the disk's throughput.
Before measuring, --wait-quiet waits (up to that many seconds) for the 1-minute load average to fall below 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from chipwise import process  # noqa: E402
from chipwise.plan.calibration import cpu_model  # noqa: E402
from chipwise.train import integrity  # noqa: E402
from chipwise.train.checkpoint import Checkpoints, abstract_like  # noqa: E402
from quiet import load, wait_quiet  # noqa: E402

GB = 1e9


def shapes(target_bytes: float, stacked: bool, d: int = 1024, ff: int = 2816, vocab: int = 32000) -> dict:
    """Parameter shapes of a Llama-like model whose params + two Adam moments (float32) are about target_bytes:
    each layer's matrices on their own (unrolled, chipwise's layout on CPUs), or stacked over the layers (scanned,
    its layout on GPUs, TPUs and Trainium: sharding.PLATFORM_RULES)."""
    per_layer = 4 * d * d + 3 * d * ff
    layers = max(1, round((target_bytes / 12 - vocab * d) / per_layer))
    matrices = {**{n: (d, d) for n in ("wq", "wk", "wv", "wo")}, "w_gate": (d, ff), "w_up": (d, ff),
                "w_down": (ff, d)}
    if stacked:
        return {"embed": (vocab, d), **{f"layers.{n}": (layers, *shape) for n, shape in matrices.items()}}
    return {"embed": (vocab, d), **{f"layer{i:02d}.{n}": shape for i in range(layers) for n, shape in matrices.items()}}


def build_state(target_bytes: float, stacked: bool = False):
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    whole = NamedSharding(mesh, P())
    tree = shapes(target_bytes, stacked)

    def split(shape):  # fsdp over the first axis that is not the layers'
        return NamedSharding(mesh, P(*([None] * (len(shape) - 2)), "fsdp", None))

    def one(seed):
        keys = jax.random.split(jax.random.key(seed), len(tree))
        return {name: jax.jit(lambda k, s=shape: jax.random.normal(k, s, jnp.float32), out_shardings=split(shape))(
            key) for key, (name, shape) in zip(keys, tree.items())}

    state = {"params": one(0), "mu": one(1), "nu": one(2), "step": jax.device_put(jnp.int32(0), whole)}
    jax.block_until_ready(state)
    return state


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dd_write(path: Path, nbytes: int, evict: bool = True, block_mib: int = 1) -> float:
    """GB/s of writing a new file of about nbytes at `path` in blocks of block_mib with conv=fdatasync, and
    (evict) dropping its pages after."""
    count = max(1, nbytes // (block_mib << 20))
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={block_mib}M", f"count={count}", "conv=fdatasync"],
                   check=True, capture_output=True)
    if evict:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return count * (block_mib << 20) / (time.perf_counter() - t) / GB


def free_page_reporting() -> str:
    """How this guest gives free memory back to its host (virtio-balloon free page reporting), which decides what
    a write into newly allocated page-cache pages costs here."""
    try:
        order = int(Path("/sys/module/page_reporting/parameters/page_reporting_order").read_text())
    except (OSError, ValueError):
        return "no free page reporting"
    return f"free page reporting from order {order} ({os.sysconf('SC_PAGE_SIZE') << order >> 20} MiB blocks)"


def dd_read(path: Path, can_drop: bool) -> float:
    flags = [] if can_drop and drop_caches() else ["iflag=direct"]
    t = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", *flags], check=True, capture_output=True)
    return path.stat().st_size / (time.perf_counter() - t) / GB


def zstd_rates(state, nbytes: int = 256 << 20) -> tuple[float, float]:
    """(compress, decompress) GB/s of zstd level 3 on one core, on the state's own bytes: Orbax's default codec
    (tensorstore zarr3, zstd level 3), which every save and restore runs over the whole state."""
    import zstandard

    data = b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(state["params"])[:8])[:nbytes]
    t = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=3).compress(data)
    t1 = time.perf_counter()
    zstandard.ZstdDecompressor().decompress(packed)
    t2 = time.perf_counter()
    return len(data) / (t1 - t) / GB, len(data) / (t2 - t1) / GB


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe(directory: Path) -> str:
    def cmd(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    source, fstype = (cmd("findmnt", "-no", "SOURCE,FSTYPE", "-T", str(directory)).split() + ["?", "?"])[:2]
    disk = (cmd("lsblk", "-dno", "NAME,SIZE,ROTA,MODEL", source) if source.startswith("/dev/") else "").split()
    what = f"{disk[1]}, rotational flag {disk[2]}{', ' + ' '.join(disk[3:]) if disk[3:] else ''}" if disk[2:] else "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu_model()}, {process.usable_cores()} cores, {mem:.0f} GiB memory, {free_page_reporting()}; disk "
            f"{source} ({what}), {fstype}; jax {jax.__version__}, {len(jax.devices())} simulated CPU devices")


def main() -> int:
    process.setup()  # as the `chipwise` command sets itself up: freed host memory stays in the process
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the train state (params + Adam moments)")
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="seconds to wait for load < 1 first")
    ap.add_argument("--compress", action="store_true", help="zstd-compress the arrays (train.compress_checkpoints)")
    ap.add_argument("--keep-cache", action="store_true", help="do not drop saved files from the page cache")
    ap.add_argument("--stacked", action="store_true", help="layers stacked (scanned), as on GPUs, TPUs, Trainium")
    ap.add_argument("--gap", type=float, default=0.0, help="seconds idle before each save and each dd write")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.gb <= 0 or args.saves < 1 or args.gap < 0:
        print("error: --gb and --saves must be positive, --gap not negative", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="chipwise-ckpt-bench-", dir=args.dir))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    timed = {"hash_s": 0.0}
    real_digest = integrity.digest_files

    def digest_files(root, names, **options):  # the hashing time, wherever it runs
        t = time.perf_counter()
        try:
            return real_digest(root, names, **(options | ({"evict": False} if args.keep_cache else {})))
        finally:
            timed["hash_s"] += time.perf_counter() - t

    integrity.digest_files = digest_files
    print(f"Machine: {describe(work)}", flush=True)
    wait_quiet(args.wait_quiet, poll=60, log=lambda line: print(line, flush=True))
    state = build_state(args.gb * GB, args.stacked)
    state_bytes, arrays = sum(x.nbytes for x in jax.tree.leaves(state)), len(jax.tree.leaves(state))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    wait_quiet(args.wait_quiet, poll=60, log=lambda line: print(line, flush=True))
    load_before = load()
    can_drop = drop_caches()
    cpu0 = time.process_time()

    ckpt = Checkpoints(work / "checkpoints", keep=args.saves + 1, log=print, compress=args.compress)
    series, dd_writes, dd_large = {"first": [], "next": []}, [], []
    files_dd = [work / f"dd{k}.bin" for k in range(args.saves)]
    for i in range(1, args.saves + 2):
        kind = "first" if i == 1 else "next"
        if kind == "next":
            time.sleep(args.gap)
        timed["hash_s"] = 0.0
        t0 = time.perf_counter()
        assert ckpt.save(i, state, {"step": i}), ckpt.failures
        t1 = time.perf_counter()
        assert ckpt.wait(), ckpt.failures
        t2 = time.perf_counter()
        os.sync()  # anything the save left in the page cache (tensorstore itself fsyncs its files)
        t3 = time.perf_counter()
        series[kind].append({"blocked": t1 - t0, "total": t2 - t0, "hash": timed["hash_s"], "synced": t3 - t0,
                             "bytes": tree_bytes(work / "checkpoints" / str(i))})
        if kind == "next":  # the disk's peers, in the state this save left the page cache in
            time.sleep(args.gap)
            dd_writes.append(dd_write(files_dd[i - 2], series[kind][-1]["bytes"]))
            time.sleep(args.gap)
            large = files_dd[i - 2].with_suffix(".large")
            dd_large.append(dd_write(large, series[kind][-1]["bytes"], block_mib=64))
            large.unlink()
        print(f"  save {i} ({kind}): blocked {t1 - t0:.3f} s, published {t2 - t0:.2f} s (hashing "
              f"{timed['hash_s']:.2f} s), synced {t3 - t0:.2f} s, {series[kind][-1]['bytes'] / GB:.2f} GB"
              + (f"; then dd {dd_writes[-1]:.2f} GB/s, in 64 MiB blocks {dd_large[-1]:.2f}" if kind == "next"
                 else ""), flush=True)
    saves = series["next"]

    files = [p.stat().st_size for p in (work / "checkpoints" / "1").rglob("*") if p.is_file()]
    restores, target = [], abstract_like(state, shardings)
    zstd = zstd_rates(state)
    del state
    latest = ckpt.latest_step()
    for _ in range(args.saves):
        drop_caches()
        t0 = time.perf_counter()
        found = ckpt.restore_latest(target)
        jax.block_until_ready(found[1])
        t1 = time.perf_counter()
        assert found[0] == latest, found[0]
        del found
        drop_caches()
        t2 = time.perf_counter()
        problem = ckpt.verify(latest)
        t3 = time.perf_counter()
        assert problem is None, problem
        drop_caches()
        t4 = time.perf_counter()
        jax.block_until_ready(ckpt.restore(latest, target))
        t5 = time.perf_counter()
        restores.append({"total": t1 - t0, "verify": t3 - t2, "plain": t5 - t4})
        print(f"  restore of step {latest}: as a resume {t1 - t0:.2f} s; verify alone {t3 - t2:.2f} s; Orbax's "
              f"restore alone {t5 - t4:.2f} s", flush=True)
    ckpt.close()

    size = int(saves[0]["bytes"])
    dd_reads = [dd_read(f, can_drop) for f in files_dd]
    for f in files_dd:
        f.unlink()
    dd_cached = [dd_write(f, size, evict=False) for f in files_dd]
    for f in files_dd:
        f.unlink()
    dd_loop = []  # the writer alone, back to back: what the host's memory does to it without saves in between
    for _ in range(2 * args.saves):
        dd_loop.append(dd_write(files_dd[0], size))
        files_dd[0].unlink()
    cpu = time.process_time() - cpu0
    load_after = load()
    write_gbs, read_gbs = statistics.median(dd_writes), statistics.median(dd_reads)
    med = {k: statistics.median(s[k] for s in saves) for k in ("blocked", "total", "hash", "synced", "bytes")}
    first = series["first"][0]
    rmed = {k: statistics.median(r[k] for r in restores) for k in ("verify", "total", "plain")}
    save_gbs, restore_gbs = med["bytes"] / med["total"] / GB, med["bytes"] / rmed["total"] / GB

    def listed(rates):
        return ", ".join(f"{r:.2f}" for r in rates)

    layout = "layers stacked" if args.stacked else "one per layer and matrix"
    print(f"\nState {state_bytes / GB:.2f} GB in memory ({arrays} arrays, {layout}, "
          f"sharded over {len(jax.devices())} devices); a checkpoint is {med['bytes'] / GB:.2f} GB on disk "
          f"({'zstd' if args.compress else 'uncompressed'}; saved files "
          f"{'kept in' if args.keep_cache else 'dropped from'} the page cache once hashed). {args.saves} saves "
          f"({f'each after {args.gap:g} s idle' if args.gap else 'back to back'}) "
          f"after the first and restores, medians; page cache dropped before each restore and each dd read: "
          f"{'yes' if can_drop else 'no (dd read with iflag=direct)'}. Load "
          f"average {load_before:.2f} before, {load_after:.2f} after; this process used {cpu:.0f} s of CPU. A "
          f"checkpoint has {len(files)} files, the largest {max(files) / 2**20:.0f} MiB. zstd level 3 (Orbax's codec) "
          f"on one core: compress {zstd[0]:.2f} GB/s, decompress {zstd[1]:.2f} GB/s.\n")
    rows = [
        ("save: caller blocked in `save()`", f"{med['blocked']:.3f} s",
         f"{100 * med['blocked'] / med['total']:.1f}% of the total save"),
        ("save: total, until published with checksums", f"{med['total']:.2f} s", f"{save_gbs:.2f} GB/s"),
        ("save: of which hashing (background thread)", f"{med['hash']:.2f} s",
         f"{med['bytes'] / med['hash'] / GB:.2f} GB/s" if med["hash"] else "-"),
        ("save: until `sync` returned", f"{med['synced']:.2f} s", f"{med['bytes'] / med['synced'] / GB:.2f} GB/s"),
        ("restore as a resume does (checksums checked alongside)", f"{rmed['total']:.2f} s",
         f"{restore_gbs:.2f} GB/s"),
        ("restore: `verify` alone, for comparison", f"{rmed['verify']:.2f} s",
         f"{med['bytes'] / rmed['verify'] / GB:.2f} GB/s"),
        ("restore: Orbax's restore alone, for comparison", f"{rmed['plain']:.2f} s",
         f"{med['bytes'] / rmed['plain'] / GB:.2f} GB/s"),
        ("disk: dd write, conv=fdatasync, pages dropped after", "", f"{write_gbs:.2f} GB/s ({listed(dd_writes)})"),
        ("disk: the same in 64 MiB blocks, for comparison", "",
         f"{statistics.median(dd_large):.2f} GB/s ({listed(dd_large)})"),
        ("disk: dd read" + (", cache dropped" if can_drop else ", iflag=direct"), "",
         f"{read_gbs:.2f} GB/s ({listed(dd_reads)})"),
        ("the first save of the process, until published", f"{first['total']:.2f} s",
         f"{first['bytes'] / first['total'] / GB:.2f} GB/s"),
        ("each save, until published", "", listed(s["bytes"] / s["total"] / GB for s in saves) + " GB/s"),
        ("disk: dd write, conv=fdatasync, pages kept in the cache", "",
         f"{statistics.median(dd_cached):.2f} GB/s ({listed(dd_cached)})"),
        ("disk: dd writes back to back, each file's pages dropped after", "",
         f"{statistics.median(dd_loop):.2f} GB/s ({listed(dd_loop)})"),
    ]
    if args.markdown:
        print("| measurement | time | rate |\n|---|---:|---:|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
    else:
        for r in rows:
            print(f"  {r[0]:<52} {r[1]:>9}  {r[2]}")
    checks = [("blocked < 10% of the total save", med["blocked"] < 0.1 * med["total"]),
              ("save >= half the disk's write throughput", save_gbs >= 0.5 * write_gbs),
              ("restore >= half the disk's read throughput", restore_gbs >= 0.5 * read_gbs)]
    print("\nTargets: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}"
                                                        for name, ok in checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
