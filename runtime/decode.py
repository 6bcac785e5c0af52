"""The decode loop: prefill -> (candidates -> verify -> accept -> update KV)*.

Reads top to bottom like the paper. One loop serves Medusa (greedy, exact tree sampling or
typical acceptance) and plain autoregressive decoding, over any
:class:`runtime.backend.Backend`. numpy only.

Conventions: the *root* of each tree is the backbone's own next token. It is final as soon
as it is chosen (the backbone chose it), so it is emitted at once; a verification step then
emits the accepted candidates below it plus the next root.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from runtime import checks, dynamic
from runtime.backend import Backend, perturbed
from runtime.datastore import Datastore
from runtime.errors import Cancelled, ConfigError, ContextLengthError, MedusaError
from runtime.lookup import DEFAULT_MAX_NGRAM, MAX_DRAFT, DraftSizer, DraftWidth, NgramLookup, from_datastore
from runtime.tree import PAD, Tree, follow_drafts, graft_chain

DEFAULT_EPSILON = 0.09  # typical acceptance: hard threshold
DEFAULT_DELTA = 0.3  # typical acceptance: entropy-scaled threshold
GREEDY_BELOW = 1e-5  # temperatures below this decode greedily
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill call (the TensorRT plan's default prefill profile max)
DEFAULT_BATCH_PREFILL_CHUNK = 128  # with max_batch (serve): the other sequences wait for one chunk at a time
DEFAULT_LOOKUP = 3  # context-lookup draft tokens per Medusa step (0: off)
DEFAULT_LOOKUP_MAX = 12  # ... growing to this many while its drafts are accepted whole (fixed trees)
PHASES = ("prefill", "engine", "heads", "candidates", "acceptance", "kv_update", "other")


ACCEPTANCES = ("exact", "typical")
# how exact sampling drafts a tree's candidates and accepts them: "coupled" (every position's token is
# drawn by the Gumbel-max trick with noise fixed per position; the heads rank their tokens under the
# same noise, and a node is accepted when it is the token the backbone draws there: see PositionNoise),
# "top" (each head's top-k, treated as point masses) or "sampled" (each node drawn from its head's own
# distribution at the temperature; accepted with min(1, p/q), the residual (p - q)+: SpecInfer's
# multi-step speculative sampling)
DRAFTS = ("coupled", "top", "sampled")
LOOKUP_SIZINGS = ("cost", "grow")
MAX_LOGPROBS = 20  # alternatives a token at most (OpenAI's top_logprobs limit)
DEFAULT_LOOKUP_SIZING = "cost"


@dataclass
class DecodeConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (lossless); > 0: sampling
    # how a sampled step accepts tree candidates: "exact" (the tokens follow the backbone's
    # distribution: the coupled walk, PositionNoise, or the rejection walk, accept_exact; see drafts)
    # or "typical" (Medusa's typical acceptance: faster, lossy). Greedy ignores it.
    acceptance: str = "exact"
    # exact sampling only (greedy and typical acceptance always take the heads' top-k): "coupled",
    # "top" or "sampled" drafts (DRAFTS). "coupled" also decides how plain sampling (medusa=False)
    # draws, so that a seed gives the same tokens with and without Medusa.
    drafts: str = "coupled"
    top_k: int = 0  # sampling: keep the k likeliest tokens (0: all)
    top_p: float = 1.0  # sampling: keep the smallest set of likeliest tokens with this much probability
    epsilon: float = DEFAULT_EPSILON
    delta: float = DEFAULT_DELTA
    medusa: bool = True  # False: plain autoregressive decoding through the same backend
    # context lookup: each Medusa step also drafts up to this many tokens copied from where the
    # context's latest n-gram (n <= lookup_ngram) occurred before, as one more branch (0: off; with a
    # fixed tree and lookup_sizing "cost", on / off only: the sizer verifies up to lookup_max)
    lookup: int = DEFAULT_LOOKUP
    # with a fixed tree, the most tokens the branch drafts (<= lookup: always lookup). How many of them
    # a step verifies (lookup_sizing): "cost", as many as pay for their rows by the latency profile
    # and the draft's running hit rates (lookup.DraftSizer); "grow", the branch grows by 2 tokens
    # after a step that accepted its whole draft and shrinks by 1 after one that did not, between
    # lookup and lookup_max (lookup.DraftWidth). A dynamic tree weighs each lookup node by its
    # calibration instead.
    lookup_max: int = DEFAULT_LOOKUP_MAX
    lookup_sizing: str = DEFAULT_LOOKUP_SIZING
    lookup_ngram: int = DEFAULT_MAX_NGRAM
    # where the context repeats nothing, the lookup branch drafts from the datastore passed to
    # decode_steps (the artifact's datastore.npz: the model's own answers to other prompts); False: never
    datastore: bool = True
    seed: int | None = None
    eos_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    # prefill in calls of at most this many prompt tokens (0: the whole prompt in one call).
    # Bounds the prefill's logits ([chunk, vocab]) and attention scores ([chunk, cache + chunk])
    # however long the prompt; the output is the same up to floating-point rounding.
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    # None: no log-probabilities; k >= 0: each emitted token's log-probability under the backbone
    # (temperature 1, before any cut) and its k likeliest alternatives (StepEvent.logprobs)
    logprobs: int | None = None
    # also the log-probabilities of the prompt's tokens 1 .. n-1 (the prefill computes every row;
    # the first StepEvent carries them), with ``logprobs`` alternatives each (0 where it is None)
    prompt_logprobs: bool = False
    # OpenAI's penalties on the tokens generated so far (not the prompt's, as vLLM): each logit minus
    # presence_penalty if the token occurred, minus frequency_penalty times its count; in [-2, 2], 0: off.
    # The backbone's target is the penalized distribution, so greedy Medusa equals plain greedy decoding
    # with the same penalties (each tree node penalized by the tokens on its own path)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # structured output: a runtime.grammar.Grammar (a compiled response_format) whose mask the backbone's
    # logits take at every position (each tree node's after its own path), so greedy Medusa still equals
    # plain greedy decoding under it; None: free text
    grammar: Any = None
    # a threading.Event (anything with is_set()): once set, the decode raises runtime.errors.Cancelled before
    # its next engine call, between prompt chunks too (a server's client that left frees its slot at once)
    cancel: Any = None

    def __post_init__(self):
        # types, ranges and finiteness: the rules live in runtime/checks.py (ConfigError, one line each)
        self.prefill_chunk = check_prefill_chunk(self.prefill_chunk)
        self.max_new_tokens = checks.integer("max_new_tokens", self.max_new_tokens, 1)
        self.temperature = checks.real("temperature", self.temperature, 0)
        self.epsilon = checks.real(
            "epsilon", self.epsilon, 0, 1, min_open=True, rule="in (0, 1] (typical acceptance's hard threshold)"
        )
        self.delta = checks.real("delta", self.delta, 0, rule=">= 0 (typical acceptance's entropy-scaled threshold)")
        self.acceptance = checks.choice("acceptance", self.acceptance, ACCEPTANCES)
        self.drafts = checks.choice("drafts", self.drafts, DRAFTS)
        self.top_k = checks.integer("top_k", self.top_k, 0, rule=">= 0 (0: no top-k cut)")
        self.top_p = checks.real("top_p", self.top_p, 0, 1, min_open=True, rule="in (0, 1] (1: no nucleus cut)")
        self.medusa = checks.flag("medusa", self.medusa)
        self.seed = checks.seed(self.seed)
        self.stop_strings = checks.stop_strings(self.stop_strings)
        self.eos_token_ids = tuple(checks.integer("eos_token_ids", t, 0) for t in self.eos_token_ids)
        self.lookup = checks.integer(
            "lookup", self.lookup, 0, MAX_DRAFT, rule=f"in [0, {MAX_DRAFT}] (0: no context lookup)"
        )
        self.lookup_max = checks.integer("lookup_max", self.lookup_max, 0, MAX_DRAFT,
                                         rule=f"in [0, {MAX_DRAFT}] (<= lookup: a fixed width)")  # fmt: skip
        self.lookup_ngram = checks.integer("lookup_ngram", self.lookup_ngram, 1)
        self.lookup_sizing = checks.choice("lookup_sizing", self.lookup_sizing, LOOKUP_SIZINGS)
        self.datastore = checks.flag("datastore", self.datastore)
        self.logprobs = checks.integer("logprobs", self.logprobs, 0, MAX_LOGPROBS, optional=True,
                                       rule=f"None (off) or in [0, {MAX_LOGPROBS}] (alternatives a token)")  # fmt: skip
        self.prompt_logprobs = checks.flag("prompt_logprobs", self.prompt_logprobs)
        self.presence_penalty = checks.real("presence_penalty", self.presence_penalty, -2, 2)
        self.frequency_penalty = checks.real("frequency_penalty", self.frequency_penalty, -2, 2)
        if self.grammar is not None and not callable(getattr(self.grammar, "mask", None)):
            raise ConfigError(f"grammar must be a runtime.grammar.Grammar or None, got {type(self.grammar).__name__}")


def check_prefill_chunk(chunk) -> int:
    return cast(int, checks.integer("prefill_chunk", chunk, 0, rule=">= 0 (0: the whole prompt in one call)"))


@dataclass
class DecodeStats:
    steps: int = 0  # verification (or plain) forwards after the prefill
    new_tokens: int = 0
    accept_hist: dict[int, int] = field(default_factory=dict)  # tokens emitted per step -> count
    times: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    total_s: float = 0.0
    finish_reason: str = ""  # "eos", "length", "stop_string", "context"
    lookup_steps: int = 0  # Medusa steps whose tree carried context-lookup drafts
    lookup_accepted: int = 0  # accepted tokens that only the lookup drafted
    datastore_steps: int = 0  # of lookup_steps: those whose lookup drafts came from the datastore
    datastore_accepted: int = 0  # of lookup_accepted: those the datastore drafted
    # structured output: steps whose extra branch was the grammar's forced continuation instead of the
    # lookup's (its accepted tokens count in lookup_accepted: nodes no head drafted)
    forced_steps: int = 0
    nodes: int = 0  # tokens verified by the Medusa steps, roots included (/ steps: the mean tree size)
    cached_prompt_tokens: int = 0  # prompt tokens whose cache entries an earlier call left (not prefilled)
    dynamic: object = field(default=None, repr=False)  # a dynamic tree's per-call state (runtime.dynamic)
    draft_sizer: object = field(default=None, repr=False)  # a fixed tree's lookup.DraftSizer (its counts)

    @property
    def mean_accepted(self) -> float:
        """Tokens per verification step (the paper's acceleration rate); 1.0 for plain decoding."""
        n = sum(self.accept_hist.values())
        return sum(k * v for k, v in self.accept_hist.items()) / n if n else 0.0

    @property
    def decode_s(self) -> float:
        return self.total_s - self.times["prefill"]

    @property
    def tokens_per_s(self) -> float:
        """Tokens after the first over the decode time (prefill excluded, as usual for decoding speed)."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "accept_hist": {str(k): v for k, v in sorted(self.accept_hist.items())},
            "mean_accepted": self.mean_accepted,
            "tokens_per_s": self.tokens_per_s,
            "times": dict(self.times),
            "total_s": self.total_s,
            "finish_reason": self.finish_reason,
            "lookup_steps": self.lookup_steps,
            "lookup_accepted": self.lookup_accepted,
            "datastore_steps": self.datastore_steps,
            "datastore_accepted": self.datastore_accepted,
            "nodes": self.nodes,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }


# ---------------------------------------------------------------------------- choosing tokens


def _log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def target_probs(logits: np.ndarray, cfg: DecodeConfig) -> np.ndarray:
    """The distribution plain sampling draws from (float64, sums to 1): softmax at
    ``temperature``, then the ``top_k`` / ``top_p`` cuts, renormalised."""
    p = np.exp(_log_softmax(logits, cfg.temperature))
    if cfg.top_k and cfg.top_k < len(p):
        cut = np.partition(p, -cfg.top_k)[-cfg.top_k]
        p = np.where(p >= cut, p, 0.0)
        if np.count_nonzero(p) > cfg.top_k:  # ties at the cut: keep the first top_k by index, deterministically
            keep = np.argsort(-p, kind="stable")[: cfg.top_k]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q
    if cfg.top_p < 1.0:
        total = p.sum()
        # the nucleus lies among the tokens above (1 - top_p) * total / V: all the others together hold
        # less than 1 - top_p, so sorting only these gives the same set (and costs ~0.2 ms, not ~4 ms)
        cand = np.flatnonzero(p >= (1.0 - cfg.top_p) * total / len(p))
        order = cand[np.argsort(-p[cand], kind="stable")]
        keep = order[: np.searchsorted(np.cumsum(p[order]) / total, cfg.top_p) + 1]  # through the token reaching top_p
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q
    return p / p.sum()


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from ``p`` (non-negative, any positive sum) with one uniform from ``rng``."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


class Penalties:
    """OpenAI's presence and frequency penalties over the tokens generated so far (``add``), applied
    to a forward's logits (``apply``): every row loses the penalty of the tokens generated before the
    step (the root included), and a tree node's row also that of the drafted tokens on its own path
    (its ancestors below the root, and itself): what plain decoding would subtract had those tokens
    been generated. So a node is accepted exactly where plain decoding with the penalties would emit
    its token, and the logits the acceptance reads are the penalized target's."""

    def __init__(self, cfg: DecodeConfig, vocab: int):
        self.presence, self.frequency = float(cfg.presence_penalty), float(cfg.frequency_penalty)
        self.counts = np.zeros(vocab, dtype=np.int64)
        self.vector = np.zeros(vocab, dtype=np.float32)  # presence * (count > 0) + frequency * count

    @classmethod
    def of(cls, cfg: DecodeConfig, vocab: int) -> Penalties | None:
        return cls(cfg, vocab) if cfg.presence_penalty or cfg.frequency_penalty else None

    def add(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.counts[t] += 1
            self.vector[t] = self.presence + self.frequency * self.counts[t]

    def apply(self, logits: np.ndarray, tree: Tree | None = None, tokens: np.ndarray | None = None) -> np.ndarray:
        """The penalized copy of ``logits`` (rows of ``tree``'s nodes, ``tokens`` their tokens; no tree:
        every row as the next token after what was generated)."""
        out = np.asarray(logits, dtype=np.float32) - self.vector
        if tree is None or tokens is None:
            return out
        for v in range(1, tree.num_nodes):  # the node's own path below the root: its row of the tree's mask
            path, k = np.unique(tokens[1:][tree.attn_mask[v, 1:]], return_counts=True)
            out[v, path] -= self.frequency * k + self.presence * (self.counts[path] == 0)
        return out


class _Chain:
    """Logit processors one after another (penalties, then a grammar's mask): the interface of each."""

    def __init__(self, *procs):
        self.procs = procs

    def add(self, tokens: Sequence[int]) -> None:
        for p in self.procs:
            p.add(tokens)

    def apply(self, logits: np.ndarray, tree: Tree | None = None, tokens: np.ndarray | None = None) -> np.ndarray:
        for p in self.procs:
            logits = p.apply(logits, tree, tokens)
        return logits

    def forced(self) -> list[int]:
        for p in self.procs:
            if hasattr(p, "forced"):
                return p.forced()
        return []


def logit_processors(cfg: DecodeConfig, vocab: int):
    """What a decode applies to the backbone's logits before reading them (``add`` the emitted tokens,
    ``apply`` to a step's rows): the penalties and the grammar's mask, or None where neither is asked for."""
    procs = [p for p in (Penalties.of(cfg, vocab), cfg.grammar.mask(vocab) if cfg.grammar else None) if p]
    return None if not procs else procs[0] if len(procs) == 1 else _Chain(*procs)


@dataclass
class TokenLogprob:
    """An emitted token's log-probability under the backbone, and its likeliest alternatives
    (``top``: (token, log-probability) pairs, likeliest first; the token itself may be among them)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(rows: np.ndarray, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """``tokens[i]``'s log-probability under ``rows[i]`` (the backbone's logits at the position it was
    emitted at; softmax at temperature 1, before temperature, top-k or top-p) and row i's ``top``
    likeliest tokens. Medusa's verification computes these rows anyway (the accepted path's), so
    they are plain decoding's rows, up to floating-point rounding."""
    rows = np.asarray(rows[: len(tokens)], dtype=np.float32)
    peak = rows.max(axis=1, keepdims=True)
    # log-sum-exp per row, summed in float64 (a float64 copy of each row would cost twice the time)
    lse = peak[:, 0].astype(np.float64) + np.log(np.exp(rows - peak).sum(axis=1, dtype=np.float64))
    out = []
    for row, t, z in zip(rows, tokens, lse):
        alt = head_topk(row[None], (top,))[0] if top else ()
        out.append(TokenLogprob(int(t), float(row[t]) - z, [(int(a), float(row[a]) - z) for a in alt]))
    return out


def select_root(logits: np.ndarray, cfg: DecodeConfig, rng: np.random.Generator,
                noise: PositionNoise | None = None, pos: int = 0) -> int:  # fmt: skip
    """The backbone's next token: argmax, or a sample from :func:`target_probs` (by the Gumbel-max
    trick with ``noise`` at ``pos``, the token's position, where drafts are coupled)."""
    if cfg.temperature < GREEDY_BELOW:
        return int(np.argmax(logits))
    if noise is not None:
        return noise.choose(logits, cfg, pos)
    return sample(target_probs(logits, cfg), rng)


class PositionNoise:
    """Coupled exact sampling (``drafts="coupled"``): one Gumbel vector ``g_t`` per position ``t``
    of the sequence, and the token at ``t`` is ``argmax(log p_t + g_t)``, ``p_t`` the backbone's
    :func:`target_probs` given the tokens before ``t``.

    Why this is plain sampling: with ``g_t`` i.i.d. standard Gumbel over the vocabulary,
    ``argmax(log p + g)`` is distributed as ``p`` (the Gumbel-max trick). ``g_t`` is drawn
    independently of ``g_s``, ``s < t``, and the tokens before ``t`` are a function of those
    alone, so given them the token at ``t`` follows ``p_t``: the sequence has plain sampling's law.

    Why Medusa does not change the tokens: each position's vector is drawn from ``rng`` once, in
    position order (asking for ``t`` draws every position up to ``t`` first), and kept until the
    token there is final. The token at ``t`` is then a fixed function of the backbone and the
    vectors, whatever was drafted: a tree node is accepted exactly when its token is the one the
    backbone's noisy argmax picks at its parent (greedy verification of the perturbed logits), and
    the token after the last accepted node is that argmax. So for a seed, Medusa's tokens are plain
    sampling's tokens (with this sampler), as greedy Medusa's are plain greedy decoding's.

    The drafts see the same noise: a head proposing the token at ``t`` ranks ``logits / T + g_t``,
    so where its distribution is close to the backbone's its top-ranked token is the backbone's
    draw (the Gumbel coupling accepts with probability at least ``(1 - TV) / (1 + TV)``, against
    ``p(x)`` for a fixed candidate ``x``). A context-lookup draft ``x`` is accepted with ``p(x)``.
    Gumbel-max coupling for drafter-invariant speculative decoding: Daliri, Musco and Suresh, 2024
    (arXiv 2408.07978)."""

    def __init__(self, rng: np.random.Generator, vocab: int):
        self.rng, self.vocab = rng, vocab
        self._noise: dict[int, np.ndarray] = {}
        self._next: int | None = None  # the next position to draw
        self._e = np.empty(vocab)  # float64 draws, reused

    def at(self, pos: int) -> np.ndarray:
        """``g_pos`` (float32 ``[vocab]``), drawn with every earlier position not drawn yet."""
        if self._next is None:
            self._next = pos
        if pos < self._next and pos not in self._noise:
            raise AssertionError(f"the noise at position {pos} was released")
        while self._next <= pos:
            # g = -log E, E ~ Exp(1), drawn in float64: numpy's float32 draws carry 23 random bits and
            # return exactly 0 with probability 2^-23 (g = inf: a random token in ~V / 2^23 of the
            # positions, 0.6% at V = 49152). Cast, E keeps its relative precision (no float64 value
            # here is below float32's range), and the log runs in float32.
            self.rng.standard_exponential(out=self._e)
            g = self._e.astype(np.float32)
            np.log(g, out=g)
            self._noise[self._next] = np.negative(g, out=g)
            self._next += 1
        return self._noise[pos]

    def rows(self, positions) -> np.ndarray:
        """``[len(positions), vocab]``: ``g`` at each position (rows of a verification: its nodes'
        children's positions), for an engine that draws the tokens itself (Backend.forward_argmax)."""
        positions = [int(p) for p in positions]
        self.at(max(positions))  # in position order, as a walk would draw them
        return np.stack([self._noise[p] for p in positions])

    def release(self, below: int) -> None:
        """Forget positions before ``below`` (their tokens are final)."""
        for t in [t for t in self._noise if t < below]:
            del self._noise[t]

    def choose(self, logits: np.ndarray, cfg: DecodeConfig, pos: int) -> int:
        """The token the backbone draws at ``pos`` from ``logits`` (one row)."""
        if cfg.top_k or cfg.top_p < 1.0:
            with np.errstate(divide="ignore"):
                z = np.log(target_probs(logits, cfg))  # cut tokens: -inf, never drawn
            return int(np.argmax(z + self.at(pos)))
        return int(np.argmax(self._scores(logits, cfg.temperature, pos)))

    def perturb(self, logits: np.ndarray, temperature: float, pos: int) -> np.ndarray:
        """A draft's scores for the token at ``pos``, ranked as logits: the backbone's own draw rule."""
        return self._scores(logits, temperature, pos)

    def _scores(self, logits: np.ndarray, temperature: float, pos: int) -> np.ndarray:
        """``logits / T + g_pos`` (one row; argmax: the draw)."""
        return perturbed(logits, self.at(pos), temperature)


def head_topk(head_logits: np.ndarray, topk: Sequence[int]) -> np.ndarray:
    """Top ``topk[h]`` tokens of each head h, best first, in a [len(topk), max(topk)] array
    (entries past ``topk[h]`` are unused). ``head_logits``: [K, V]. argmax where one rank
    is enough, else a partial sort: never a full sort of the vocabulary."""
    out = np.zeros((len(topk), max(topk)), dtype=np.int64)
    for h, k in enumerate(topk):
        row = head_logits[h]
        if k == 1:
            out[h, 0] = np.argmax(row)
            continue
        idx = np.argpartition(row, -k)[-k:] if k < len(row) else np.arange(len(row))
        out[h, :k] = idx[np.argsort(-row[idx], kind="stable")]
    return out


def tree_candidates(root: int, head_logits: np.ndarray, tree: Tree) -> np.ndarray:
    """Token of every tree node: the root, then rank ``node_rank`` of head ``node_head``."""
    tops = head_topk(head_logits, tree.topk)
    tokens = np.empty(tree.num_nodes, dtype=np.int64)
    tokens[0] = root
    tokens[1:] = tops[tree.node_head[1:], tree.node_rank[1:]]
    return tokens


def draft_distribution(logits: np.ndarray, temperature: float) -> np.ndarray:
    """A head's draft distribution q at ``temperature`` (float64; a draft vocabulary's filler gets 0)."""
    return np.exp(_log_softmax(logits, temperature))


def sample_children(logits: np.ndarray, kids: np.ndarray, temperature: float, rng, tokens, q) -> None:
    """``kids`` (siblings) each drawn independently from the distribution of ``logits`` (one row)."""
    dist = draft_distribution(logits, temperature)
    for c in kids:
        tokens[c] = sample(dist, rng)
        q[c] = dist


def hydra_candidates(root: int, tree: Tree, draft: Callable[[np.ndarray, np.ndarray], np.ndarray], width: int,
                     sampler=None, perturb: Callable[[np.ndarray, int], np.ndarray] | None = None):  # fmt: skip
    """Token of every tree node, drafted level by level by sequentially dependent (Hydra) heads:
    depth d's nodes are ranks of head d-1 run on their parent's path (root .. parent), one
    ``draft(path_ids [rows, width], path_len [rows]) -> logits [rows, V]`` call per depth with a
    row per parent that has children there. ``width``: the heads graph's path width (its head count).
    ``sampler``: ``(temperature, rng, q)``: children are drawn from their parent row's distribution
    instead of ranked (exact sampling's sampled drafts; ``q[c]`` receives each child's distribution).
    ``perturb(logits, depth)``: the scores children at that depth are ranked by (coupled drafts)."""
    n = tree.num_nodes
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = root
    depth = tree.position_ids
    for d in range(1, int(depth.max()) + 1):
        nodes = np.flatnonzero(depth == d)
        parents = np.unique(tree.parent[nodes])
        paths = np.zeros((len(parents), width), dtype=np.int64)
        for i, p in enumerate(parents):  # the parent's path: walk up to the root
            node = int(p)
            for j in range(d - 1, -1, -1):
                paths[i, j] = tokens[node]
                node = int(tree.parent[node])
        logits = draft(paths, np.full(len(parents), d, dtype=np.int64))
        if perturb is not None:
            logits = perturb(logits, d)
        for i, p in enumerate(parents):
            kids = nodes[tree.parent[nodes] == p]
            if sampler is not None:
                sample_children(logits[i], kids, sampler[0], sampler[1], tokens, sampler[2])
                continue
            k = int(tree.node_rank[kids].max()) + 1
            top = head_topk(logits[i : i + 1], (k,))[0]
            tokens[kids] = top[tree.node_rank[kids]]
    return tokens


def draft_tree(backend: Backend, index: int, root: int, tree: Tree, cfg: DecodeConfig | None = None,
               rng: np.random.Generator | None = None,
               noise: PositionNoise | None = None) -> tuple[np.ndarray, list | None]:  # fmt: skip
    """``(tokens, q)``: the candidate token of every node of ``tree`` from the hidden state of token
    ``index`` of the last forward: Medusa heads in one call (:func:`tree_candidates`), Hydra heads
    level by level (:func:`hydra_candidates`). ``q`` is None, or, where ``cfg`` asks for sampled
    drafts (exact sampling, ``drafts="sampled"``, each node drawn with ``rng`` from its head's
    distribution at the temperature), per node the distribution it was drawn from (None: the root).
    ``noise`` (coupled drafts): a node at depth d is ranked by its head's ``logits / T`` plus the
    noise of its position, the root's (the backend's cache length) + d."""
    sampled = cfg is not None and rng is not None and _sampled_drafts(cfg)
    q: list | None = [None] * tree.num_nodes if sampled else None
    perturb: Callable[[np.ndarray, int], np.ndarray] | None = None
    if noise is not None and cfg is not None:
        at, temperature = backend.cache_len, cfg.temperature  # the root's position: it is not in the cache yet
        perturb = lambda logits, depth: noise.perturb(logits, temperature, at + depth)
    if backend.spec.medusa_head_type == "hydra":
        tokens = hydra_candidates(
            root,
            tree,
            lambda paths, lens: backend.draft_logits(index, paths, lens),
            backend.spec.num_medusa_heads,
            sampler=(cfg.temperature, rng, q) if sampled else None,  # type: ignore[union-attr]
            perturb=perturb,
        )
    elif sampled:
        heads = _head_rows(backend, index, tree.depth)
        tokens = np.empty(tree.num_nodes, dtype=np.int64)
        tokens[0] = root
        for h in range(tree.depth):
            nodes = np.flatnonzero(tree.node_head == h)
            sample_children(heads[h], nodes, cfg.temperature, rng, tokens, q)  # type: ignore[union-attr]
    else:
        heads = _head_rows(backend, index, tree.depth)
        if perturb is not None:  # head h drafts depth h + 1
            heads = np.stack([perturb(heads[h], h + 1) for h in range(tree.depth)])
        tokens = tree_candidates(root, heads, tree)
    return tokens, q


def _head_rows(backend: Backend, index: int, depth: int) -> np.ndarray:
    """The Medusa heads' logits a tree of ``depth`` reads: head 1 alone (a smaller call where the
    backend has a graph of it) for depth 1, else every head."""
    return backend.first_head_logits(index) if depth == 1 else backend.head_logits(index)


def _sampled_drafts(cfg: DecodeConfig) -> bool:
    return cfg.temperature >= GREEDY_BELOW and cfg.acceptance == "exact" and cfg.drafts == "sampled"


def _coupled(cfg: DecodeConfig) -> bool:
    return cfg.temperature >= GREEDY_BELOW and cfg.acceptance == "exact" and cfg.drafts == "coupled"


# ---------------------------------------------------------------------------- acceptance


def accept_greedy(tokens: np.ndarray, logits: np.ndarray, tree: Tree) -> np.ndarray:
    """Nodes of the longest path whose every token is the backbone's argmax at its parent.

    Lossless: each accepted token is exactly what plain greedy decoding would emit next.
    """
    return accept_greedy_tokens(tokens, np.argmax(logits, axis=-1), tree)


def accept_greedy_tokens(tokens: np.ndarray, best: np.ndarray, tree: Tree) -> np.ndarray:
    """:func:`accept_greedy` from the backbone's argmax token at every node (``best`` ``[N]``)."""
    ok = np.zeros(tree.num_nodes, dtype=bool)
    ok[0] = True
    ok[1:] = tokens[1:] == best[tree.parent[1:]]
    return _longest_accepted_path(ok, tree, score=None)


def accept_typical(tokens: np.ndarray, logits: np.ndarray, tree: Tree, cfg: DecodeConfig) -> np.ndarray:
    """Typical acceptance (Medusa paper, Sec. 3.3.1).

    A candidate is accepted when its probability under the backbone (at ``temperature``)
    at its parent exceeds ``min(epsilon, delta * exp(-H))``, H the entropy there, and, with
    ``top_k`` / ``top_p``, when the cut keeps it (a token plain sampling could not draw is never
    accepted: ``top_k=1`` decodes greedily). Among the longest accepted paths, the one with the
    highest log-probability wins.
    """
    parents = tree.parent[1:]
    logp = _log_softmax(logits, cfg.temperature)  # [N, V]
    p = np.exp(logp)
    entropy = -(p * np.where(p > 0, logp, 0.0)).sum(-1)  # [N]
    cand_logp = logp[parents, tokens[1:]]
    threshold = np.minimum(cfg.epsilon, cfg.delta * np.exp(-entropy[parents]))
    ok = np.ones(tree.num_nodes, dtype=bool)
    ok[1:] = np.exp(cand_logp) > threshold
    if cfg.top_k or cfg.top_p < 1.0:
        kept: dict[int, np.ndarray] = {}  # a parent's tokens the cut keeps, for the parents of candidates left
        for i in np.flatnonzero(ok[1:]):
            v = int(parents[i])
            if v not in kept:
                kept[v] = target_probs(logits[v], cfg) > 0
            ok[i + 1] = kept[v][tokens[i + 1]]
    score = np.zeros(tree.num_nodes)
    score[1:] = cand_logp
    return _longest_accepted_path(ok, tree, score=score)


def accept_exact(
    tokens: np.ndarray, logits: np.ndarray, tree: Tree, cfg: DecodeConfig, rng: np.random.Generator, q=None
) -> tuple[np.ndarray, int]:
    """Tree speculative sampling: (accepted nodes, the next token), distributed exactly as
    plain sampling from the backbone (:func:`target_probs`) would produce them.

    The drafts are deterministic (each head's top-k), so each candidate is treated as a
    draft drawn from a point mass ``q = 1{x = candidate}``; SpecInfer's multi-step
    speculative sampling (and EAGLE's ``evaluate_posterior``) with that ``q``:

    at node ``v`` (the root first) let ``r = p_v``, the target distribution the backbone
    gives after ``v``'s path. For each child ``c`` of ``v`` in the tree's order, with token
    ``x_c``: accept ``c`` with probability ``r(x_c)`` (= min(1, r/q) at ``x_c``); if accepted,
    move to ``c`` and repeat there. Else set ``r(x_c) = 0``, renormalise, try the next child.
    If every child is rejected (or ``v`` is a leaf), the next token is drawn from ``r``.

    Why the output follows ``p_v``: trying child ``c`` with the normalised residual ``r`` is
    one step of the decomposition "draw ``y ~ r``" = "with probability ``r(x_c)`` output
    ``x_c``, else draw from ``r`` conditioned on ``y != x_c``" (``r(x) / (1 - r(x_c))`` for
    ``x != x_c``, exactly the zeroed and renormalised residual). Chaining the
    decompositions over the siblings (distinct tokens) shows that the token emitted after
    ``v`` (an accepted child's token, or the final residual draw) is distributed as
    ``p_v`` whatever the candidates are. An accepted child's token is then followed by a
    token drawn, by the same argument, from ``p_c``: the backbone's distribution after
    ``v``'s path + ``x_c``, which is what plain sampling would condition on. By induction
    over the depth, every emitted sequence has the probability plain sampling gives it,
    with ``temperature``, ``top_k`` and ``top_p`` applied the same way in both. The root is
    drawn from the same law, so the step as a whole is exact. Every draw uses ``rng``: a
    seed reproduces a run.

    **Sampled drafts** (``q[c]`` a distribution: the child was drawn from it, independently of
    its siblings and of the target's draws): accept with probability ``min(1, r(x_c) / q_c(x_c))``,
    else replace ``r`` by ``(r - q_c)+`` renormalised and try the next child. This is one step
    of speculative sampling with target ``r`` and proposal ``q_c`` (Leviathan et al. 2023; Chen et
    al. 2023): the token it outputs (``x_c`` if accepted, else a draw from the new residual) is
    distributed as ``r``, because ``P(accept, x) = q_c(x) min(1, r(x)/q_c(x)) = min(q_c(x), r(x))``
    and ``P(reject) (r - q_c)+(x) / Z = r(x) - min(q_c(x), r(x))``. Chaining it over siblings
    (SpecInfer's multi-step speculative sampling) keeps ``p_v`` for the same reason as above. A
    point mass (``q[c]`` None) is the special case ``q_c = 1{x_c}``: ``min(1, r(x_c))`` and
    ``(r - 1{x_c})+`` = ``r`` with ``x_c`` zeroed, i.e. the rule above. Accepting more needs q close
    to p: ``P(accept) = sum_x min(q_c(x), r(x)) = 1 - TV(q_c, r)``, against ``r(x_c)`` for a fixed
    candidate.
    """
    path = [0]
    node = 0
    while True:
        r = target_probs(logits[node], cfg)
        for c in np.flatnonzero(tree.parent == node):  # children in the tree's order (by rank)
            x = tokens[c]
            qc = None if q is None else q[c]  # None: a fixed candidate, q = 1{x}
            if rng.random() * (1.0 if qc is None else qc[x]) < r[x]:  # u < r(x) / q(x)
                path.append(int(c))
                node = int(c)
                break
            if qc is None:
                r[x] = 0.0
            else:
                r = np.maximum(r - qc, 0.0)
            total = r.sum()
            if total <= 0:  # r put all its mass on rejected tokens: impossible (r(x) = 1 is always accepted)
                raise AssertionError("exact acceptance: empty residual")
            r /= total
        else:
            return np.asarray(path, dtype=np.int64), sample(r, rng)


def accept_coupled(tokens: np.ndarray, logits: np.ndarray, tree: Tree, cfg: DecodeConfig, noise: PositionNoise,
                   root_pos: int) -> tuple[np.ndarray, int]:  # fmt: skip
    """Coupled exact sampling (:class:`PositionNoise`): (accepted nodes, the next token). From the
    root, the backbone draws the next token at each node with the noise of its child's position
    (``root_pos`` + depth + 1); a child holding that token is accepted and the walk goes on from it,
    else the draw is the next token. Greedy verification, of the perturbed logits: a node's rank or
    branch changes nothing but how far the walk gets."""
    path = [0]
    node = 0
    while True:
        x = noise.choose(logits[node], cfg, root_pos + int(tree.position_ids[node]) + 1)
        kids = np.flatnonzero(tree.parent == node)
        hit = kids[tokens[kids] == x]
        if not len(hit):
            return np.asarray(path, dtype=np.int64), x
        node = int(hit[0])
        path.append(node)


def _longest_accepted_path(ok: np.ndarray, tree: Tree, score: np.ndarray | None) -> np.ndarray:
    """Rows of retrieve_indices: accept while ``ok``; longest wins, ties by summed ``score``."""
    ri = tree.retrieve_indices
    valid = ri != PAD
    safe = np.where(valid, ri, 0)  # PAD is never used as an index
    row_ok = ok[safe] & valid
    lengths = np.cumprod(row_ok, axis=1).sum(axis=1)  # accepted nodes per row, root included
    best = lengths.max()
    rows = np.flatnonzero(lengths == best)
    if score is not None and len(rows) > 1:
        totals = (score[safe[rows, :best]]).sum(axis=1)
        row = rows[int(np.argmax(totals))]
    else:
        row = rows[0]
    return ri[row, :best]


# ---------------------------------------------------------------------------- the loop


@dataclass
class StepEvent:
    """Tokens emitted by one stage (prefill or a step); the streaming unit."""

    tokens: list[int]
    stats: DecodeStats
    logprobs: list[TokenLogprob] | None = None  # per token, where DecodeConfig.logprobs asks for them
    # the prompt's tokens 1 .. n-1, on the first event, where DecodeConfig.prompt_logprobs asks for them
    prompt_logprobs: list[TokenLogprob] | None = None


class _Clock:
    def __init__(self, times: dict[str, float]):
        self.times = times
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] += now - self.t
        self.t = now


def check_tree(backend: Backend, cfg: DecodeConfig, tree):
    """The tree ``cfg`` decodes with on ``backend`` (None: plain decoding), or a MedusaError where
    they do not go together; runtime.api checks it at the call (a stream's first chunk comes
    later), the decode loop again."""
    if not cfg.medusa:
        return None
    if tree is None:
        raise MedusaError("Medusa decoding needs a tree (or pass medusa=False)")
    if dynamic.is_dynamic(tree) and _sampled_drafts(cfg):
        raise MedusaError(
            "a dynamic tree drafts the heads' likeliest tokens: drafts='sampled' needs a fixed tree (e.g. chain_1)"
        )
    if tree.depth > backend.spec.num_medusa_heads:
        raise MedusaError(
            f"tree {tree.name!r} has depth {tree.depth} but the model has {backend.spec.num_medusa_heads} Medusa heads"
        )
    if not tree.is_chain and not dynamic.is_dynamic(tree) and _exact(cfg) and not backend.exact_branching:
        raise MedusaError(
            f"tree {tree.name!r} branches, and this engine computes with int8 activations (an int8/int4 artifact), "
            "where greedy Medusa and exact sampling follow plain decoding exactly with chain trees only: use "
            "chain_1 .. chain_5 (or acceptance='typical', which is lossy anyway)"
        )
    return tree


def decode_steps(
    backend: Backend,
    prompt_ids: Sequence[int],
    cfg: DecodeConfig,
    tree: Tree | dynamic.DynamicTree | None = None,
    decode_text: Callable[[list[int]], str] | None = None,
    datastore: Datastore | None = None,
    cost: dynamic.CostModel | None = None,
    reuse: int | Callable[[], int] = 0,
) -> Iterator[StepEvent]:
    """Yield the tokens of each step as they are accepted; the last event's stats are final.
    ``datastore``: the lookup branch's drafts where the context repeats nothing (``cfg.datastore``).
    ``cost``: the engine's latency profile, which sizes a fixed tree's lookup branch (default:
    :data:`runtime.dynamic.DEFAULT_COST`). ``reuse``: how many of the prompt's first tokens the
    backend's cache already holds (or a callable giving it, read when the first step runs): the
    cache keeps those entries (``Backend.truncate``) and the prefill runs the rest only; 0 (the
    default), or ``prompt_logprobs`` (which scores every prompt row): a new cache."""
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    check_fits(backend, prompt)
    tree = check_tree(backend, cfg, tree)
    rng = np.random.default_rng(cfg.seed)
    noise = PositionNoise(rng, backend.spec.vocab_size) if _coupled(cfg) else None
    pen = logit_processors(cfg, backend.spec.vocab_size)
    stats = DecodeStats()
    store = datastore if cfg.datastore else None
    lookup = NgramLookup(prompt.tolist(), cfg.lookup_ngram, store) if cfg.medusa and cfg.lookup else None
    out: list[int] = []
    clock = _Clock(stats.times)
    start = clock.t
    kept = 0 if cfg.prompt_logprobs else max(0, min(int(reuse() if callable(reuse) else reuse), len(prompt) - 1))
    if kept:
        backend.truncate(kept)
    else:
        backend.reset()
    stats.cached_prompt_tokens = kept

    # prefill: the prompt (past what the cache kept) under a causal mask, in chunks (each sees the
    # cache of the earlier ones); the last chunk's last logits give the first root
    scored: list[TokenLogprob] | None = [] if cfg.prompt_logprobs else None
    # greedy (and coupled sampling) read the drawn tokens alone, not logits
    argmax = _draws_only(cfg, pen, noise) and scored is None
    logits, m = prefill(backend, prompt[kept:], cfg.prefill_chunk, scored=scored, top=cfg.logprobs or 0, argmax=argmax,
                        noise=noise, temperature=cfg.temperature,
                        allowed=None if pen is None or not argmax else pen.masks(1), cancel=cfg.cancel)  # fmt: skip
    assert logits is not None
    first = logits[-1] if argmax or pen is None else pen.apply(logits[-1:])[0]  # (no token generated yet)
    root = int(first) if argmax else select_root(first, cfg, rng, noise, backend.cache_len)
    rows = logits[-1:].copy() if cfg.logprobs is not None else None  # the logits rows of the emitted tokens
    state = dynamic.DynamicState(tree) if isinstance(tree, dynamic.DynamicTree) else None
    static = tree if isinstance(tree, Tree) else None  # a fixed tree (a dynamic one grows each step's own)
    width = _draft_width(cfg, static, cost)
    stats.draft_sizer = width if isinstance(width, DraftSizer) else None
    stats.dynamic = state
    index = m - 1  # the token of the last forward whose hidden state drafts the next step
    cands = (
        draft_tree(backend, index, root, static, cfg, rng, noise) if static is not None else None
    )  # the first step's candidates (a dynamic tree drafts at the step itself)
    clock.lap("prefill")
    emitted = [root]
    # the backend's forward count after this loop's last call: a dynamic tree drafts from that call's
    # hidden state at the start of the next step, which is not its own where another call ran
    # forwards on the backend in between (runtime.api's streams take turns on one cache)
    mine = backend.forwards

    while True:
        done = _emit(out, emitted, cfg, stats, decode_text)  # an EOS, the length or a stop may trim the step
        if not done and backend.max_context - backend.cache_len < 1:  # the cache is full: this is the last event
            stats.finish_reason, done = "context", True
        logprobs = None if rows is None or cfg.logprobs is None else token_logprobs(rows, emitted, cfg.logprobs)
        if pen is not None:
            pen.add(emitted)
        if lookup is not None:
            lookup.extend(emitted)
        if stats.steps:  # a step, not the prefill: count the tokens it emitted (after any stop trims them)
            stats.accept_hist[len(emitted)] = stats.accept_hist.get(len(emitted), 0) + 1
        clock.lap("other")
        stats.total_s = clock.t - start
        yield StepEvent(list(emitted), stats, logprobs, scored)
        scored = None  # the first event's only
        if done:
            return
        _check_cancel(cfg.cancel)
        if noise is not None:
            noise.release(below=backend.cache_len + 1)  # through the root's position: final
        if state is not None and backend.forwards == mine and (budget := backend.max_new_tokens()) > 1:
            # (a budget of one token, a batch engine's plain step under load: no heads, no lookup, no tree)
            emitted, root, index, rows = _dynamic_step(
                backend, root, index, state, cfg, rng, clock, lookup, stats, noise, budget, pen
            )
        elif static is not None and (room := backend.max_new_tokens()) >= static.num_nodes:  # the tree fits one call
            if cands is None:  # after plain steps: the heads on the last one's token
                cands = draft_tree(backend, 0, root, static, cfg, rng, noise)
                clock.lap("heads")
            # `room` is read once a step: a batch engine's budget may change between two reads
            emitted, root, cands, rows = _medusa_step(
                backend, root, cands, static, cfg, rng, clock, lookup, stats, width, room, noise, pen
            )
        else:  # plain decoding, a plain step near the context end, a step budget below the tree, or a
            # dynamic tree's step after another call's forwards (the hidden state it would draft from is gone)
            emitted, root, rows = _plain_step(backend, root, cfg, rng, clock, noise, pen)
            index = 0
            cands = None  # drafted when a tree runs again (the last forward keeps its hidden state)
        stats.steps += 1
        mine = backend.forwards


def prefill(backend: Backend, tokens, chunk: int, want_logits: bool = True, scored: list | None = None,
            top: int = 0, argmax: bool = False, noise: PositionNoise | None = None,
            temperature: float = 1.0, allowed: np.ndarray | None = None,
            cancel=None) -> tuple[np.ndarray | None, int]:  # fmt: skip
    """Run ``tokens`` through the backend under a causal mask, in calls of at most ``chunk``
    tokens (0: no limit) and at most what the backend takes at that cache length
    (``max_new_tokens``), each over the cache of the earlier ones, and commit them all.
    Returns (the last call's logits, its token count): the last row when the backend computes
    only the rows asked for (``partial_logits``), none when ``want_logits`` is False.
    ``scored`` (a list): every call computes all its rows, and the log-probabilities of tokens
    1 .. n-1 (with ``top`` alternatives each) are appended to it, a call at a time. ``argmax``
    (no ``scored``): the last call returns its last row's argmax token ``[1]`` instead of logits
    (``Backend.forward_argmax``; with ``noise``, coupled sampling's draw at ``temperature``; with
    ``allowed``, bool ``[1, vocab]``, over a grammar's allowed tokens). ``cancel`` (an Event): set, the
    next chunk raises :class:`runtime.errors.Cancelled` instead of running."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    logits, m, s = None, 0, 0
    while s < n:
        _check_cancel(cancel)
        start = backend.cache_len
        m = min(chunk or n, n - s, backend.max_new_tokens(start))
        if m < 1:
            raise ContextLengthError(f"the backend takes no new token on a cache of {start} (prompt token {s} of {n})")
        last = s + m == n
        call = (tokens[s : s + m], np.arange(start, start + m), np.tril(np.ones((m, m), dtype=bool)))
        if argmax and want_logits and last and scored is None:
            g = None if noise is None else noise.rows([start + m])  # the next token's position
            best = backend.forward_argmax(*call, rows=1, noise=g, temperature=temperature, allowed=allowed)
            logits = np.array([settled(backend, best, 0)])
        else:
            logits = backend.forward(*call, logits=m if scored is not None else 1 if (want_logits and last) else 0)
        if scored is not None:  # row j predicts token s + j + 1 (the last row, the first new token)
            scored.extend(token_logprobs(logits, tokens[s + 1 : s + m + 1].tolist(), top))
            logits = logits[-1:]
        backend.commit(np.arange(m))
        s += m
    return logits, m


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the decode was cancelled (its cancel event is set)")


def _draft_width(cfg: DecodeConfig, tree: Tree | None, cost: dynamic.CostModel | None) -> DraftSizer | DraftWidth:
    """How a fixed tree's lookup branch is sized: by the cost profile (``lookup_sizing="cost"``, up to
    ``lookup_max`` tokens) or by the grow-and-shrink schedule (``"grow"``, or a fixed width where
    ``lookup_max <= lookup``)."""
    if tree is None or cfg.lookup_sizing != "cost" or cfg.lookup_max <= cfg.lookup or not cfg.lookup:
        return DraftWidth(cfg.lookup, cfg.lookup_max)
    cost = cost or dynamic.DEFAULT_COST
    return DraftSizer(cfg.lookup_max, cost.table(tree.num_nodes + cfg.lookup_max + 1), cost.heads)


def _exact(cfg: DecodeConfig) -> bool:
    """Whether the acceptance promises plain decoding's output (greedy) or law (exact sampling)."""
    return cfg.temperature < GREEDY_BELOW or cfg.acceptance == "exact"


def _medusa_step(backend, root, cands, tree, cfg, rng, clock, lookup, stats, width, room, noise=None, pen=None):
    """One step over a fixed tree: graft the lookup's draft (``width``: a :class:`DraftSizer`, which
    keeps as many of its tokens as pay for their rows, or a :class:`DraftWidth`; cut to ``room``, the
    tokens the engine takes this step), verify, accept; the next step's candidates."""
    # candidates (drafted at the end of the previous step): the root plus the heads' top-k, laid out as the tree
    tokens, q = cands  # q: sampled drafts' distributions (None: fixed candidates)
    base_tree = tree
    stored = False
    drafts: list[int] = []
    sizing = isinstance(width, DraftSizer)
    if q is not None and not _branching(backend, cfg):
        # sampled drafts on a chain-only engine: the draft would replace the sampled chain where it
        # leaves it, so the chain's first node would hold the draft's token whatever was sampled, no
        # longer a draw from q (accepting it with min(1, r/q) would draw it too often): no lookup draft
        lookup = None
    # structured output: where the grammar allows one continuation only (a schema's keys, its punctuation),
    # that continuation is the step's extra branch (the masked argmax takes it wherever the tokenization
    # is the grammar's own), in place of the lookup's
    forced = pen.forced() if hasattr(pen, "forced") and _branching(backend, cfg) else []
    if forced:
        lookup = None
        cap = room if backend.step_rows is None else min(room, max(backend.step_rows, tree.num_nodes))
        grafted, grafted_tokens, added = graft_chain(tree, tokens, forced[: max(0, cap - tree.num_nodes)])
        if added and cap >= grafted.num_nodes:
            tree, tokens = grafted, grafted_tokens
            if q is not None:
                q = list(q[: grafted.num_nodes - added]) + [None] * added
            stats.forced_steps += 1
    if lookup is not None:  # plus the context's own continuation (or the datastore's), as one more branch
        drafts, row = lookup.propose_row(width.top if sizing else width.width)
        if backend.step_rows is not None:  # an engine that runs longer steps apart (a batch engine's max_rows)
            room = min(room, max(backend.step_rows, tree.num_nodes))
        branching = _branching(backend, cfg)
        if branching:
            # where the engine takes fewer tokens (a load's budget, the context's end) the draft's head
            # still goes: a grafted draft of r tokens adds at most r nodes. (A chain-only engine's draft
            # replaces the heads' chain: a cut one could replace a longer chain with less.)
            drafts = drafts[: max(0, room - tree.num_nodes)]
        elif sizing:  # a chain of root + r drafts at most (room >= the tree: its own chain always fits)
            drafts = drafts[: max(0, room - 1)]
        if sizing and drafts:
            sizes, shared, agree = _draft_sizes(tree, tokens, drafts, branching)
            drafts = drafts[: width.choose(drafts, row, sizes, shared, agree)]
        if drafts:
            grafted, grafted_tokens, added = graft_chain(tree, tokens, drafts, branching=branching)
            if added and room >= grafted.num_nodes:
                tree, tokens = grafted, grafted_tokens
                if q is not None:  # the tree's own nodes keep their indices (a prefix); lookup nodes are fixed
                    q = list(q[: grafted.num_nodes - added]) + [None] * added
                stats.lookup_steps += 1
                stored = from_datastore(row)
                stats.datastore_steps += stored
    clock.lap("candidates")
    path, new_root, rows = _verify(backend, tokens, tree, cfg, rng, clock, stats, q, stored, noise, pen)
    accepted = [int(t) for t in tokens[path[1:]]]
    if forced:  # no lookup draft ran: its sizing learns nothing from this step
        pass
    elif sizing:  # the rates and the call's running rate follow the outcome (the draft scored past its cut too)
        width.observe(len(drafts) if tree is not base_tree else 0, accepted + [new_root], tree.num_nodes)
    elif tree is not base_tree:  # the branch was verified: its width follows the outcome
        width.update(drafts, accepted)
    # next candidates come from the heads at the last accepted node
    cands = draft_tree(backend, int(path[-1]), new_root, base_tree, cfg, rng, noise)
    clock.lap("heads")
    return accepted + [new_root], new_root, cands, rows


def _draft_sizes(tree: Tree, tokens: np.ndarray, drafts: list[int], branching: bool) -> tuple[np.ndarray, int, int]:
    """``(sizes, shared, agree)``: ``sizes[k]`` the tokens a step verifies with the first k of
    ``drafts`` grafted (:func:`graft_chain`; -1: a cut not to take), ``shared`` how many leading drafts the tree's nodes
    already hold, ``agree`` whether the first is a head's candidate there (0: no; 1: a lower-ranked
    one; 2: the top one)."""
    followed = follow_drafts(tree, tokens, drafts)
    shared = len(followed)
    agree = 0 if not shared else 2 if tree.node_rank[followed[0]] == 0 else 1
    k = np.arange(len(drafts) + 1)
    if branching:
        return tree.num_nodes + np.maximum(0, k - shared), shared, agree
    # a chain engine: past the shared prefix the drafts replace the chain's deeper nodes, so a draft
    # that leaves the chain may not end before it (-1: not allowed; it would swap the heads' chain for less)
    sizes = np.where(k <= shared, tree.num_nodes, 1 + k)
    return np.where((k > shared) & (1 + k < tree.num_nodes), -1, sizes), shared, agree


def _verify(backend, tokens, tree, cfg, rng, clock, stats, q=None, stored=False, noise=None, pen=None):
    """Verify every node in one forward (position = cache length + depth), accept (greedy: the
    longest path the backbone agrees with; exact: the coupled walk (``noise``) or the tree sampling
    walk; or typical), keep only the accepted path's cache entries. Returns (accepted path, next root,
    the logits rows of the emitted tokens, the path's, where ``cfg.logprobs`` asks for them, else None;
    unpenalized). ``pen``: the acceptance reads the penalized logits (:class:`Penalties`)."""
    start = backend.cache_len
    stats.nodes += tree.num_nodes
    if _draws_only(cfg, pen, noise):  # the drawn tokens alone (an engine may screen its lm_head)
        # coupled sampling: a node's row draws its child's token, with the noise of the child's position;
        # a grammar: each row's draw among what the grammar allows after the row's own path
        g = None if noise is None else noise.rows(start + tree.position_ids + 1)
        allowed = None if pen is None else pen.masks(tree.num_nodes, tree, tokens)
        best = backend.forward_argmax(tokens, start + tree.position_ids, tree.attn_mask, noise=g,
                                      temperature=cfg.temperature, allowed=allowed)  # fmt: skip
        clock.lap("engine")
        # greedy verification (of the perturbed logits, coupled: accept_coupled's walk). A row the
        # engine left unsettled (-1) accepts no child: the path may end there, still exactly the
        # plain decode's (fewer tokens at most); only the path's last row must then be settled
        path = accept_greedy_tokens(tokens, best, tree)
        new_root = settled(backend, best, int(path[-1]))
        raw = None
    else:
        raw = backend.forward(tokens, start + tree.position_ids, tree.attn_mask)
        clock.lap("engine")
        path, new_root = _accept(raw, tokens, tree, cfg, rng, q, noise, pen, start)
    clock.lap("acceptance")
    taken = int(np.count_nonzero(tree.node_head[path[1:]] < 0))  # lookup-only nodes: head -1
    stats.lookup_accepted += taken
    if stored:  # the lookup's drafts came from the datastore
        stats.datastore_accepted += taken
    rows = raw[path] if raw is not None and cfg.logprobs is not None else None  # a copy: a backend may reuse its buffer
    backend.commit(path)
    clock.lap("kv_update")
    return path, new_root, rows


def settled(backend: Backend, best: np.ndarray, row: int) -> int:
    """``best[row]`` of a ``forward_argmax``, or where the backend left it unsettled (-1), its
    ``settle_argmax`` (before the forward is committed)."""
    token = int(best[row])
    return token if token >= 0 else backend.settle_argmax(row)


def _draws_only(cfg: DecodeConfig, pen, noise: PositionNoise | None) -> bool:
    """Whether a step reads only the tokens the backbone draws, one per row: greedy's argmax, or
    coupled sampling's (``noise``) argmax of ``logits / T + g`` without top-k / top-p; a grammar's
    mask but no penalties, no logprobs (Backend.forward_argmax, its ``allowed``)."""
    if (pen is not None and not getattr(pen, "masks_only", False)) or cfg.logprobs is not None:
        return False
    if cfg.temperature < GREEDY_BELOW:
        return True
    return noise is not None and not cfg.top_k and cfg.top_p >= 1.0


def _accept(raw, tokens, tree, cfg, rng, q, noise, pen, start):
    """(accepted path, next root) from a verification's logits ``raw``."""
    logits = raw if pen is None else pen.apply(raw, tree, tokens)
    if cfg.temperature < GREEDY_BELOW:
        path = accept_greedy(tokens, logits, tree)
        new_root = select_root(logits[path[-1]], cfg, rng)
    elif noise is not None:
        path, new_root = accept_coupled(tokens, logits, tree, cfg, noise, start)
    elif cfg.acceptance == "exact":
        path, new_root = accept_exact(tokens, logits, tree, cfg, rng, q)
    else:
        path = accept_typical(tokens, logits, tree, cfg)
        new_root = select_root(logits[path[-1]], cfg, rng)
    return path, new_root


def _branching(backend, cfg) -> bool:
    """Whether a step may verify a branching tree: engines exact only for chains (Backend.exact_branching)
    keep chains unless the acceptance is lossy anyway."""
    return backend.exact_branching or not _exact(cfg)


def _dynamic_step(backend, root, index, state, cfg, rng, clock, lookup, stats, noise, budget, pen=None):
    """One step of a dynamic tree (runtime.dynamic): draft, grow this step's tree from the heads'
    and the lookup's candidates, verify, accept, keep the accepted path's cache entries. (Coupled
    sampling verifies with ``noise``; the drafts are ranked without it, by their probabilities.)
    ``budget``: the most tokens the step may verify (the backend's, read once a step)."""
    heads_s = 0.0
    temperature = 1.0 if cfg.temperature < GREEDY_BELOW else cfg.temperature
    width = state.policy.width
    if backend.spec.medusa_head_type == "hydra":
        K = backend.spec.num_medusa_heads

        def drafts(d, rows, paths):
            nonlocal heads_s
            t = time.perf_counter()
            ids = np.zeros((len(rows), K), dtype=np.int64)
            ids[:, :d] = paths
            out = dynamic.softmax_top(backend.draft_logits(index, ids, np.full(len(rows), d)), width, temperature)
            heads_s += time.perf_counter() - t
            return out
    else:
        heads = backend.head_logits(index)
        clock.lap("heads")
        ranked: dict[int, tuple] = {}  # per depth, ranked the first time the tree reaches it

        def drafts(d, rows, paths):
            if d not in ranked:
                ranked[d] = dynamic.softmax_top(heads[d - 1 : d], width, temperature)
            top, prob = ranked[d]
            return np.broadcast_to(top, (len(rows), width)), np.broadcast_to(prob, (len(rows), width))

    chain, n = lookup.propose_row(cfg.lookup) if lookup is not None else ([], 0)
    branching = _branching(backend, cfg)
    call_cost = state.policy.cost.heads if backend.spec.medusa_head_type == "hydra" else 0.0  # a call per depth
    built = dynamic.build(state, root, drafts, chain, n, budget, branching, call_cost)
    tree, tokens = built.tree, built.tokens
    clock.lap("candidates")
    stats.times["candidates"] -= heads_s
    stats.times["heads"] += heads_s
    stored = False
    if (tree.node_head[1:] < 0).any():  # lookup-only nodes were kept
        stats.lookup_steps += 1
        stored = from_datastore(n)
        stats.datastore_steps += stored
    path, new_root, rows = _verify(backend, tokens, tree, cfg, rng, clock, stats, stored=stored, noise=noise, pen=pen)
    dynamic.observe(state, built, path)
    return [int(t) for t in tokens[path[1:]]] + [new_root], new_root, int(path[-1]), rows


def _plain_step(backend, root, cfg, rng, clock, noise=None, pen=None):
    pos = backend.cache_len
    if _draws_only(cfg, pen, noise):
        g = None if noise is None else noise.rows([pos + 1])
        best = backend.forward_argmax(np.array([root]), np.array([pos]), np.ones((1, 1), dtype=bool), noise=g,
                                      temperature=cfg.temperature, allowed=None if pen is None else pen.masks(1))  # fmt: skip
        new_root = settled(backend, best, 0)
        clock.lap("engine")
        backend.commit(np.array([0]))
        clock.lap("kv_update")
        return [new_root], new_root, None
    logits = backend.forward(np.array([root]), np.array([pos]), np.ones((1, 1), dtype=bool))
    clock.lap("engine")
    new_root = select_root(logits[0] if pen is None else pen.apply(logits[:1])[0], cfg, rng, noise, pos + 1)
    clock.lap("acceptance")
    rows = logits[:1].copy() if cfg.logprobs is not None else None
    backend.commit(np.array([0]))
    clock.lap("kv_update")
    return [new_root], new_root, rows


@dataclass
class DecodeResult:
    tokens: list[int]
    stats: DecodeStats


def decode(backend: Backend, prompt_ids, cfg: DecodeConfig, tree: Tree | None = None, decode_text=None,
           datastore: Datastore | None = None, cost: dynamic.CostModel | None = None,
           reuse: int = 0) -> DecodeResult:  # fmt: skip
    """Run :func:`decode_steps` to the end: all new tokens and the statistics."""
    tokens: list[int] = []
    stats = DecodeStats()
    for event in decode_steps(backend, prompt_ids, cfg, tree, decode_text, datastore, cost, reuse):
        tokens.extend(event.tokens)
        stats = event.stats
    return DecodeResult(tokens, stats)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if len(diff) else n


def check_fits(backend: Backend, prompt) -> None:
    """The prompt is token ids of this model, and at least one token fits after it."""
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 1 or len(prompt) == 0:
        raise MedusaError("the prompt must be a non-empty list of token ids")
    if prompt.min() < 0 or prompt.max() >= backend.spec.vocab_size:
        raise MedusaError(
            f"prompt token ids must lie in [0, {backend.spec.vocab_size}); got {prompt.min()}..{prompt.max()}"
        )
    if len(prompt) >= backend.max_context:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens but the context holds {backend.max_context}: "
            "shorten the prompt (at least one token must fit after it)"
        )


def _emit(out: list[int], emitted: list[int], cfg: DecodeConfig, stats: DecodeStats, decode_text) -> bool:
    """Append ``emitted`` to ``out`` (in place, trimming it); True when decoding must stop."""
    for i, tok in enumerate(emitted):
        out.append(tok)
        if tok in cfg.eos_token_ids:
            stats.finish_reason = "eos"
        elif len(out) >= cfg.max_new_tokens:
            stats.finish_reason = "length"
        else:
            continue
        del emitted[i + 1 :]
        break
    if cfg.stop_strings and decode_text is not None:
        # A stop string that ends before an EOS in the same step wins, and one the length cut's last token
        # completes is a stop too (as OpenAI's servers and vLLM report it): the text ends before it.
        cut = _stop_string_cut(out, emitted, cfg.stop_strings, decode_text)
        if cut is not None and (stats.finish_reason != "eos" or cut < len(out)):
            drop = len(out) - cut
            del out[cut:]
            del emitted[len(emitted) - drop :]
            stats.finish_reason = "stop_string"
    stats.new_tokens = len(out)
    return bool(stats.finish_reason)


def _stop_string_cut(out, emitted, stops, decode_text) -> int | None:
    """Smallest token count (within the new tokens) whose text contains a stop string. Only a window
    is decoded, the new tokens and enough before them to hold any stop string that ends in them, so a
    step's cost does not grow with the answer (the whole answer decoded every step took 1.6 ms at
    8,000 tokens for SmolLM2's tokenizer)."""
    start = _stop_window(out, len(out) - len(emitted), stops, decode_text)
    if not any(s in decode_text(out[start:]) for s in stops):
        return None
    for cut in range(len(out) - len(emitted) + 1, len(out) + 1):
        if any(s in decode_text(out[start:cut]) for s in stops):
            return cut
    return len(out)


def _stop_window(out, new: int, stops, decode_text) -> int:
    """Where to start decoding so that the text before the new tokens (from ``new`` on) holds the
    ``len(stop)`` characters a stop string ending in them can reach back, plus a margin for what a
    window's first token loses (a stripped leading space, a character cut into replacement
    characters): a token is at least a byte and a character at most 4, so 4 tokens a character, and
    twice as far back while special tokens (no text) leave less. 0 where a stop holds a replacement
    character (a cut character could make one)."""
    reach = max(len(s) for s in stops) + 4
    if any("\ufffd" in s for s in stops):
        return 0
    back = 4 * reach
    while True:
        start = max(0, new - back)
        if start == 0 or len(decode_text(out[start:new])) >= reach:
            return start
        back *= 2
