"""The text of one streamed request: incremental detokenization and stop strings.

Each new token re-decodes the output (a token may complete a multi-byte character, and a
tokenizer may merge spaces across tokens), and only text that can no longer change is released:
nothing ending in an incomplete character (U+FFFD), nor the last ``len(longest stop) - 1``
characters, which could still become the start of a stop string. A stop string ends the text
before it (OpenAI semantics: the stop string is not returned)."""

from __future__ import annotations

from ds4c.runtime.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters of the text released so far
        self.stopped = False  # a stop string was found: the request ends here

    def add(self, ids: list[int], final: bool) -> str:
        """Text released by the tokens ``ids`` (appended to the output); ``final``: no more come."""
        if self.stopped or not self.tokenizer.has_text:
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at >= 0:
                text, final, self.stopped = text[:at], True, True
        end = len(text)
        if not final:
            end -= self.hold
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        out = text[self.sent:max(end, self.sent)]
        self.sent += len(out)
        return out
