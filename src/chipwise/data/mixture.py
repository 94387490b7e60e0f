"""data.mixture: several named parts, each prepared as its own token store, one tokenizer for all.

The tokenizer is data.tokenizer, or a byte-level BPE trained once on a sample of every part's training documents
(their union, streamed: prepare.training_sample) and cached beside the stores. Each part's store is then prepared
with that tokenizer as a given one, so a part shared by two mixtures is prepared once. Training draws sequences from
the parts in the weights' proportions (data/loader.py: MixedWindows); validation is every part's validation split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time

from tokenizers import Tokenizer

from chipwise.config import DataConfig
from chipwise.data import prepare, store
from chipwise.data.cache import atomic_path, default_cache_dir
from chipwise.data.corpus import DocumentStream, hash_unit, list_units
from chipwise.data.pipeline import PreparedData, prepare_store, train_tokenizer_in_best_process
from chipwise.data.tokenizer import tokenizer_fingerprint


def part_config(data_cfg: DataConfig, part) -> DataConfig:
    """The data config of one part: its sources and record settings, the mixture's other settings."""
    return dataclasses.replace(data_cfg, mixture=[], sources=list(part.sources),
                               text_field=part.text_field or data_cfg.text_field,
                               include=list(part.include), exclude=list(part.exclude))


def _shared_tokenizer(data_cfg: DataConfig, parts: list[DataConfig], vocab_size: int, log) -> str:
    """The path of the tokenizer every part uses: data.tokenizer, or one trained on all parts' training text."""
    if data_cfg.tokenizer:
        return data_cfg.tokenizer
    listed = [list_units(cfg)[0] for cfg in parts]
    key = hashlib.sha256(json.dumps({"vocab": vocab_size, "parts": [
        store.store_key(units, {"text_field": cfg.text_field, "max_documents": cfg.max_documents,
                                "val_fraction": cfg.val_fraction, "include": cfg.include, "exclude": cfg.exclude},
                        {"train_vocab": vocab_size}) for cfg, units in zip(parts, listed)]}).encode()).hexdigest()[:32]
    path = default_cache_dir(data_cfg) / "tokenizers" / f"mixture-{key}.json"
    if path.is_file():
        log(f"tokenizer: the mixture's byte-level BPE {path} (cached)")
        return str(path)
    def train_docs(cfg, units):
        return (d for d in DocumentStream(cfg, units) if hash_unit(d.name) >= cfg.val_fraction)

    log(f"tokenizer: reading the training documents of {len(parts)} mixture parts for a sample...")
    sample = prepare.training_sample(itertools.chain.from_iterable(train_docs(c, u) for c, u in zip(parts, listed)))
    log(f"tokenizer: training a byte-level BPE with {vocab_size:,} tokens on {len(sample):,} documents...")
    start = time.perf_counter()
    tok = train_tokenizer_in_best_process(sample, vocab_size)
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    log(f"tokenizer: trained in {time.perf_counter() - start:.1f} s")
    return str(path)


def prepare_mixture(data_cfg: DataConfig, vocab_size: int, log=print) -> PreparedData:
    parts = [part_config(data_cfg, p) for p in data_cfg.mixture]
    tokenizer = _shared_tokenizer(data_cfg, parts, vocab_size, log)
    stores = []
    for spec, cfg in zip(data_cfg.mixture, parts):
        log(f"data: mixture part {spec.name!r} (weight {spec.weight:g})")
        stores.append(prepare_store(dataclasses.replace(cfg, tokenizer=tokenizer), vocab_size, log))
    splits = {s: [st.split(s) for st in stores] for s in store.SPLITS}

    def joined(arrays):
        return store.ShardedTokens([a for arr in arrays for a in (arr.shards if isinstance(arr, store.ShardedTokens)
                                                                  else [arr])])

    total = sum(p.weight for p in data_cfg.mixture)
    described = ", ".join(f"{p.name} {p.weight / total:.0%} ({len(t) / 1e6:.1f}M tokens)"
                          for p, t in zip(data_cfg.mixture, splits["train"]))
    fingerprint = hashlib.sha256(json.dumps([[p.name, p.weight, st.manifest["corpus_fingerprint"]]
                                             for p, st in zip(data_cfg.mixture, stores)]).encode()).hexdigest()
    tok = Tokenizer.from_file(str(stores[0].path / "tokenizer.json"))
    return PreparedData(
        train_tokens=joined(splits["train"]), val_tokens=joined(splits["val"]), tokenizer=tok,
        eos_id=stores[0].manifest["eos_id"], corpus_fingerprint=fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        num_documents=tuple(sum(st.manifest["split_documents"][s] for st in stores) for s in store.SPLITS),
        description=f"mixture of {len(stores)} parts: {described}",
        mixture=[(p.name, p.weight, t) for p, t in zip(data_cfg.mixture, splits["train"])])
