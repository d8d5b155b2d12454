"""Incremental detokenization with stop sequences, for one row.

Each step decodes only a short window of tokens, not the whole output (the prefix/read
offsets of text-generation-inference's decoder): the window from `prefix` is decoded up to
`read` (text already handed on) and up to the end; what the second adds to the first is the
new text. Both decodes start at the same token, so tokenizers that treat a sequence's first
token specially (SentencePiece's leading space) cancel out. New text is held back while it
ends in an incomplete UTF-8 sequence (the decoder shows U+FFFD then).
"""

from __future__ import annotations

from collections.abc import Callable

from loramux.server.model.base_model import fast_decoder


class Detokenizer:
    """Decodes a row's generated tokens as they come, holding back text that may still change:
    an incomplete UTF-8 sequence, or an end that could be the start of a stop sequence."""

    def __init__(self, tokenizer, stop: tuple[str, ...], decode: Callable[[list[int]], str] | None = None):
        """`decode`: `fast_decoder(tokenizer)`, made once per tokenizer (None: made here)."""
        self._decode = decode or fast_decoder(tokenizer)
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self._ids: list[int] = []
        self._prefix = 0  # first token of the decode window
        self._read = 0  # tokens whose text is in self.text
        self._sent = 0  # characters of the text already handed out
        self.text = ""  # the text so far, cut before a stop sequence once one is found
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; returns the newly safe text (possibly empty)."""
        self._ids.append(token_id)
        new = self._new_text(final=False)
        if new:
            self._append(new)
        if self.stopped:
            return self._take(len(self.text))
        return self._take(self._safe_length())

    def flush(self) -> str:
        """All text not yet handed out (at the end of generation), incomplete characters included."""
        if not self.stopped:
            new = self._new_text(final=True)
            if new:
                self._append(new)
        return self._take(len(self.text))

    def _new_text(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self._decode
        before = decode(self._ids[self._prefix:self._read])
        after = decode(self._ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def _append(self, new: str) -> None:
        # A stop sequence not in the old text must end in the new part.
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += new
        if self._stop:
            cuts = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if cuts:
                self.text = self.text[: min(cuts)]
                self.stopped = True

    def _safe_length(self) -> int:
        """Up to where the text cannot change: not into an end that may begin a stop sequence."""
        safe = len(self.text)
        for s in self._stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return safe

    def _take(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        piece = self.text[self._sent:upto]
        self._sent = upto
        return piece
