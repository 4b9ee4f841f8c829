"""Streaming an answer's text as its tokens arrive, at a cost per token that does not grow with the answer.

    text = IncrementalDetokenizer(tokenizer)
    for token in tokens:
        piece = text.add(token)     # "" while the token ends inside a character
    rest = text.finish()            # what never completed a character, as the decoder shows it

Decoding the whole answer at every token to find the new text costs O(n) per token, O(n^2) per answer (a
2,048-token answer decodes about two million tokens). Here each step decodes a window: the tokens of the last
piece given out (the prefix, so that a tokenizer which spells a token differently at the start of a text, e.g.
SentencePiece's leading space, spells it as inside the answer) plus the tokens not given out yet. The new text
is the window's text past the prefix's text (and once per piece the next prefix is decoded: a few tokens).

A byte-level BPE token may hold part of a UTF-8 character (a Chinese character or an emoji is 3-4 bytes, often
one byte per token): the decoder shows an incomplete trailing sequence as U+FFFD. Text is given out only when
the window does not end in U+FFFD, i.e. at a character boundary; there the UTF-8 decoder's state is empty, so
the pieces joined are exactly the decode of all tokens (tests/test_detokenize.py checks it on random token
sequences, invalid byte runs included). The window stays a few tokens long: it grows only while each new token
ends inside a character (an unfinished UTF-8 character is at most 3 bytes, so 3 byte tokens for plain text).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """One answer's tokens -> its text pieces. `decoded_tokens` counts the tokens decoded so far (the cost)."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True, skip_ids=()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.skip_ids = frozenset(skip_ids)  # e.g. end-of-turn ids that are not marked special
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: the first token of the last piece given out
        self._read = 0  # tokens before this are given out
        self._prefix_text = ""  # decode(ids[_prefix:_read])
        self._pieces: list[str] = []
        self.decoded_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token: int) -> str:
        """The text this token completes ("" when it ends inside a character or is skipped)."""
        if token in self.skip_ids:
            return ""
        self.ids.append(token)
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT):
            return ""
        piece = text[len(self._prefix_text):]
        self._advance()
        self._pieces.append(piece)
        return piece

    def _advance(self) -> None:
        """The window now starts at the piece just given out. Its text is decoded on its own, not taken from the
        piece: a SentencePiece decoder drops the leading space of a text's first token, so `decode(window)`
        starts with this, and not always with the piece."""
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix:self._read])

    def finish(self) -> str:
        """The text of tokens that never completed a character (bytes the decoder shows as U+FFFD), once."""
        if self._read == len(self.ids):
            return ""
        text = self._decode(self.ids[self._prefix:])
        piece = text[len(self._prefix_text):]
        self._advance()
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """The pieces given out so far, joined."""
        return "".join(self._pieces)
