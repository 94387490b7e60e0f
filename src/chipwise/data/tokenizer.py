"""The tokenizer: a byte-level BPE trained on the training documents, or a tokenizer.json the user gives.

Byte-level means every string round-trips exactly (decode(encode(x)) == x), whatever its script.
`<|endoftext|>` is the only special token; a trained tokenizer gives it id 0, and it ends every document.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from chipwise.data.corpus import Document
from chipwise.errors import DataError

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 byte symbols plus EOS
# Training time grows with the text (about 16 s for the 30 MB of Python 3.11's stdlib on 2 CPU cores),
# so past this many characters of training documents the tokenizer learns from the first documents in
# name-hash order: a deterministic sample spread over the whole corpus. The stdlib stays under the cap.
MAX_TRAIN_CHARS = 64 * 2**20


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def eos_id(tok: Tokenizer) -> int:
    idx = tok.token_to_id(EOS_TOKEN)
    if idx is None:
        raise DataError(f"the tokenizer has no {EOS_TOKEN} token; use a tokenizer.json that defines it")
    return idx


def train_tokenizer(docs: list[Document], vocab_size: int) -> Tokenizer:
    """Train on `docs` (data/prepare.py training_sample caps them at MAX_TRAIN_CHARS, to cap the time)."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"model.vocab_size is {vocab_size}; a byte-level BPE needs at least {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # listed first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator((training_text(d.text) for d in docs), trainer=trainer, length=len(docs))
    return tok


# BPE training rescans a word at every merge, so one very long run without whitespace (a minified file, a data
# blob: a 50 MB line took minutes, with nothing shown) costs merges x its length. For counting merges, runs are cut
# into pieces of at most this many characters; encoding is unaffected (a token never spans that many bytes).
MAX_TRAINING_WORD = 1000
_LONG_RUN = re.compile(r"\S{%d}" % MAX_TRAINING_WORD)


def training_text(text: str) -> str:
    """`text` with every whitespace-free run cut into lines of at most MAX_TRAINING_WORD characters."""
    if len(text) <= MAX_TRAINING_WORD or not _LONG_RUN.search(text):
        return text
    return _LONG_RUN.sub(lambda m: m.group(0) + "\n", text)


def load_tokenizer(path: str) -> Tokenizer:
    """A user's tokenizer.json; it must define the EOS token."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"tokenizer file {path} not found; fix data.tokenizer or leave it empty to train one")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"tokenizer file {path} is not a valid tokenizer.json ({reason}); "
                        f"fix data.tokenizer or leave it empty to train one") from None
    if tok.token_to_id(EOS_TOKEN) is None:
        raise DataError(f"tokenizer file {path} has no {EOS_TOKEN} token, which chipwise uses to end "
                        f"documents; add it as a special token or leave data.tokenizer empty")
    return tok
