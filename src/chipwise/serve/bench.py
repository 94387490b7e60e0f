"""`chipwise bench-serve`: a load generator for any OpenAI-compatible server (chipwise's own, vLLM, llama.cpp's
server, `transformers serve`).

Prompts are windows of a real corpus (the running Python's standard library by default) cut to exactly
--input-len tokens under --tokenizer; outputs are forced to --output-len tokens (max_tokens, plus vLLM's
`ignore_eos` and `min_tokens`, which other servers ignore). Requests stream (`stream: true`, usage included) and
arrive all at once or as a seeded Poisson process, optionally capped in flight. bench_stats.py turns what the
client saw into vLLM-named figures and, given the serving chips, dollars and kWh per million output tokens.

Imported by `chipwise --help`: nothing heavy (httpx, numpy, tokenizers) at module level.
"""

from __future__ import annotations

import math
from pathlib import Path

from chipwise.errors import ChipwiseError

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
CONNECT_TIMEOUT_S = 10.0
# Between two chunks of one stream: a loaded server may queue a request for minutes before its first token.
READ_TIMEOUT_S = 600.0
# Prompts come from consecutive windows of a token pool this large at most (a list of ints: ~40 bytes a token);
# a bigger workload draws its windows at random places in it.
MAX_POOL_TOKENS = 4 * 2**20
MAX_CUT_TRIES = 8  # re-tokenizing a decoded window may merge across its edges; a few nudges fix the length


def add_parser(sub) -> None:
    b = sub.add_parser("bench-serve", help="load-test an OpenAI-compatible server: throughput, TTFT, TPOT, ITL, "
                                           "goodput, $ and kWh per 1M tokens")
    b.add_argument("--url", required=True, help="the server's base URL, e.g. http://localhost:8000")
    b.add_argument("--model", required=True, help="the model name the server serves")
    b.add_argument("--input-len", type=int, required=True, metavar="I", help="prompt tokens per request")
    b.add_argument("--output-len", type=int, required=True, metavar="O", help="output tokens per request")
    b.add_argument("--num-prompts", type=int, required=True, metavar="N", help="requests to send")
    b.add_argument("--request-rate", type=float, default=math.inf, metavar="R",
                   help="requests/s, Poisson arrivals (default inf: all at once)")
    b.add_argument("--max-concurrency", type=int, metavar="C", help="at most C requests in flight")
    b.add_argument("--goodput", nargs="+", metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)")
    b.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer.json, a Hugging Face model directory or a chipwise run directory "
                        "(default: --model, if it is a local path)")
    b.add_argument("--endpoint", default=COMPLETIONS, choices=[COMPLETIONS, CHAT])
    b.add_argument("--corpus", metavar="PATH",
                   help="a text file or a directory of them to cut prompts from (default: Python's stdlib)")
    b.add_argument("--seed", type=int, default=0, help="picks the prompts and the arrival times")
    b.add_argument("--warmup", type=int, default=1, metavar="K",
                   help="unmeasured requests sent first, one at a time (default 1; it also checks the server)")
    b.add_argument("--accelerator", metavar="ID", help="the serving chip's catalog id, for its price and power")
    b.add_argument("--chips", type=int, default=1, help="serving chips (default 1)")
    b.add_argument("--price-per-hour", type=float, metavar="USD", help="USD per chip-hour (overrides the catalog)")
    b.add_argument("--power-watts", type=float, metavar="W", help="watts per chip (overrides the catalog)")
    b.add_argument("--json", action="store_true", help="print the results as one JSON object (vLLM's field names)")


def _check_args(args) -> None:
    for flag, value, least in (("--input-len", args.input_len, 1), ("--output-len", args.output_len, 1),
                               ("--num-prompts", args.num_prompts, 1), ("--chips", args.chips, 1),
                               ("--warmup", args.warmup, 0)):
        if value < least:
            raise ChipwiseError(f"{flag} is {value}; it must be at least {least}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ChipwiseError(f"--max-concurrency is {args.max_concurrency}; it must be at least 1")
    if not args.request_rate > 0:
        raise ChipwiseError(f"--request-rate is {args.request_rate}; give a positive rate, or inf for all at once")
    for flag, value in (("--price-per-hour", args.price_per_hour), ("--power-watts", args.power_watts)):
        if value is not None and not 0 < value < math.inf:
            raise ChipwiseError(f"{flag} is {value}; give a positive figure")


# ---- prompts ------------------------------------------------------------------------------------------------


def load_tokenizer(path: str):
    """A tokenizers.Tokenizer from a tokenizer.json, a directory holding one, or a chipwise run directory."""
    from tokenizers import Tokenizer

    from chipwise.run_dir import TOKENIZER_FILE, RunDir

    p = Path(path).expanduser()
    if p.is_dir() and RunDir(p).is_run():
        return RunDir(p).read_tokenizer()
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise ChipwiseError(f"tokenizer {path}: no such file" + (f" (no {TOKENIZER_FILE} in the directory)"
                                                                  if p.is_dir() else "")
                            + "; give a tokenizer.json, a Hugging Face model directory or a chipwise run directory")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for an unreadable file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ChipwiseError(f"tokenizer {file} is not a valid tokenizer.json ({reason})") from None


def _corpus_files(corpus: str | None) -> tuple[str, list[Path]]:
    """(label, files): the stdlib (as chipwise's default training corpus lists it), or the user's file/folder."""
    from chipwise.data.corpus import stdlib_files

    if corpus is None:
        root, files = stdlib_files()
        return f"Python stdlib ({root})", files
    p = Path(corpus).expanduser()
    if p.is_file():
        return str(p), [p]
    if p.is_dir():
        return str(p), sorted(f for f in p.rglob("*") if f.is_file())
    raise ChipwiseError(f"--corpus {corpus}: no such file or directory")


def build_prompts(tok, corpus: str | None, num: int, length: int, seed: int) -> tuple[str, list[str]]:
    """`num` prompts of exactly `length` tokens (special tokens not counted: a server adds its own BOS), cut from
    consecutive windows of the corpus's text in a seeded file order, so prompts differ and a prefix cache sees
    what real traffic would."""
    import random

    from chipwise.data.corpus import _read_text

    label, files = _corpus_files(corpus)
    rng = random.Random(seed)
    rng.shuffle(files)
    pool: list[int] = []
    want = min(num * length + MAX_CUT_TRIES * length, MAX_POOL_TOKENS)  # the windows, and room to slide the last
    for path in files:
        text = _read_text(path)  # None: not UTF-8 text
        if text:
            pool += tok.encode(text + "\n\n", add_special_tokens=False).ids
        if len(pool) >= want:
            break
    if len(pool) <= 2 * length:  # room for one window and for sliding it
        raise ChipwiseError(f"the corpus ({label}) has {len(pool)} tokens; --input-len {length} needs more than "
                            f"{2 * length}: give a larger --corpus")
    starts = [i * length if (i + 1) * length <= len(pool) - length else rng.randrange(len(pool) - 2 * length)
              for i in range(num)]
    return label, [_cut(tok, pool, s, length) for s in starts]


def _cut(tok, pool: list[int], start: int, length: int) -> str:
    """Text from pool[start:] that re-tokenizes to exactly `length` tokens. A decoded window may tokenize to a few
    more or fewer (merges across its edges, a split character): the window grows or shrinks by the difference,
    and failing that starts one token later."""
    for begin in range(start, min(start + MAX_CUT_TRIES, len(pool) - length)):
        take = length
        for _ in range(MAX_CUT_TRIES):
            text = tok.decode(pool[begin:begin + take], skip_special_tokens=False)
            got = len(tok.encode(text, add_special_tokens=False).ids)
            if got == length:
                return text
            take += length - got
            if take < 1 or begin + take > len(pool):
                break
    raise ChipwiseError(f"could not cut a prompt of exactly {length} tokens from the corpus with this tokenizer; "
                        f"try another --seed or --corpus")


# ---- the requests -------------------------------------------------------------------------------------------


def request_body(endpoint: str, model: str, prompt: str, output_len: int) -> dict:
    """A streaming request forced to `output_len` tokens (`ignore_eos`/`min_tokens`: vLLM's names for it)."""
    # temperature 0, as vLLM's load generator sends: the same work on every server, whatever its default
    body = {"model": model, "max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == CHAT:  # newer OpenAI-style servers read max_completion_tokens in chat, older ones max_tokens
        return {**body, "messages": [{"role": "user", "content": prompt}], "max_completion_tokens": output_len}
    return {**body, "prompt": prompt}


def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""  # the usage chunk
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_request(client, api_url: str, body: dict, prompt_len: int):
    """One streamed request, timed; every failure becomes a failed RequestOutput, never an exception."""
    import json
    import time

    import httpx

    from chipwise.serve.bench_stats import RequestOutput

    out = RequestOutput(prompt_len)
    pieces: list[str] = []
    out.start = last = time.perf_counter()
    first = True
    try:
        async with client.stream("POST", api_url, json=body) as resp:
            if resp.status_code != 200:
                detail = " ".join((await resp.aread()).decode(errors="replace").split())[:300]
                out.error = f"HTTP {resp.status_code} from {api_url}: {detail}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # SSE blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):  # a server that fails mid-stream sends an error event
                    out.error = f"error event from the server: {' '.join(str(chunk['error']).split())[:300]}"
                    return out
                now = time.perf_counter()
                text = _chunk_text(chunk, body.get("messages") is not None)
                if text:
                    if first:
                        out.ttft, first = now - out.start, False
                    else:
                        out.itl.append(now - last)
                    last = now
                    pieces.append(text)
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    out.usage_tokens = int(usage["completion_tokens"])
        out.latency = time.perf_counter() - out.start
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        out.error, out.unreachable = f"cannot connect to {api_url} ({e or type(e).__name__})", True
        return out
    except Exception as e:  # noqa: BLE001 - a load generator counts a broken request and carries on
        out.error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return out
    if first:
        out.error = "the response streamed no text (does the server support `stream: true` on this endpoint?)"
        return out
    out.text, out.success = "".join(pieces), True
    return out


def base_url(url: str) -> str:
    """The server's root: an OpenAI-client style base URL (".../v1") loses its /v1, which the endpoint carries."""
    root = url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


async def run_load(url: str, endpoint: str, model: str, prompts: list[tuple[str, int]], output_len: int,
                   request_rate: float, max_concurrency: int | None, seed: int, warmup: list[tuple[str, int]]):
    """Send the `warmup` prompts one at a time, unmeasured, then every prompt; returns (outputs, duration in s)."""
    import asyncio
    import random
    import time

    import httpx

    api_url = base_url(url) + endpoint
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, pool=None)
    # No pool limit: --max-concurrency alone caps what is in flight (httpx's default of 100 would cap it silently).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        for prompt, prompt_len in warmup:
            out = await send_request(client, api_url, request_body(endpoint, model, prompt, output_len), prompt_len)
            if out.unreachable:
                raise ChipwiseError(f"{out.error}; is the server running?")
            if not out.success:
                raise ChipwiseError(f"the warm-up request failed: {out.error}; check --url, --model and --endpoint")
        slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def one(prompt: str, prompt_len: int):
            body = request_body(endpoint, model, prompt, output_len)
            if slots is None:
                return await send_request(client, api_url, body, prompt_len)
            async with slots:
                return await send_request(client, api_url, body, prompt_len)

        rng = random.Random(seed)
        tasks, arrival = [], 0.0
        begin = time.perf_counter()
        for i, (prompt, prompt_len) in enumerate(prompts):
            if i and math.isfinite(request_rate):
                arrival += rng.expovariate(request_rate)  # Poisson process: exponential gaps
                # Sleep to the planned arrival time, not for the gap, so that slow sends do not stretch the schedule.
                await asyncio.sleep(max(0.0, begin + arrival - time.perf_counter()))
            tasks.append(asyncio.create_task(one(prompt, prompt_len)))
        outputs = await asyncio.gather(*tasks)
        return list(outputs), time.perf_counter() - begin


def command(args) -> int:
    import asyncio
    import datetime
    import json
    import logging
    import sys

    from chipwise.serve import bench_stats
    from chipwise.serve.pricing import resolve_pricing

    _check_args(args)
    slos = bench_stats.parse_goodput(args.goodput)
    pricing = resolve_pricing(args.accelerator, args.chips, args.price_per_hour, args.power_watts)
    for chatty in ("httpx", "httpcore"):  # one INFO line per request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    tokenizer_path = args.tokenizer
    if tokenizer_path is None:
        if not Path(args.model).expanduser().exists():
            raise ChipwiseError("bench-serve cuts prompts to --input-len tokens and needs the model's tokenizer: give "
                                "--tokenizer PATH (a tokenizer.json, a Hugging Face model directory or a chipwise "
                                "run directory)")
        tokenizer_path = args.model
    tok = load_tokenizer(tokenizer_path)
    # The warm-up gets a prompt of its own: one it shared with the benchmark would be a prefix-cache hit.
    corpus_label, prompts = build_prompts(tok, args.corpus, args.num_prompts + (args.warmup > 0), args.input_len,
                                          args.seed)
    prompts = [(p, args.input_len) for p in prompts]
    outputs, duration = asyncio.run(run_load(
        args.url, args.endpoint, args.model, prompts[:args.num_prompts], args.output_len, args.request_rate,
        args.max_concurrency, args.seed, prompts[args.num_prompts:] * args.warmup))
    failures = [o for o in outputs if not o.success]
    if failures and len(failures) == len(outputs) and all(o.unreachable for o in failures):
        raise ChipwiseError(f"{failures[0].error}; is the server running?")

    def count_tokens(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    metrics = bench_stats.compute_metrics(outputs, duration, count_tokens, slos)
    with_usage = sum(o.usage_tokens is not None for o in outputs if o.success)
    rate = args.request_rate
    result = {
        "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if args.endpoint == CHAT else "openai",
        "url": base_url(args.url), "endpoint": args.endpoint, "model_id": args.model,
        "tokenizer_id": str(tokenizer_path), "corpus": corpus_label, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len,
        "request_rate": rate if math.isfinite(rate) else "inf",
        "max_concurrency": args.max_concurrency, "seed": args.seed, "goodput_slos_ms": slos or None,
        **metrics,
        "output_tokens_counted_by": ("the server's usage" if with_usage == metrics["completed"] else
                                     "the client's tokenizer (no usage from the server)" if not with_usage else
                                     f"the server's usage ({with_usage} requests), else the client's tokenizer"),
        "first_error": failures[0].error if failures else None,
        **bench_stats.cost_fields(pricing, metrics["output_throughput"]),
    }
    if failures:  # once, however many failed: the rest usually say the same
        print(f"warning: {len(failures)} of {len(outputs)} requests failed; the first: {failures[0].error}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(bench_stats.report_lines(result)))
    return 0 if metrics["completed"] else 1
