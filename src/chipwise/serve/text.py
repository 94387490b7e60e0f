"""A reply's text as its tokens arrive: decoded incrementally, cut before the first stop string, and holding back
any tail that could still become one, so a streamed reply never shows text that a stop string later takes back.

New text is the decoding of a window of recent tokens minus the decoding of the window's older part: decoders
that treat a text's first token specially (SentencePiece's leading space) then give the same characters as
decoding the whole reply, and a character whose bytes span tokens (decoded as U+FFFD until complete) waits for its
last token. The reply's final text equals `tokenizer.decode` of all its tokens.
"""

from __future__ import annotations

INCOMPLETE = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window: ids[prefix:read] is decoded already, ids[read:] is not
        self.text = ""
        self.sent = 0  # characters of `text` already handed out

    def _decode(self, final: bool = False) -> None:
        old = self.tokenizer.decode(self.ids[self.prefix: self.read])
        new = self.tokenizer.decode(self.ids[self.prefix:])
        if len(new) > len(old) and (final or not new.endswith(INCOMPLETE)):
            self.text += new[len(old):]
            self.prefix, self.read = self.read, len(self.ids)

    def add(self, token_id: int) -> tuple[str, bool]:
        """(the text that may be sent now, whether a stop string ended the reply)."""
        self.ids.append(token_id)
        self._decode()
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            out, self.sent, self.text = self.text[self.sent: end], end, self.text[:end]
            return out, True
        end = len(self.text) - self._held_back()
        out, self.sent = self.text[self.sent: end], max(self.sent, end)
        return out, False

    def flush(self) -> str:
        """What is left once the reply ends for another reason (a held-back tail that never became a stop)."""
        self._decode(final=True)
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def _held_back(self) -> int:
        """The longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
