"""What a server serves: a model's graph and weights, its tokenizer, the tokens that end a reply, and its chat
template, read from a chipwise run directory (its newest intact checkpoint) or a Hugging Face Llama directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chipwise.errors import ChipwiseError


@dataclass
class ServedModel:
    name: str  # what /v1/models lists and requests name
    graphdef: Any  # nnx graph definition of the Transformer (it carries the ModelConfig)
    params: Any  # the model's parameter state (fp32, host or first device)
    tokenizer: Any  # tokenizers.Tokenizer
    eos_ids: tuple[int, ...]  # a generated token among these ends the reply (finish_reason "stop")
    chat_template: str | None  # Jinja source, as transformers applies it; None: no /v1/chat/completions
    special_tokens: dict[str, str]  # bos_token / eos_token strings the template may refer to


def from_run(run_dir: str, name: str | None = None) -> ServedModel:
    """A chipwise run: its newest intact checkpoint, its tokenizer, and the special tokens and chat template of the
    checkpoint it started from, if it started from one (else <|endoftext|> ends a reply, as in training)."""
    import sys

    from chipwise.data.tokenizer import EOS_TOKEN
    from chipwise.run_dir import RunDir

    run = RunDir(run_dir).require_run()
    cfg = run.read_config()
    tokenizer = run.read_tokenizer()
    params, graphdef = run.latest_params(cfg, log=lambda message: print(message, file=sys.stderr))
    meta = run.read_tokenizer_meta() or {"special_tokens": {"eos_token": EOS_TOKEN}}
    return _served(name or run.name, graphdef, params, tokenizer, meta, run_dir)


def from_hf(hf_dir: str, name: str | None = None, platform: str = "cpu") -> ServedModel:
    """A local Hugging Face Llama directory: config.json, safetensors, tokenizer.json, and its special tokens,
    generation ids and chat template (hf.read_tokenizer_meta). A GGUF file is converted to such a directory first
    (hf/gguf_file.py), once."""
    import jax
    from flax import nnx
    from tokenizers import Tokenizer

    from chipwise.hf.checkpoint import read_to_device, read_tokenizer_meta
    from chipwise.hf.gguf_file import hf_dir_for, is_gguf
    from chipwise.sharding import platform_rules
    from chipwise.train.step import abstract_model

    if is_gguf(hf_dir):
        name, hf_dir = name or Path(hf_dir).stem, hf_dir_for(hf_dir)
    path = Path(hf_dir)
    if not (path / "tokenizer.json").is_file():
        raise ChipwiseError(f"{path} has no tokenizer.json; serving needs the model's own tokenizer")
    # one tensor at a time onto the device the engine runs on (an accelerator's: the host holds about one tensor)
    m, params = read_to_device(path, jax.devices()[0], scan_layers=platform_rules(platform)["scan_layers"])
    graphdef, _ = nnx.split(abstract_model(m))
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return _served(name or path.name, graphdef, params, tokenizer, read_tokenizer_meta(path), path)


def _served(name, graphdef, params, tokenizer, meta: dict, where) -> ServedModel:
    """The reply-ending tokens: the generation config's eos_token_id (one or several, as transformers' generate
    reads it), else the eos_token string's id."""
    special = meta.get("special_tokens", {})
    eos = meta.get("generation", {}).get("eos_token_id")
    eos = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos])) if eos is not None else ()
    if not eos and special.get("eos_token") and tokenizer.token_to_id(special["eos_token"]) is not None:
        eos = (tokenizer.token_to_id(special["eos_token"]),)
    if not eos:
        raise ChipwiseError(f"{where} names no eos_token_id (generation_config.json or config.json) and no "
                            f"eos_token; serving must know which token ends a reply")
    return ServedModel(name, graphdef, params, tokenizer, eos, meta.get("chat_template"), special)


def load(run: str | None, hf: str | None, name: str | None = None, platform: str = "cpu") -> ServedModel:
    if (run is None) == (hf is None):
        raise ChipwiseError("serve one model: pass --run RUN_DIR or --hf DIR")
    return from_run(run, name) if run is not None else from_hf(hf, name, platform)
