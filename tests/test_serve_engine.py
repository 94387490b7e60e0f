"""The serving engine without HTTP, on a random tiny model: what it generates equals the plain KV-cache generation of
`chipwise sample` in both layer layouts, whatever the prefill chunk and however many devices split the heads; and a
reply's text is cut exactly at a stop string, never showing a piece of it."""

import sysconfig
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from chipwise import prng
from chipwise.config import ModelConfig
from chipwise.data.corpus import Document
from chipwise.data.tokenizer import train_tokenizer
from chipwise.model import Transformer
from chipwise.sample import generate
from chipwise.serve.engine import Engine, Request, SamplingParams
from chipwise.serve.model_source import ServedModel
from chipwise.serve.text import TextStream
from chipwise.serve_commands import _tensor_parallel

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return train_tokenizer([Document(n, (stdlib / n).read_text()) for n in ("textwrap.py", "shlex.py")], VOCAB)


def served_model(tokenizer, scan: bool) -> ServedModel:
    cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, vocab_size=VOCAB,
                      max_seq_len=300, scan_layers=scan)
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(params=prng.key(1))))
    return ServedModel("tiny", graphdef, nnx.to_pure_dict(state), tokenizer, (0,), None, {})


def run_all(engine: Engine, prompts: list[list[int]], lengths: list[int], **sampling) -> list[list[int]]:
    """Submit every prompt at once and wait for all replies (token ids)."""
    done = [threading.Event() for _ in prompts]
    requests = [Request(p, SamplingParams(max_tokens=n, ignore_eos=True, **sampling),
                        lambda e, d=d: e.finish_reason and d.set()) for p, n, d in zip(prompts, lengths, done)]
    for r in requests:
        engine.submit(r)
    assert all(d.wait(120) for d in done)
    assert all(r.finish_reason == "length" for r in requests)
    return [r.output_ids for r in requests]


@pytest.mark.parametrize("scan", [False, True])
def test_engine_generates_what_sample_generates_in_any_chunking_and_tensor_split(tokenizer, scan):
    served = served_model(tokenizer, scan)
    texts = ["def wrap(text, width=70, **kwargs):\n    w = TextWrapper(", "import re", "class Shlex:\n" * 4]
    prompts = [tokenizer.encode(t).ids for t in texts]
    # the first reply outgrows the smallest cache window the steps read (128 positions): the window must follow it
    lengths = [120, 12, 12]
    expected = [[int(t) for t in generate(served.graphdef, served.params, jnp.asarray([p], jnp.int32), prng.key(0),
                                          max_new_tokens=n, temperature=0.0, top_k=0, top_p=1.0)]
                for p, n in zip(prompts, lengths)]
    assert max(map(len, prompts)) > 16  # the longest prompt takes several chunks of 8
    # unrolled: chunks of 8 and one chunk for all; stacked: chunks of 8 with the heads split over two devices
    layouts = [dict(prefill_chunk=8)] + ([dict(prefill_chunk=64)] if not scan else [])
    if scan and len(jax.devices()) >= 2:
        mesh, shardings = _tensor_parallel(served, jax.devices()[:2])
        layouts = [dict(prefill_chunk=8, mesh=mesh, shardings=shardings)]
    for layout in layouts:
        engine = Engine(served, slots=2, **layout).start()  # fewer slots than prompts: one waits in the queue
        try:
            assert run_all(engine, prompts, lengths, temperature=0.0) == expected, layout.get("mesh")
        finally:
            engine.shutdown()
    assert not scan or "mesh" in layouts[0] or len(jax.devices()) == 1


def test_sampled_replies_depend_on_the_seed_not_on_the_slot(tokenizer):
    engine = Engine(served_model(tokenizer, False), slots=4, prefill_chunk=16).start()
    try:
        prompt = tokenizer.encode("def f(").ids
        alone = run_all(engine, [prompt], [24], temperature=1.0, seed=7)[0]
        crowd = run_all(engine, [tokenizer.encode("x = ").ids, prompt, prompt], [30, 24, 24], temperature=1.0,
                        seed=7)
        other = run_all(engine, [prompt], [24], temperature=1.0, seed=8)[0]
    finally:
        engine.shutdown()
    assert crowd[1] == crowd[2] == alone and other != alone


def test_text_stops_before_a_stop_string_and_never_shows_part_of_one(tokenizer):
    ids = tokenizer.encode("    return text\n\ndef dedent(text):\n").ids
    stream = TextStream(tokenizer, stop=("\n\ndef", "never"))
    shown, stopped = "", False
    for i in ids:
        piece, stopped = stream.add(i)
        shown += piece
        assert "\n" not in shown  # a newline could begin the stop string: it waits until that is decided
        if stopped:
            break
    assert stopped and shown == "    return text"
    plain = TextStream(tokenizer, stop=("zzz",))
    text = "".join(plain.add(i)[0] for i in ids) + plain.flush()
    assert text == tokenizer.decode(ids)  # without a stop, the stream is the whole decode
