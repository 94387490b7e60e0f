"""The token store at scale: `data prepare` throughput against the tokenizers library's own encode_batch, its peak
memory, the start-up of training on a prepared store, and the loader against the train step.

    python benchmarks/data_prepare.py --sizes-mb 200,1000 [--formats jsonl,parquet] [--work DIR] [--keep]

For each size and format it generates a corpus (`make_corpus`: documents cut from this Python's standard library
sources at random lengths, written as JSONL or parquet under --work, never committed), then in fresh processes:
1. `prepare_store` with a given tokenizer (trained once on a 16 MB sample, so tokenizer training is not timed),
   reporting wall time, MB/s and tokens/s, the main process's and the largest worker's peak RSS;
2. the same text through `Tokenizer.encode_batch` (all cores, the library's own threads) in chunks read from the
   same files, timing only the encode calls: the tokenizer's own ceiling on this machine;
3. the start-up of a training process on the prepared store: from the process's start, and from the first
   chipwise import, to the first batch in hand (`prepare_data` + the Grain iterator's first batch);
4. the loader's throughput (tokens/s of batches of 16 x 256) against the demo preset's train step on this CPU
   (`train_step.py --preset tiny`, same batch), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_corpus(path: Path, size_mb: int, fmt: str, seed: int = 0) -> Path:
    """Documents of 1-40 KB cut from the stdlib's .py files, until size_mb MB of text; JSONL or parquet."""
    out = path / f"corpus-{size_mb}mb.{fmt}"
    if out.exists():
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts:
            continue
        try:
            texts.append(f.read_text())
        except (UnicodeDecodeError, OSError):
            continue
    rng, total, target = random.Random(seed), 0, size_mb * 10**6
    path.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    batch, writer = [], None

    def flush():
        nonlocal writer
        if fmt == "jsonl":
            with tmp.open("a") as fh:
                fh.writelines(json.dumps({"text": t}) + "\n" for t in batch)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"text": batch})
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        batch.clear()

    while total < target:
        src = rng.choice(texts)
        n = rng.randint(1000, 40000)
        start = rng.randint(0, max(0, len(src) - n))
        doc = f"# doc {rng.getrandbits(32):08x}\n" + src[start:start + n]
        batch.append(doc)
        total += len(doc.encode())
        if len(batch) >= 2000:
            flush()
    flush()
    if writer is not None:
        writer.close()
    tmp.rename(out)
    return out


CHILD = r"""
import json, os, resource, sys, time
t_process = float(sys.argv[2])
t_import = time.time()
args = json.loads(sys.argv[1])
from chipwise.config import DataConfig
cfg = DataConfig(sources=[args["source"]], tokenizer=args["tokenizer"], cache_dir=args["cache"])
if args["what"] == "prepare":
    from chipwise import data
    t0 = time.perf_counter()
    st = data.prepare_store(cfg, 1 << 17, log=lambda m: None, workers=args["workers"])
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "tokens": st.tokens("train") + st.tokens("val"), "bytes": st.manifest["num_bytes"],
           "shards": len(st.manifest["splits"]["train"]) + len(st.manifest["splits"]["val"]),
           "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
elif args["what"] == "encode":
    from tokenizers import Tokenizer
    from chipwise.data import formats
    from pathlib import Path
    tok = Tokenizer.from_file(args["tokenizer"])
    tok.encode_special_tokens = True
    encode_s, tokens, nbytes, chunk, size = 0.0, 0, 0, [], 0
    def run(chunk):
        global encode_s, tokens
        t0 = time.perf_counter()
        encs = tok.encode_batch_fast(chunk, add_special_tokens=False)
        encode_s += time.perf_counter() - t0
        tokens += sum(len(e.ids) for e in encs) + len(chunk)
    for _, text in formats.records(Path(args["source"]), "text"):
        chunk.append(text); size += len(text); nbytes += len(text.encode())
        if size >= 32 * 2**20:
            run(chunk); chunk, size = [], 0
    if chunk:
        run(chunk)
    out = {"wall_s": encode_s, "tokens": tokens, "bytes": nbytes}
else:  # startup: to the first batch in hand
    from chipwise import data
    prepared = data.prepare_data(cfg, 1 << 17, log=lambda m: None)
    it = data.make_train_iterator(prepared, 256, 16, 0)
    first = next(it)
    t_first = time.time()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        next(it); n += 1
    out = {"from_process_s": t_first - t_process, "from_import_s": t_first - t_import,
           "loader_tokens_per_s": n * 16 * 256 / (time.perf_counter() - t0)}
print(json.dumps(out))
"""


def child(what: str, **kw) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"what": what, **kw}), repr(time.time())],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sample_tokenizer(work: Path, corpus: Path) -> Path:
    path = work / "tokenizer-32k.json"
    if not path.exists():
        from chipwise.data import formats, train_tokenizer_in_best_process
        from chipwise.data.corpus import Document

        docs, size = [], 0
        for n, text in formats.records(corpus, "text"):
            docs.append(Document(str(n), text))
            size += len(text)
            if size > 16 * 2**20:
                break
        train_tokenizer_in_best_process(docs, 32768).save(str(path))
    return path


def train_step_tokens_per_s() -> float:
    sys.path.insert(0, str(HERE))
    import train_step

    args = train_step.build_parser().parse_args(["--preset", "tiny", "--batch-size", "16", "--seq-len", "256",
                                                 "--steps", "5", "--warmup", "2"])
    return train_step.run_one(args)[0].tokens_per_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", default="200,1000")
    p.add_argument("--formats", default="jsonl,parquet")
    p.add_argument("--work", default="/tmp/chipwise-data-bench")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()
    work = Path(args.work)
    from chipwise.plan.calibration import cpu_model
    from chipwise.process import usable_cores

    print(f"Machine: {cpu_model()}, {usable_cores()} usable cores")
    rows = []
    for fmt in args.formats.split(","):
        for size in (int(s) for s in args.sizes_mb.split(",")):
            corpus = make_corpus(work, size, fmt)
            tok = sample_tokenizer(work, make_corpus(work, min(int(s) for s in args.sizes_mb.split(",")), "jsonl"))
            cache = work / f"cache-{size}-{fmt}"
            if cache.exists():
                import shutil

                shutil.rmtree(cache)
            prep = child("prepare", source=str(corpus), tokenizer=str(tok), cache=str(cache), workers=args.workers)
            enc = child("encode", source=str(corpus), tokenizer=str(tok), cache=str(cache), workers=0)
            start = child("startup", source=str(corpus), tokenizer=str(tok), cache=str(cache), workers=0)
            row = {"format": fmt, "size_mb": size, "prepare": prep, "encode_batch": enc, "startup": start}
            rows.append(row)
            print(json.dumps(row))
    step = train_step_tokens_per_s()
    print("\n| corpus | prepare s | prepare MB/s | tokens/s | encode_batch tokens/s | ratio | main RSS MB | "
          "worker RSS MB | start-up s (process / data) | loader tokens/s | loader / step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        prep, enc, st = r["prepare"], r["encode_batch"], r["startup"]
        tps, etps = prep["tokens"] / prep["wall_s"], enc["tokens"] / enc["wall_s"]
        mb_s = prep["bytes"] / 1e6 / prep["wall_s"]
        print(f"| {r['size_mb']} MB {r['format']} | {prep['wall_s']:.1f} | {mb_s:.1f} | "
              f"{tps:,.0f} | {etps:,.0f} | {tps / etps:.2f} | {prep['main_rss_mb']:,.0f} | "
              f"{prep['worker_rss_mb']:,.0f} | {st['from_process_s']:.1f} / {st['from_import_s']:.1f} | "
              f"{st['loader_tokens_per_s']:,.0f} | {st['loader_tokens_per_s'] / step:,.0f}x |")
    print(f"\nTrain step (preset tiny, batch 16 x 256, fp32, this CPU): {step:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
