"""`chipwise serve` end to end: a tiny run trained here, served by the real engine and HTTP server in this process
(uvicorn on a thread), spoken to by the official `openai` client and by httpx; one test drives the command itself
in a subprocess to check SIGTERM."""

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from chipwise.cli import main
from chipwise.serve.pricing import resolve_pricing
from chipwise.serve.engine import Engine
from chipwise.serve.metrics import ServerMetrics
from chipwise.serve.model_source import from_run
from chipwise.serve.server import build_app
from conftest import require

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve")]

# model.max_seq_len is long so that a 400-token reply outlasts what a test does while it streams
MODEL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=64",
         "model.vocab_size=320", "model.max_seq_len=512"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
    # Trained once per session: pytest-xdist may interleave another module's tests on this worker, and then the
    # module's fixtures are made again; the run need not be.
    tmp = tmp_path_factory.getbasetemp() / "serve-run"
    if (tmp / "run" / "summary.json").is_file():
        return tmp / "run"
    settings = [*MODEL, "train.seq_len=32", "train.batch_size=8", "train.steps=12", "train.log_every=4",
                "train.eval_every=12", "train.checkpoint_every=12", "train.eval_batches=1", "train.warmup_steps=2",
                "train.lr=1e-2", f"data.sources=[{corpus}]", f"data.cache_dir={tmp / 'cache'}",
                f"run_dir={tmp / 'run'}"]
    assert main(["train", *[x for s in settings for x in ("--set", s)]]) == 0
    return tmp / "run"


class Served:
    """A server on a thread: its base URL, engine and metrics."""

    def __init__(self, served, start_engine=True, **engine_args):
        import uvicorn

        self.engine = Engine(served, **engine_args)
        self.engine.warm_up()
        self.metrics = ServerMetrics(self.engine, served.name, resolve_pricing(None, 2, 1.8, 250.0))
        if start_engine:
            self.engine.start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(build_app(self.engine, served, self.metrics), host="127.0.0.1", port=port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(run_dir):
    return from_run(str(run_dir))


@pytest.fixture(scope="module")
def server(served):
    s = Served(served, slots=4, prefill_chunk=16)
    yield s
    s.close()


def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.stats()["slots_busy"] or engine.stats()["queued"]:
        assert time.monotonic() < deadline, f"slots still busy: {engine.stats()}"
        time.sleep(0.01)


def complete(url, **body) -> dict:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_client_streams_what_chipwise_sample_writes(server, served, run_dir, capsys):
    require("openai")
    import openai

    prompt = "def "
    assert main(["sample", "--run", str(run_dir), "--prompt", prompt, "--max-new-tokens", "40",
                 "--temperature", "0"]) == 0
    sampled = capsys.readouterr().out[:-1]  # print's newline
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [served.name]
    chunks = list(client.completions.create(model=served.name, prompt=prompt, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert prompt + text == sampled
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # streamed, not sent at the end
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(served.tokenizer.encode(prompt).ids) and 0 < usage.completion_tokens <= 40
    whole = client.completions.create(model=served.name, prompt=prompt, max_tokens=40, temperature=0)
    assert whole.choices[0].text == text and whole.usage.completion_tokens == usage.completion_tokens


def test_concurrent_requests_give_what_each_gives_alone(server, served):
    prompts = ["import os\n", "def f(x):\n    return", "class A", "# ", "for i in range(", "x = [", "if __name__",
               "while True:\n", "return", "s = '", "from . import", "@property\n    def", "try:\n    ", "lambda",
               "yield", "assert "]
    bodies = [dict(model=served.name, prompt=p, max_tokens=5 + 7 * (i % 5), ignore_eos=i % 3 == 0,
                   temperature=0.0 if i % 2 else 0.9, top_k=[0, 20][i % 2], top_p=[1.0, 0.9][i % 4 // 2], seed=i)
              for i, p in enumerate(prompts)]
    alone = [complete(server.url, **b)["choices"][0]["text"] for b in bodies]

    async def together():
        async with httpx.AsyncClient(timeout=120) as client:
            replies = await asyncio.gather(*(client.post(f"{server.url}/v1/completions", json=b) for b in bodies))
        return [r.json()["choices"][0]["text"] for r in replies]

    assert asyncio.run(together()) == alone
    assert len(set(alone)) > 8  # different prompts and settings gave different replies: the check has teeth
    wait_idle(server.engine)


def test_a_client_that_goes_away_frees_its_slot(server, served):
    before = server.engine.decode_steps
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json=dict(model=served.name, prompt="def ", max_tokens=400, ignore_eos=True,
                                stream=True)) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the first chunk arrived: hang up
    wait_idle(server.engine)
    assert server.engine.decode_steps - before < 300  # freed long before its 400 tokens
    text = server.metrics.render().decode()
    assert re.search(r'chipwise_requests_total\{finish_reason="abort",model_name="run"\} 1\.0', text), text


def test_bad_requests_get_openai_errors(server, served):
    url = f"{server.url}/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, json={"model": served.name})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    long_prompt = "x = 1\n" * 600
    r = httpx.post(url, json={"model": served.name, "prompt": long_prompt})
    assert r.status_code == 400 and "maximum context length is 512" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": served.name, "prompt": "a", "max_tokens": 600})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(url, json={"model": served.name, "prompt": "a", "n": 2})
    assert r.status_code == 400 and "n must be 1" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "gpt-4", "prompt": "a"})
    assert r.status_code == 404
    r = httpx.post(url, json={"model": served.name, "prompt": [5, 99999]})
    assert r.status_code == 400
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": served.name,
                                                              "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_full_queue_is_429_and_chat_uses_the_template(served):
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    # The engine starts paused: the first request waits in the queue of one, so the second finds it full.
    s = Served(dataclasses.replace(served, chat_template=template), start_engine=False, slots=1, max_queue=1,
               prefill_chunk=16)
    try:
        replies = []
        queued = threading.Thread(target=lambda: replies.append(complete(s.url, model=served.name, prompt="a",
                                                                         max_tokens=2)))
        queued.start()
        deadline = time.monotonic() + 30
        while s.engine.stats()["queued"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        r = httpx.post(f"{s.url}/v1/completions", json=dict(model=served.name, prompt="b", max_tokens=2))
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        s.engine.start()
        queued.join(60)
        assert replies and replies[0]["usage"]["completion_tokens"] >= 1  # the queued one was served after all
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def"}]
        r = httpx.post(f"{s.url}/v1/chat/completions", timeout=60,
                       json=dict(model=served.name, messages=messages, max_tokens=6, temperature=0))
        assert r.status_code == 200, r.text
        prompt = "<|system|>be brief\n<|user|>def\n<|assistant|>"
        assert r.json()["usage"]["prompt_tokens"] == len(served.tokenizer.encode(prompt).ids)
        assert r.json()["choices"][0]["message"]["content"] == complete(
            s.url, model=served.name, prompt=prompt, max_tokens=6, temperature=0)["choices"][0]["text"]
    finally:
        s.close()


def test_survives_200_requests_at_concurrency_32(server, served):
    async def load():
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            async def one(i):
                async with limit:
                    body = dict(model=served.name, prompt=f"n = {i}", max_tokens=2 + i % 9, stream=i % 2 == 0,
                                temperature=0.7, seed=i)
                    r = await client.post(f"{server.url}/v1/completions", json=body)
                    return r.status_code
            return await asyncio.gather(*(one(i) for i in range(200)))

    assert asyncio.run(load()) == [200] * 200
    wait_idle(server.engine)
    text = server.metrics.render().decode()
    assert re.search(r"chipwise_slots_in_use\{model_name=\"run\"\} 0\.0", text)
    served_tokens = float(re.search(r'chipwise_generation_tokens_total\{model_name="run"\} ([\d.e+]+)', text)[1])
    assert served_tokens >= 200 * 2
    usd = float(re.search(r'chipwise_usd_per_million_output_tokens\{model_name="run"\} ([\d.e+-]+)', text)[1])
    kwh = re.findall(r'chipwise_kwh_per_million_output_tokens\{bound="(low|high)",model_name="run"\} ([\d.e+-]+)', text)
    # 2 chips at $1.80 and 250 W each: the kWh per million tokens is the dollars' 0.5 kW / $3.60 share
    assert usd > 0 and [b for b, _ in kwh] == ["low", "high"] and float(kwh[0][1]) == pytest.approx(usd * 0.5 / 3.6,
                                                                                                  rel=0.05)


def test_sigterm_finishes_running_requests_then_exits(run_dir):
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, "-m", "chipwise", "serve", "--run", str(run_dir), "--port", str(port),
                             "--slots", "2", "--prefill-chunk", "16"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        body = dict(model="run", prompt="def ", max_tokens=300, ignore_eos=True, stream=True)
        finish, pieces = None, 0
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                pieces += 1
                if pieces == 1:
                    proc.send_signal(signal.SIGTERM)
                finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        assert finish == "length" and pieces > 100  # the running request was finished, not cut
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_serve_refuses_bad_command_lines_in_one_line(tmp_path, capsys):
    assert main(["serve", "--run", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err
    assert main(["serve", "--hf", str(tmp_path), "--slots", "0"]) == 2
    assert "--slots must be at least 1" in capsys.readouterr().err
    assert not list(Path(tmp_path).iterdir())  # a refused command creates nothing
