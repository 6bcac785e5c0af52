"""Context lookup (prompt lookup decoding): drafts copied from earlier in the context.

The longest suffix n-gram (``n <= max_ngram``) of prompt + output so far that occurred
earlier proposes the tokens that followed its most recent earlier occurrence. Answers
repeat their prompt (extraction, summaries, code edits) and themselves (lists, names),
where this drafts long runs right for free; where nothing repeats it proposes nothing.

The index is incremental: appending a token updates one dict entry per n, and a
proposal is one dict lookup per n, so its cost does not grow with the context.

Where no suffix of the context repeats, an optional :class:`runtime.datastore.Datastore` (the
model's own answers to other prompts) proposes instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.datastore import Datastore

DEFAULT_MAX_NGRAM = 3
CONTEXT_FIRST_FROM = 2  # a context match this long wins over the datastore's draft; shorter ones yield
ROWS = 8  # match rows per source in a calibration: the context's n-gram lengths 0..7, then the datastore's


def from_datastore(row: int) -> bool:
    """Whether a draft's calibration row (:meth:`NgramLookup.propose_row`) is the datastore's."""
    return row >= ROWS


def datastore_row(n: int, share: float) -> int:
    """The calibration row of a datastore draft whose first token matched ``n`` tokens and took
    ``share`` of its n-gram's occurrences: by n (<= 2, >= 3) and by the share's quarter."""
    return ROWS + 4 * (n >= 3) + min(int(share * 4), 3)


def row_label(row: int) -> str:
    """A calibration row in words (``medusa-run calibrate``'s summary)."""
    if not from_datastore(row):
        return f"context {row}-gram"
    q = (row - ROWS) % 4
    return f"datastore {'>= 3' if row - ROWS >= 4 else '<= 2'}-gram, share {q / 4:.2f}-{(q + 1) / 4:.2f}"


class DraftWidth:
    """How many tokens the lookup branch drafts per step: ``base`` to start with, two more after a
    step that accepted its whole draft, one fewer after one that did not, within ``[base, top]``
    (the "heuristic" schedule of Hugging Face's assisted generation). A run the context repeats
    word for word (a list, a quotation, a loop) grows the draft within a few steps; elsewhere it
    stays at ``base``, whose rows the engine pays on every step that drafts. ``top <= base``: fixed."""

    GROW = 2

    def __init__(self, base: int, top: int):
        self.base, self.top = base, max(base, top)
        self.width = base

    def update(self, drafted: list[int], accepted: list[int]) -> None:
        """After a step whose lookup branch drafted ``drafted`` and that accepted ``accepted``
        (the tokens after the root)."""
        if not drafted:
            return
        whole = accepted[: len(drafted)] == drafted
        self.width = min(self.top, self.width + self.GROW) if whole else max(self.base, self.width - 1)


class NgramLookup:
    """``extend(tokens)`` as the context grows; ``propose(k)``: up to k continuation tokens."""

    def __init__(self, tokens: Iterable[int] = (), max_ngram: int = DEFAULT_MAX_NGRAM,
                 datastore: Datastore | None = None):  # fmt: skip
        if max_ngram < 1:
            raise ValueError("max_ngram must be >= 1")
        self.max_ngram = max_ngram
        self.datastore = datastore
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
        """Up to ``k`` draft tokens: the tokens that followed the most recent earlier occurrence of
        the longest suffix n-gram of the context that occurred before; the datastore's draft (if
        there is one) where no suffix repeats or only the last token does; else []."""
        return self.propose_row(k)[0]

    def propose_row(self, k: int) -> tuple[list[int], int]:
        """:meth:`propose` and where its draft came from, as a calibration row: the context's
        matched n-gram length (1 .. ``ROWS - 1``); for the datastore's, ``ROWS + 4 * (n >= 3) +
        quarter``, n its first token's match length and quarter its share's (0 .. 3); 0: no draft.

        A context match on the last token alone yields to the datastore: measured by ``medusa-run
        calibrate`` on held-out Alpaca prompts, such a draft's first token was accepted 0.24-0.27 of
        the time (SmolLM2, Medusa-1 and Hydra artifacts), the datastore's 0.31-0.62 in every row."""
        chain, n = self.propose_match(k)
        if chain and n >= CONTEXT_FIRST_FROM:
            return chain, min(n, ROWS - 1)
        if self.datastore is not None and k >= 1 and self.tokens:
            stored, m, share = self.datastore.draft(self.tokens, k)
            if stored:
                return stored, datastore_row(m, share)
        return (chain, min(n, ROWS - 1)) if chain else ([], 0)

    def propose_match(self, k: int) -> tuple[list[int], int]:
        """The context's own draft (never the datastore's) and the length n of the n-gram that
        matched (0: none)."""
        end = len(self.tokens) - 1
        if k < 1 or end < 1:
            return [], 0
        for n in range(min(self.max_ngram, end), 0, -1):
            prev = self._before.get(tuple(self.tokens[end - n + 1 :]))
            if prev is not None:
                return self.tokens[prev + 1 : prev + 1 + k], n
        return [], 0
