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

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from runtime.datastore import Datastore

DEFAULT_MAX_NGRAM = 3
# drafted tokens a step at most (lookup, lookup_max, dynamic:N): far above what a step verifies on any
# engine, and the per-size cost tables these size stay small
MAX_DRAFT = 1024
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


# What a call assumes before it has seen its own drafts (it counts them as PRIOR_WEIGHT observations),
# measured with SmolLM2-135M-Instruct's default artifact on 24 held-out Alpaca prompts (``python -m
# scripts.heldout_prompts --last 76 --drop-last 24``, the first 24; never MT-Bench) by ``python -m
# scripts.lookup_rates`` (192 new tokens; a cell with under 10 observations keeps its earlier value). Sources: the
# context's 1-, 2-, >= 3-gram matches, the datastore's <= 2- and >= 3-gram ones (source_class).
# P(a draft's first token is accepted), per source, where the tree holds that token nowhere / as a
# head's lower-ranked candidate / as its top candidate: the heads' agreement is the strongest sign.
FIRST_RATES = np.array([
    [0.15, 0.62, 0.63],
    [0.30, 0.50, 0.85],
    [0.60, 0.84, 0.90],
    [0.28, 0.50, 0.66],
    [0.29, 0.55, 0.87],
])  # fmt: skip
# P(token j is accepted | the tokens before it were), per source, after a step whose draft was not /
# was accepted whole (a run the context repeats word for word goes on), j = 2, 3, 4 (and beyond)
NEXT_RATES = np.array([
    [[0.41, 0.56, 0.75], [0.47, 0.59, 0.70]],
    [[0.61, 0.67, 0.69], [0.63, 0.64, 0.70]],
    [[0.78, 0.81, 0.87], [0.87, 0.88, 0.94]],
    [[0.46, 0.62, 0.60], [0.46, 0.60, 0.60]],
    [[0.68, 0.68, 0.79], [0.82, 0.91, 0.85]],
])  # fmt: skip
PRIOR_WEIGHT = 8.0  # (2, 4, 8 compared on the same 24 prompts: 8 the best by a little)
RATE_POSITIONS = 16  # positions counted apart (later ones share the last cell)
# tokens per unit of cost assumed at a call's start, and its weight in steps (the running rate of
# DraftSizer and of the dynamic trees, runtime.dynamic.DynamicState)
LAM_PRIOR = (1.5, 8.0)


def source_class(row: int) -> int:
    """A draft's :meth:`NgramLookup.propose_row` row as a source of :data:`FIRST_RATES`."""
    if from_datastore(row):
        return 3 + (row - ROWS >= 4)
    return min(max(row, 1), 3) - 1


class DraftSizer:
    """How many of the lookup's draft tokens a fixed-tree step verifies: as many as pay for their
    rows. Token j of a draft is worth the probability that it and every token before it are
    accepted (the product of per-position rates), a step of N tokens costs ``cost[N]`` one-token
    steps (the latency profile: on a CPU the cost rises in steps, e.g. 6 rows per matrix-kernel
    block), and the step takes the k that maximises ``value(k) - lam * cost(tokens with k)``, ``lam``
    the call's tokens per unit of cost so far (Dinkelbach's rule for tokens / cost, as
    :mod:`runtime.dynamic` sizes whole trees). So a draft grows for free to the end of a cost step,
    and a doubtful tail that would start a new one is cut.

    The rates start from :data:`FIRST_RATES` / :data:`NEXT_RATES` and follow the call: every
    proposed token is scored against the tokens the step emitted (so positions past the verified cut
    are scored too, up to the bonus token). The choice depends only on the call's own tokens, never
    on timings: a seed reproduces a run."""

    def __init__(self, top: int, cost: np.ndarray, heads: float = 0.0):
        self.top = top
        self.cost = np.asarray(cost, dtype=np.float64)  # cost[N]: verifying N tokens, in one-token steps
        self.heads = heads
        self.first = np.zeros((2, *FIRST_RATES.shape))  # hits, trials: [source, agreement]
        self.next = np.zeros((2, len(NEXT_RATES), 2, RATE_POSITIONS))  # hits, trials: [source, streak, j - 2]
        self.streak = 0
        self.tokens, self.spent = LAM_PRIOR[0] * LAM_PRIOR[1], LAM_PRIOR[1]
        self._pending: tuple[list[int], int, int, int] | None = None

    def rates(self, row: int, agree: int, n: int) -> np.ndarray:
        """The rates of positions 1 .. n of a draft from ``row`` whose first token the tree holds
        nowhere (``agree`` 0), as a lower-ranked (1) or a top (2) candidate."""
        c, w = source_class(row), PRIOR_WEIGHT
        (fh, ft), p = self.first[:, c, agree], FIRST_RATES[c, agree]
        j = np.minimum(np.arange(n - 1), RATE_POSITIONS - 1)
        (nh, nt), q = (
            self.next[:, c, self.streak, j],
            NEXT_RATES[c, self.streak, np.minimum(j, NEXT_RATES.shape[2] - 1)],
        )
        return np.concatenate([[(fh + w * p) / (ft + w)], (nh + w * q) / (nt + w)])

    def choose(self, draft: Sequence[int], row: int, sizes: np.ndarray, shared: int, agree: int = 0) -> int:
        """How many leading tokens of ``draft`` (from ``row``) to verify: ``sizes[k]`` is the tokens
        the step verifies with k of them (k = 0 .. len(draft); negative: k not allowed); the tree
        already holds the first ``shared`` (they add no value of their own), the first as ``agree``
        (:meth:`rates`). At most what the cost table covers."""
        self._pending = (list(draft), row, self.streak, agree)
        sizes = np.asarray(sizes, dtype=np.int64)
        over = np.flatnonzero(sizes >= len(self.cost))  # past the table: not considered
        n = min(len(draft), len(sizes) - 1, (int(over[0]) if len(over) else len(sizes)) - 1)
        if n <= 0:
            return 0
        value = np.cumprod(self.rates(row, agree, n))
        value[:shared] = 0.0  # those nodes are the tree's anyway
        sizes = sizes[: n + 1]
        gain = np.concatenate([[0.0], np.cumsum(value)]) - self.tokens / self.spent * self.cost[np.maximum(sizes, 0)]
        gain[sizes < 0] = -np.inf
        return int(np.argmax(gain))

    def observe(self, verified: int, emitted: Sequence[int], nodes: int) -> None:
        """After the step: ``verified`` leading draft tokens went in a call of ``nodes`` tokens, which
        emitted ``emitted`` (the accepted tokens and the next root)."""
        self.tokens += len(emitted)
        self.spent += float(self.cost[min(nodes, len(self.cost) - 1)]) + self.heads
        if self._pending is None:
            return
        draft, row, streak, agree = self._pending
        self._pending = None
        c = source_class(row)
        for j, t in enumerate(draft[: len(emitted)]):
            counts = self.first[:, c, agree] if j == 0 else self.next[:, c, streak, min(j - 1, RATE_POSITIONS - 1)]
            ok = t == emitted[j]
            counts += (ok, 1)  # a view: hits, trials
            if not ok:
                break
        if verified:
            self.streak = int(list(emitted[:verified]) == draft[:verified])


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
