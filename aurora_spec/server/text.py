"""Token ids -> text for responses: incremental detokenization and stop strings.

Detokenizing token by token is wrong for byte-level tokenizers: one character can span several
tokens, and decoding a prefix of its bytes yields U+FFFD. ``IncrementalDetokenizer`` decodes a
small window (prefix_offset..end) and only releases text once it no longer ends in U+FFFD, the
approach of Hugging Face TGI; the concatenated deltas equal ``decode(all ids)``.

Stop strings act on text, not tokens (a stop string can span token boundaries or end mid-token).
``StopMatcher`` holds back any tail that could still grow into a stop string, so a stream never
shows the start of a stop sequence it later cuts.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window (gives the tokenizer context)
        self.read_offset = 0  # ids before this have been released as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly "")."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """At the end: release what is left, even an incomplete character (as decode() would)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text):]


class StopMatcher:
    """Feed text deltas; get back what is safe to show, and whether a stop string was hit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # characters of self.text already released
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.text += delta
        # Held-back text starts at self.sent, so a match can only start there or later.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(self.text) - self._partial_tail())

    def finish(self) -> str:
        """The generation ended without a stop string: release the held-back tail."""
        return "" if self.stopped else self._release(len(self.text))

    def _partial_tail(self) -> int:
        """Length of the longest suffix of the unsent text that is a proper prefix of a stop."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    @property
    def output(self) -> str:
        return self.text[:self.sent]
