"""`chipwise bench-serve` against a fake OpenAI-compatible server (FastAPI under uvicorn, in a thread) that streams
known chunks at known delays and records what it was sent, so the measured figures can be checked against what the
server really did."""

import asyncio
import json
import math
import random
import socket
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error

from chipwise import catalog
from chipwise.cli import main
from chipwise.data.corpus import Document
from chipwise.data.tokenizer import train_tokenizer
from chipwise.errors import ChipwiseError
from chipwise.serve import bench
from chipwise.serve.bench_stats import RequestOutput, compute_metrics, parse_goodput

TTFT_S = 0.08  # the fake server's wait before the first chunk
SLOW_TTFT_S = 0.26  # ... for every other request of the model "mixed"
ITL_S = 0.03  # ... between chunks
PIECE = " x = 1\n"  # each chunk's text: several tokens, so counting text differs from the server's usage


class FakeServer:
    """Records the request bodies, their arrival times and the most requests in flight at once."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.bodies, self.arrivals, self.count, self.in_flight, self.max_in_flight = [], [], 0, 0, 0

    def app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse

        app = FastAPI()

        async def handle(request: Request, chat: bool):
            body = await request.json()
            self.bodies.append(body)
            self.arrivals.append(time.perf_counter())
            n, self.count = self.count, self.count + 1
            model = body["model"]
            if model == "flaky" and n % 3 == 1:
                return JSONResponse({"error": {"message": "engine fell over"}}, status_code=500)
            first_wait = SLOW_TTFT_S if model == "mixed" and n % 2 else TTFT_S
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

            def sse(obj) -> str:
                return f"data: {json.dumps(obj)}\n\n"

            async def stream():
                try:
                    if chat:  # the role-only chunk a chat stream opens with carries no text: not the first token
                        yield sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                    await asyncio.sleep(first_wait)
                    for i in range(body["max_tokens"]):
                        if i:
                            await asyncio.sleep(ITL_S)
                        choice = {"index": 0, "delta": {"content": PIECE}} if chat else {"index": 0, "text": PIECE}
                        yield sse({"choices": [choice]})
                    if body["stream_options"]["include_usage"] and model != "no-usage":
                        yield sse({"choices": [], "usage": {"prompt_tokens": 1,
                                                            "completion_tokens": body["max_tokens"]}})
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(stream(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await handle(request, chat=True)

        return app


@pytest.fixture(scope="module")
def server():
    import uvicorn

    fake = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(fake.app(), log_level="error", access_log=False))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not uv.started:
        assert time.time() < deadline and thread.is_alive(), "the fake server did not start"
        time.sleep(0.02)
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield fake
    uv.should_exit = True
    thread.join(10)


@pytest.fixture
def fake(server):
    server.reset()
    return server


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A small byte-level BPE trained on a few stdlib modules, like the one a chipwise run writes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [Document(n, (stdlib / n).read_text()) for n in ("textwrap.py", "shlex.py", "string.py", "heapq.py")]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(docs, 400).save(str(path))
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return bench.load_tokenizer(str(tokenizer_file))


def n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


def run_json(capsys, fake, tokenizer_file, *extra, model="fake", input_len=24, output_len=5, num=6):
    capsys.readouterr()
    argv = ["bench-serve", "--url", fake.url, "--model", model, "--tokenizer", str(tokenizer_file),
            "--input-len", str(input_len), "--output-len", str(output_len), "--num-prompts", str(num), "--json",
            *extra]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def test_timings_and_throughput_match_what_the_server_did(capsys, fake, tokenizer_file):
    result, err = run_json(capsys, fake, tokenizer_file, "--output-len", "5")
    assert err == ""
    assert result["completed"] == 6 and result["failed"] == 0
    # Each request: first chunk after TTFT_S, then 4 more ITL_S apart. TPOT divides by 4, not 5 (a bug dividing
    # by the output length would give 24 ms); scheduling noise only ever adds time, hence the lopsided bounds.
    assert TTFT_S * 1e3 - 2 <= result["median_ttft_ms"] <= TTFT_S * 1e3 + 100
    assert ITL_S * 1e3 - 3 <= result["median_itl_ms"] <= ITL_S * 1e3 + 25
    assert ITL_S * 1e3 - 3 <= result["median_tpot_ms"] <= ITL_S * 1e3 + 25
    e2e = (TTFT_S + 4 * ITL_S) * 1e3
    assert e2e - 3 <= result["median_e2el_ms"] <= e2e + 150
    for key in ("ttft", "tpot", "itl", "e2el"):
        assert result[f"median_{key}_ms"] <= result[f"p90_{key}_ms"] <= result[f"p99_{key}_ms"]
    # All six at once (rate inf, no cap): the benchmark lasts about one request, and every figure per second
    # divides by that duration.
    assert result["max_concurrency"] is None and result["request_rate"] == "inf" and fake.max_in_flight == 6
    assert e2e / 1e3 <= result["duration"] <= e2e / 1e3 + 0.6
    assert result["total_input_tokens"] == 6 * 24 and result["total_output_tokens"] == 6 * 5
    assert result["request_throughput"] == pytest.approx(6 / result["duration"])
    assert result["output_throughput"] == pytest.approx(30 / result["duration"])
    assert result["total_token_throughput"] == pytest.approx((6 * 24 + 30) / result["duration"])
    assert result["output_tokens_counted_by"] == "the server's usage"


def test_the_json_uses_vllm_field_names(capsys, fake, tokenizer_file):
    result, _ = run_json(capsys, fake, tokenizer_file, "--goodput", "ttft:1000", num=2)
    names = ["duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "request_goodput", "output_throughput", "total_token_throughput", "max_concurrency", "request_rate",
             "num_prompts", "model_id", "tokenizer_id", "max_concurrent_requests", "backend", "date"]
    names += [f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
              for stat in ("mean", "median", "std", "p90", "p99")]
    assert not [n for n in names if n not in result]
    assert result["backend"] == "openai" and result["model_id"] == "fake" and result["num_prompts"] == 2


def test_requests_ask_for_forced_length_streamed_outputs_of_exact_prompts(capsys, fake, tokenizer_file, tok):
    run_json(capsys, fake, tokenizer_file, "--warmup", "0", input_len=37, output_len=4, num=5)
    assert len(fake.bodies) == 5
    for body in fake.bodies:
        assert body["max_tokens"] == body["min_tokens"] == 4 and body["ignore_eos"] is True
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert n_tokens(tok, body["prompt"]) == 37
    assert len({b["prompt"] for b in fake.bodies}) == 5  # distinct prompts: a prefix cache sees real traffic
    fake.reset()
    run_json(capsys, fake, tokenizer_file, "--warmup", "2", input_len=37, output_len=4, num=3)
    warmup, measured = [b["prompt"] for b in fake.bodies[:2]], {b["prompt"] for b in fake.bodies[2:]}
    assert len(fake.bodies) == 5 and warmup[0] == warmup[1] and warmup[0] not in measured and len(measured) == 3


@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_prompts_have_exactly_the_requested_token_count(tok, length):
    label, prompts = bench.build_prompts(tok, None, 12, length, seed=3)
    assert "stdlib" in label and len(prompts) == 12
    assert [n_tokens(tok, p) for p in prompts] == [length] * 12
    assert bench.build_prompts(tok, None, 12, length, seed=3)[1] == prompts  # seeded
    assert bench.build_prompts(tok, None, 12, length, seed=4)[1] != prompts


def test_max_concurrency_is_honoured(capsys, fake, tokenizer_file):
    result, _ = run_json(capsys, fake, tokenizer_file, "--max-concurrency", "2", "--warmup", "0", num=6,
                         output_len=3)
    assert fake.max_in_flight == 2  # never more, and the cap was reached
    assert result["max_concurrency"] == 2 and result["max_concurrent_requests"] <= 2
    one = TTFT_S + 2 * ITL_S
    assert result["duration"] >= 3 * one  # three waves of two


def test_poisson_arrivals_follow_the_seeded_schedule(capsys, fake, tokenizer_file):
    rate, seed = 20.0, 5
    result, _ = run_json(capsys, fake, tokenizer_file, "--request-rate", str(rate), "--seed", str(seed),
                         "--warmup", "0", num=6, output_len=2)
    rng = random.Random(seed)
    planned = np.cumsum([0.0] + [rng.expovariate(rate) for _ in range(5)])
    seen = np.array(fake.arrivals) - fake.arrivals[0]
    assert result["request_rate"] == rate
    assert np.all(np.abs(seen - planned) < 0.05), (seen, planned)


def test_goodput_counts_requests_meeting_every_slo(capsys, fake, tokenizer_file):
    # "mixed": every other request waits SLOW_TTFT_S for its first token; the warm-up takes one of each kind.
    result, _ = run_json(capsys, fake, tokenizer_file, "--goodput", "ttft:170", "tpot:1000", model="mixed", num=6,
                         output_len=3)
    assert result["goodput_slos_ms"] == {"ttft": 170.0, "tpot": 1000.0}
    assert result["request_goodput"] * result["duration"] == pytest.approx(3)
    result, _ = run_json(capsys, fake, tokenizer_file, "--goodput", "ttft:1000", "tpot:5", model="mixed", num=2)
    assert result["request_goodput"] == 0  # TPOT is about ITL_S: every request misses 5 ms
    result, _ = run_json(capsys, fake, tokenizer_file, num=2)
    assert result["request_goodput"] is None  # no SLO, no goodput (as vLLM)


def test_output_tokens_come_from_usage_else_from_the_text(capsys, fake, tokenizer_file, tok):
    per_request_text = n_tokens(tok, PIECE * 4)
    assert per_request_text != 4  # else the two ways of counting could not be told apart
    result, _ = run_json(capsys, fake, tokenizer_file, output_len=4, num=3)
    assert result["total_output_tokens"] == 3 * 4
    result, _ = run_json(capsys, fake, tokenizer_file, model="no-usage", output_len=4, num=3)
    assert result["total_output_tokens"] == 3 * per_request_text
    assert "tokenizer" in result["output_tokens_counted_by"]
    # TPOT divides by the counted tokens: the stream took (4 - 1) ITLs for per_request_text - 1 tokens.
    assert result["median_tpot_ms"] == pytest.approx(3 * ITL_S * 1e3 / (per_request_text - 1), abs=8)


def test_chat_endpoint_and_an_openai_client_style_url(capsys, fake, tokenizer_file, tok):
    # "--url .../v1/" as an OpenAI client takes it: the later --url wins, and must not become /v1/v1/chat/...
    result, _ = run_json(capsys, fake, tokenizer_file, "--endpoint", "/v1/chat/completions", "--warmup", "0",
                         "--url", fake.url + "/v1/", input_len=16, output_len=3, num=2)
    assert result["backend"] == "openai-chat" and result["completed"] == 2 and result["total_output_tokens"] == 6
    body = fake.bodies[0]
    assert n_tokens(tok, body["messages"][0]["content"]) == 16 and body["max_completion_tokens"] == 3
    assert TTFT_S * 1e3 - 2 <= result["median_ttft_ms"]  # the role-only chunk is not the first token


def test_failures_are_counted_and_the_first_error_printed_once(capsys, fake, tokenizer_file):
    result, err = run_json(capsys, fake, tokenizer_file, "--warmup", "0", model="flaky", num=6)
    assert result["failed"] == 2 and result["completed"] == 4  # the server failed its 2nd and 5th request
    assert result["total_input_tokens"] == 4 * 24 and "HTTP 500" in result["first_error"]
    assert err.count("HTTP 500") == 1 and err.startswith("warning: 2 of 6 requests failed")
    assert result["request_throughput"] == pytest.approx(4 / result["duration"])


def test_cost_and_energy_per_million_output_tokens(capsys, fake, tokenizer_file):
    result, _ = run_json(capsys, fake, tokenizer_file, "--price-per-hour", "3.6", "--power-watts", "500",
                         "--chips", "2", num=3)
    tokens_per_hour = result["output_throughput"] * 3600
    assert result["dollars_per_million_output_tokens"] == pytest.approx(3.6 * 2 / tokens_per_hour * 1e6)
    assert result["kwh_per_million_output_tokens"] == pytest.approx(0.5 * 2 / tokens_per_hour * 1e6)
    assert result["price_source"] == "--price-per-hour"

    h100 = catalog.get("h100-sxm")
    watts = h100.power_range()
    assert watts.is_point  # a single published figure: the single-figure fields carry it
    result, _ = run_json(capsys, fake, tokenizer_file, "--accelerator", "h100-sxm", num=3)
    tokens_per_hour = result["output_throughput"] * 3600
    assert result["dollars_per_million_output_tokens"] == pytest.approx(h100.price_per_chip_hour / tokens_per_hour
                                                                        * 1e6)
    assert result["kwh_per_million_output_tokens"] == pytest.approx(watts.low / 1000 / tokens_per_hour * 1e6)
    assert result["price_source"] == "catalog h100-sxm" and result["power_source"].startswith("catalog h100-sxm")


def test_a_catalog_power_range_gives_an_energy_range(capsys, fake, tokenizer_file):
    chip = next(a for a in catalog.load_catalog().values() if a.power_range() and not a.power_range().is_point)
    watts = chip.power_range()
    result, _ = run_json(capsys, fake, tokenizer_file, "--accelerator", chip.id, "--chips", "3", num=2)
    tokens_per_hour = result["output_throughput"] * 3600
    low, high = result["kwh_per_million_output_tokens_range"]
    assert low == pytest.approx(watts.low * 3 / 1000 / tokens_per_hour * 1e6)
    assert high == pytest.approx(watts.high * 3 / 1000 / tokens_per_hour * 1e6)
    assert result["kwh_per_million_output_tokens"] is None  # no midpoint: nobody published one
    assert result["power_source"] == f"catalog {chip.id}, {watts.basis}"


def test_a_chip_without_a_power_figure_leaves_energy_unknown(capsys, fake, tokenizer_file):
    chip = next(a for a in catalog.load_catalog().values()
                if a.power_range() is None and a.price_per_chip_hour is not None)
    result, _ = run_json(capsys, fake, tokenizer_file, "--accelerator", chip.id, num=2)
    assert result["kwh_per_million_output_tokens"] is None and result["kwh_per_million_output_tokens_range"] is None
    assert result["dollars_per_million_output_tokens"] > 0
    assert main(["bench-serve", "--url", fake.url, "--model", "fake", "--tokenizer", str(tokenizer_file),
                 "--input-len", "8", "--output-len", "2", "--num-prompts", "2", "--accelerator", chip.id]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"energy unknown: catalog {chip.id} has no power figure" in text
    assert f"(catalog {chip.id}) / measured output throughput" in text
    assert "Mean TTFT (ms)" in text and "measured" in text


def test_an_unreachable_server_is_one_line_and_exit_2(capsys, tokenizer_file):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    for warmup in ("1", "0"):
        code = main(["bench-serve", "--url", f"http://127.0.0.1:{port}", "--model", "m", "--tokenizer",
                     str(tokenizer_file), "--input-len", "8", "--output-len", "2", "--num-prompts", "2",
                     "--warmup", warmup])
        assert code == 2
        assert "cannot connect" in one_line_error(capsys)


def test_the_tokenizer_may_be_a_file_a_model_directory_or_a_run_directory(tmp_path, tokenizer_file, tok):
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "tokenizer.json").write_text(tokenizer_file.read_text())
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text(tokenizer_file.read_text())
    (run / "config.yaml").write_text("{}\n")
    for path in (tokenizer_file, hf, run):
        assert bench.load_tokenizer(str(path)).to_str() == tok.to_str()
    with pytest.raises(ChipwiseError, match="no tokenizer.json"):
        bench.load_tokenizer(str(tmp_path))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ChipwiseError, match="not a valid tokenizer.json"):
        bench.load_tokenizer(str(tmp_path / "bad.json"))


def test_metrics_from_known_request_timings():
    def done(start, ttft, latency, tokens, itl=()):
        return RequestOutput(10, success=True, start=start, ttft=ttft, latency=latency, usage_tokens=tokens,
                             itl=list(itl))

    outputs = [done(0.0, 0.1, 0.5, 5, [0.1] * 4), done(0.2, 0.3, 0.7, 3, [0.2, 0.2]), done(0.3, 0.05, 0.05, 1),
               RequestOutput(10, error="HTTP 500")]
    m = compute_metrics(outputs, 2.0, lambda text: 0, parse_goodput(["ttft:200", "tpot:150"]))
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 1, 30, 9)
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 4.5 and m["total_token_throughput"] == 19.5
    assert m["mean_ttft_ms"] == pytest.approx(150) and m["median_ttft_ms"] == pytest.approx(100)
    # TPOT: (0.5 - 0.1) / 4 and (0.7 - 0.3) / 2; the one-token request has none.
    assert m["mean_tpot_ms"] == pytest.approx(150) and m["p99_tpot_ms"] == pytest.approx(100 + 0.99 * 100)
    assert m["mean_itl_ms"] == pytest.approx(800 / 6) and m["p90_e2el_ms"] == pytest.approx(500 + 0.8 * 200)
    # Good: the first (100 ms, 100 ms) and the one-token request (50 ms, TPOT 0); the second's TTFT is 300 ms.
    assert m["request_goodput"] == pytest.approx(2 / 2.0)
    assert m["max_concurrent_requests"] == 3  # all three overlap at 0.3 s
    empty = compute_metrics([RequestOutput(10, error="x")], 1.0, len, {})
    assert empty["completed"] == 0 and empty["mean_ttft_ms"] is None and empty["request_goodput"] is None
    assert math.isclose(empty["request_throughput"], 0.0)


@pytest.mark.parametrize("bad", ["ttft", "ttft:", "ttft:-1", "latency:5", "tpot:nan"])
def test_bad_goodput_slos_are_refused(bad):
    with pytest.raises(ChipwiseError, match="--goodput"):
        parse_goodput([bad])
