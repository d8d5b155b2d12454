"""Incremental detokenization with stop sequences, for one row."""

from __future__ import annotations


class Detokenizer:
    """Decodes a row's generated tokens as they come, holding back text that may still change.

    Text is held back while it ends in an incomplete UTF-8 sequence (the decoder shows U+FFFD
    then) or while its end could be the start of a stop sequence.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._sent = 0  # characters of the text already handed out
        self.text = ""  # the text so far, cut before a stop sequence once one is found
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; returns the newly safe text (possibly empty)."""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if self._stop:
            cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = text[:cut]
                self.stopped = True
                return self._take(len(self.text))
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for s in self._stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe = min(safe, len(text[:safe]) - k)
                    break
        return self._take(safe)

    def flush(self) -> str:
        """All text not yet handed out (at the end of generation)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        piece = self.text[self._sent:upto]
        self._sent = upto
        return piece
