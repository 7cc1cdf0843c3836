"""Incremental detokenization with stop strings, for streaming text deltas.

Decoding only a short window of recent tokens keeps the cost per token constant; text that ends in
an incomplete UTF-8 character, or that could be the start of a stop string, is held back until the
next tokens settle it, so a streamed delta is never retracted.
"""

from __future__ import annotations


class IncrementalText:
    """Turns a growing list of token ids into text deltas and detects stop strings."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already emitted (context for the window)
        self._read = 0
        self.text = ""  # settled text (may include a pending stop-string candidate)
        self._emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the new text that is safe to show. Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self, final: bool = False) -> str:
        for s in self.stop:
            at = self.text.find(s, max(0, self._emitted - len(s) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        hold = 0 if (self.stopped or final) else self._stop_prefix_len()
        end = max(self._emitted, len(self.text) - hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    best = max(best, n)
                    break
        return best

    def finish(self) -> str:
        """Flush what was held back (the generation ended without completing a stop string)."""
        if self.stopped:
            return ""
        tail = self._decode(self.ids[self._prefix :])
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        if len(tail) > len(prefix_text):
            self.text += tail[len(prefix_text) :]
            self._prefix = self._read = len(self.ids)
        return self._release(final=True)
