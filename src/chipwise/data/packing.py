"""Documents to one flat array of token ids, EOS after every document: what each token shard holds
(data/prepare.py writes the shards, data/store.py reads them)."""

from __future__ import annotations


import numpy as np
from tokenizers import Tokenizer

from chipwise.data.corpus import Document
from chipwise.data.tokenizer import eos_id

_CHUNK_CHARS = 8 * 2**20  # text per encode_batch call: parallel enough, without holding every Encoding at once


def token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32)


def _chunks(docs: list[Document]):
    chunk, size = [], 0
    for d in docs:
        chunk.append(d.text)
        size += len(d.text)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def pack_documents(docs: list[Document], tok: Tokenizer) -> np.ndarray:
    """All documents' token ids back to back, each followed by EOS."""
    eos, dtype = eos_id(tok), token_dtype(tok)
    # Document text that happens to contain "<|endoftext|>" must stay text, not become a document
    # boundary, so special tokens are not recognised while packing.
    saved = tok.encode_special_tokens
    tok.encode_special_tokens = True
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets we never use
    parts = []
    try:
        for chunk in _chunks(docs):
            for enc in encode(chunk, add_special_tokens=False):
                parts.append(np.asarray(enc.ids, dtype=dtype))
                parts.append(np.asarray([eos], dtype=dtype))
    finally:
        tok.encode_special_tokens = saved
    return np.concatenate(parts) if parts else np.zeros(0, dtype)
