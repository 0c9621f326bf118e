"""Stopping at a template's turn markers (``PromptTemplate.stops``): the answer is cut where a
marker begins, and text that may still become a marker is held back, so no path (the terminal,
the UI, the API's stream) ever shows part of one.

transformers' ``generate`` stops the model at the markers (``stop_strings``) and at marker tokens
(``eos_token_id``); these helpers do the text side, which it leaves to the caller."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import TextIteratorStreamer, TextStreamer


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class StopFilter:
    """Fed the decoded answer piece by piece, hands out only text that is final: before any stop
    string, and not a possible start of one (until the stream ends)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str, end: bool = False) -> str:
        if self.stopped:
            return ""
        self.text += piece
        kept, self.stopped = cut_at_stop(self.text, self.stops)
        upto = len(kept) if (self.stopped or end) else len(kept) - held_back(kept, self.stops)
        delta = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta


class StopTextStreamer(TextStreamer):
    """transformers' terminal streamer, holding back and cutting at the template's stop strings."""

    def __init__(self, tokenizer, stops: Sequence[str], **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.filter = StopFilter(stops)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        super().on_finalized_text(self.filter.feed(text, stream_end), stream_end)
        if stream_end:  # the next answer (a chat's next turn) starts afresh
            self.filter = StopFilter(self.filter.stops)


class StopIteratorStreamer(TextIteratorStreamer):
    """transformers' iterator streamer (for a page or a thread), with the same stop handling."""

    def __init__(self, tokenizer, stops: Sequence[str], **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.filter = StopFilter(stops)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        delta = self.filter.feed(text, stream_end)
        if delta or stream_end:
            super().on_finalized_text(delta, stream_end)
        if stream_end:
            self.filter = StopFilter(self.filter.stops)
