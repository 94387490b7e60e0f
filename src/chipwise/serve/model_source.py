"""What a server serves: a model's graph and weights, its tokenizer, the tokens that end a reply, and its chat
template, read from a chipwise run directory (its newest intact checkpoint) or a Hugging Face Llama directory."""

from __future__ import annotations

import dataclasses
import json
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

    @property
    def config(self):
        """The ModelConfig the graph was built from."""
        from flax import nnx

        from chipwise.model import Transformer

        model = nnx.merge(self.graphdef, self.params)
        assert isinstance(model, Transformer)
        return model.cfg


def from_run(run_dir: str, name: str | None = None) -> ServedModel:
    import sys

    from chipwise.data.tokenizer import EOS_TOKEN
    from chipwise.run_dir import RunDir

    run = RunDir(run_dir).require_run()
    cfg = run.read_config()
    tokenizer = run.read_tokenizer()
    params, graphdef = run.latest_params(cfg, log=lambda message: print(message, file=sys.stderr))
    eos = tokenizer.token_to_id(EOS_TOKEN)
    return ServedModel(name or run.name, graphdef, params, tokenizer, (eos,), None, {"eos_token": EOS_TOKEN})


def from_hf(hf_dir: str, name: str | None = None, platform: str = "cpu") -> ServedModel:
    """A local Hugging Face Llama directory: config.json, safetensors, tokenizer.json, and where present
    generation_config.json (its eos_token_id wins over config.json's, as in transformers' generate) and the chat
    template (tokenizer_config.json's `chat_template`, or chat_template.jinja). A GGUF file is converted to such a
    directory first (hf/gguf_file.py), once."""
    from flax import nnx
    from tokenizers import Tokenizer

    from chipwise.hf.checkpoint import read_checkpoint, read_config
    from chipwise.sharding import platform_rules
    from chipwise.train.step import abstract_model

    from chipwise.hf.gguf_file import hf_dir_for, is_gguf

    if is_gguf(hf_dir):
        name, hf_dir = name or Path(hf_dir).stem, hf_dir_for(hf_dir)
    path = Path(hf_dir)
    if not (path / "tokenizer.json").is_file():
        raise ChipwiseError(f"{path} has no tokenizer.json; serving needs the model's own tokenizer")
    config = read_config(path)
    m, params = read_checkpoint(path, scan_layers=platform_rules(platform)["scan_layers"])
    graphdef, _ = nnx.split(abstract_model(m))
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok_cfg = _json(path / "tokenizer_config.json")
    eos = _token_ids(_json(path / "generation_config.json").get("eos_token_id", config.get("eos_token_id")))
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: transformers picks "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    special = {k: _token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token") if tok_cfg.get(k)}
    if not eos and special.get("eos_token") and tokenizer.token_to_id(special["eos_token"]) is not None:
        eos = (tokenizer.token_to_id(special["eos_token"]),)
    if not eos:
        raise ChipwiseError(f"{path} names no eos_token_id (generation_config.json or config.json) and no "
                            f"eos_token; serving must know which token ends a reply")
    return ServedModel(name or path.name, graphdef, params, tokenizer, eos, template, special)


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChipwiseError(f"{path} is not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def _token_text(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else str(value)


def load(run: str | None, hf: str | None, name: str | None = None, platform: str = "cpu") -> ServedModel:
    if (run is None) == (hf is None):
        raise ChipwiseError("serve one model: pass --run RUN_DIR or --hf DIR")
    return from_run(run, name) if run is not None else from_hf(hf, name, platform)


def with_params(served: ServedModel, params) -> ServedModel:
    return dataclasses.replace(served, params=params)
