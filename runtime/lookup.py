"""Context lookup (prompt lookup decoding): drafts copied from earlier in the context.

The longest suffix n-gram (``n <= max_ngram``) of prompt + output so far that occurred
earlier proposes the tokens that followed its most recent earlier occurrence. Answers
repeat their prompt (extraction, summaries, code edits) and themselves (lists, names),
where this drafts long runs right for free; where nothing repeats it proposes nothing.

The index is incremental: appending a token updates one dict entry per n, and a
proposal is one dict lookup per n, so its cost does not grow with the context.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_MAX_NGRAM = 3


class NgramLookup:
    """``extend(tokens)`` as the context grows; ``propose(k)``: up to k continuation tokens."""

    def __init__(self, tokens: Iterable[int] = (), max_ngram: int = DEFAULT_MAX_NGRAM):
        if max_ngram < 1:
            raise ValueError("max_ngram must be >= 1")
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        # n-gram -> end index of its latest occurrence, and of the one before it: the
        # current suffix is always the latest occurrence of itself, so a proposal reads
        # the one before
        self._last: dict[tuple[int, ...], int] = {}
        self._before: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.tokens.append(int(t))
            end = len(self.tokens) - 1
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                key = tuple(self.tokens[end - n + 1 : end + 1])
                prev = self._last.get(key)
                if prev is not None:
                    self._before[key] = prev
                self._last[key] = end

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens following the most recent earlier occurrence of the longest
        suffix n-gram that occurred before; [] when no suffix repeats."""
        return self.propose_match(k)[0]

    def propose_match(self, k: int) -> tuple[list[int], int]:
        """:meth:`propose` and the length n of the n-gram that matched (0: none)."""
        end = len(self.tokens) - 1
        if k < 1 or end < 1:
            return [], 0
        for n in range(min(self.max_ngram, end), 0, -1):
            prev = self._before.get(tuple(self.tokens[end - n + 1 :]))
            if prev is not None:
                return self.tokens[prev + 1 : prev + 1 + k], n
        return [], 0
