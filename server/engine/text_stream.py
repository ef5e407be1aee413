"""Token ids to text pieces, as they come: incremental detokenization and stop strings."""
from __future__ import annotations

import functools
from typing import Callable


@functools.cache
def token_texts(tokenizer) -> Callable[[int], str]:
    """token id -> the token decoded alone (special tokens as they are written), memoized per tokenizer."""
    return functools.lru_cache(maxsize=65_536)(lambda token: tokenizer.decode([token], skip_special_tokens=False))


class TextStream:
    """Feeds on one token at a time and returns only text that is final.

    Text is held back while the last tokens decode to an incomplete UTF-8 character ('\ufffd'),
    and while the tail could still grow into a stop string, so a streamed piece is never taken
    back. Offsets follow the prefix/read scheme of TGI and vLLM: decoding a few tokens of context
    keeps tokenizers' leading-space rules right without decoding the whole output each step."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._prefix = self._read = 0
        self._text = ""          # decoded so far
        self._emitted = 0        # characters of _text already returned

    def token_text(self, token_id: int) -> str:
        return token_texts(self._tokenizer)(token_id)

    def push(self, token_id: int) -> tuple[str, bool]:
        """(new final text, whether a stop string has now matched and ended the output)."""
        self._ids.append(token_id)
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self._ids[self._prefix:self._read])
        after = decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._free()

    def decode(self, token_ids: list[int]) -> str:
        """Token ids as one text, the way this stream's output reads (shadow pairs compare answers so)."""
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def flush(self) -> str:
        """Whatever is held back, at the end of the output (no stop string can match any more)."""
        piece = self._text[self._emitted:]
        self._emitted = len(self._text)
        return piece

    def _free(self) -> tuple[str, bool]:
        search_from = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            end = min(hits)
            piece = self._text[self._emitted:end]
            self._emitted = len(self._text)
            return piece, True
        safe = len(self._text) - self._partial_stop_length()
        piece = self._text[self._emitted:safe]
        self._emitted = max(self._emitted, safe)
        return piece, False

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
