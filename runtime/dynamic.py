"""Dynamic trees: a new tree every step, sized by the drafts' confidence and the step's cost.

A static tree pays for every node every step, however unsure the heads are. Here each step
grows the tree the heads (and the context lookup) propose *now* and keeps only the nodes
worth their cost:

* **value of a node** = estimated probability that the backbone accepts its whole path:
  the product, along the path, of each draft's calibrated probability (a head's softmax
  probability of its token, mapped through per-depth calibration counts kept during the
  call; a lookup token's running hit rate per matched n-gram length and position). With
  distinct siblings the expected tokens a step emits are ``1 + sum of the values`` of the
  tree's nodes, so the best tree of n nodes is the n most valuable (a child never outranks
  its parent, so they form a tree).
* **cost** of verifying N tokens, relative to a one-token step: the latency profile
  (``medusa-run profile ARTIFACT`` writes ``latency_profile.json`` into the artifact; without
  one, :data:`DEFAULT_RELATIVE_COST`, the fused fp32 graph on 2 CPU cores).
* **how many nodes**: the step maximises ``1 + sum(values) - lam * cost(N)`` where ``lam`` is
  the call's running rate (tokens per unit of cost so far): a node must bring at least
  ``lam`` times what it costs (Dinkelbach's rule for maximising tokens / cost over the whole
  call). With unsure drafts the step shrinks to the root alone: a plain step.

The tree depends only on the drafts and on the call's own history (never on timings), so a
seed reproduces a run; greedy output stays exactly plain decoding's and exact sampling keeps
the backbone's law, whatever tree each step verifies (the acceptance rules do not assume a
fixed tree). numpy only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import ConfigError
from runtime.lookup import LAM_PRIOR, MAX_DRAFT, ROWS, row_label
from runtime.paths import read_text
from runtime.tree import Tree, _tree_from_parents

DYNAMIC = "dynamic"
DEFAULT_MAX_NODES = 12  # drafted nodes a step at most (the root not counted)
DEFAULT_WIDTH = 4  # candidates a head proposes below one parent
# parents drafted below per depth: a Hydra heads call costs a projection per row (~0.15 ms each on
# SmolLM2's CPU), and nodes below the 4th most valuable of a depth rarely make the tree
DEFAULT_BEAM = 4
# the fused fp32 graph of SmolLM2-135M on 2 CPU cores, 256 cached tokens (`medusa-run profile`, 2026-12-01,
# docs/results/latency_profile.json): flat within blocks of 6 rows, a jump after each
DEFAULT_RELATIVE_COST = {
    1: 1.0, 2: 1.1995, 3: 1.1848, 4: 1.3071, 5: 1.24, 6: 1.2718, 7: 1.5745, 8: 1.6514, 9: 1.6461, 10: 1.7329,
    11: 1.7426, 12: 1.8282, 13: 2.0427, 14: 2.0805, 15: 2.1097, 16: 2.2109, 20: 2.588, 24: 2.8846, 32: 3.6688,
    48: 5.0181, 64: 6.3021,
}  # fmt: skip
DEFAULT_HEADS_COST = 0.0902
# calibration: a head probability's bin edges, and how many pseudo-observations the raw
# probability counts for before a bin's own hits take over
BIN_EDGES = np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
PRIOR_WEIGHT = 4.0
_GRID = np.append(BIN_EDGES, 0.999)  # a probability in every bin (the most confident draft's calibrated rate)
LOOKUP_ROWS = 2 * ROWS  # calibration rows: the context's matches, then the datastore's
LOOKUP_PRIOR = 0.4  # a lookup token's acceptance before the call has seen any


@dataclass(frozen=True)
class CostModel:
    """Relative cost of verifying N tokens (N = 1 costs 1), linear between measured sizes."""

    relative: Mapping[int, float]
    heads: float = DEFAULT_HEADS_COST  # one heads call (Hydra: one level)
    source: str = "default"
    # the most rows a call screens its lm_head at where the profile measured it (Backend.screen_max_rows)
    screen_max_rows: int | None = None

    def __post_init__(self):
        sizes = sorted(self.relative)
        if not sizes or sizes[0] != 1 or any(not np.isfinite(self.relative[n]) or self.relative[n] <= 0 for n in sizes):
            raise ConfigError(
                f"cost profile ({self.source}): needs positive costs for N = 1 and up, got {dict(self.relative)}"
            )

    def table(self, max_n: int) -> np.ndarray:
        """``cost[N]`` for N = 0 .. max_n (cost[0] unused), interpolated, extrapolated past the last size."""
        sizes = np.array(sorted(self.relative), dtype=np.float64)
        costs = np.array([self.relative[int(n)] for n in sizes], dtype=np.float64)
        base = costs[0]
        n = np.arange(max_n + 1, dtype=np.float64)
        out = np.interp(n, sizes, costs / base)
        if len(sizes) > 1:  # np.interp is flat past the last size: continue its last slope
            slope = (costs[-1] - costs[-2]) / base / (sizes[-1] - sizes[-2])
            out = np.where(n > sizes[-1], costs[-1] / base + slope * (n - sizes[-1]), out)
        out = np.maximum.accumulate(out)  # a measured dip is noise: more tokens never cost less
        out[0] = 0.0
        return out

    @classmethod
    def from_profile(cls, path: str | Path) -> CostModel:
        """From a ``medusa-run profile`` output (``relative_cost`` by N, ``heads_relative_cost``)."""
        try:
            data = json.loads(read_text(path))
            rel = {int(k): float(v) for k, v in data["relative_cost"].items()}
            heads = float(data.get("heads_relative_cost", DEFAULT_HEADS_COST))
            screen = data.get("screen_max_rows")
            screen = None if screen is None else int(screen)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}: not a latency profile (medusa-run profile writes one): {e}") from None
        return cls(rel, heads, source=str(path), screen_max_rows=screen)


DEFAULT_COST = CostModel(DEFAULT_RELATIVE_COST, DEFAULT_HEADS_COST, source="default (fused fp32, 2 CPU cores)")


@dataclass(frozen=True)
class Calibration:
    """Hit counts of drafts, measured by ``medusa-run calibrate`` on prompts of the user's choice
    (saved as ``draft_calibration.json`` in the artifact): per head depth and raw-probability bin
    (:data:`BIN_EDGES`), and per lookup n-gram length and chain position. A call starts from these
    rates (as :data:`CALIBRATION_WEIGHT` observations per cell at most) and keeps counting."""

    hits: np.ndarray  # [depth, bins]
    trials: np.ndarray
    lookup_hits: np.ndarray  # [LOOKUP_ROWS, 65]: per source and match length (lookup.ROWS), per chain position
    lookup_trials: np.ndarray
    source: str = ""

    def to_json(self) -> dict:
        return {
            "bin_edges": BIN_EDGES.tolist(),
            "hits": self.hits.tolist(),
            "trials": self.trials.tolist(),
            "lookup_hits": self.lookup_hits.tolist(),
            "lookup_trials": self.lookup_trials.tolist(),
            "source": self.source,
        }

    def summary(self) -> str:
        """Hit rate per head depth and raw-probability bin, and per lookup n-gram length and position."""
        lo = np.concatenate([[0.0], BIN_EDGES])
        lines = ["heads: acceptance by the draft's own probability (trials)"]
        for d in range(len(self.hits)):
            cells = [
                f"{lo[b]:.2f}+ {self.hits[d, b] / self.trials[d, b]:.2f} ({int(self.trials[d, b])})"
                for b in range(len(lo))
                if self.trials[d, b]
            ]
            lines.append(f"  depth {d + 1}: " + ", ".join(cells))
        lines.append("context lookup and datastore: acceptance by matched n-gram length and chain position (trials)")
        for row in range(1, LOOKUP_ROWS):
            cells = [
                f"pos {j} {self.lookup_hits[row, j] / self.lookup_trials[row, j]:.2f} ({int(self.lookup_trials[row, j])})"
                for j in range(1, 65)
                if self.lookup_trials[row, j]
            ]
            if cells:
                lines.append(f"  {row_label(row)}: " + ", ".join(cells))
        return "\n".join(lines)

    @classmethod
    def from_json(cls, data: dict, where: str = "calibration") -> Calibration:
        try:
            if list(data["bin_edges"]) != BIN_EDGES.tolist():
                raise ValueError("its probability bins differ from this runtime's (re-run medusa-run calibrate)")
            arrays = [np.asarray(data[k], dtype=np.float64) for k in ("hits", "trials", "lookup_hits", "lookup_trials")]
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: not a draft calibration (medusa-run calibrate writes one): {e}") from None
        hits, trials, lh, lt = arrays
        if lh.shape == lt.shape == (ROWS, 65):  # written before the datastore rows existed
            lh, lt = (np.concatenate([a, np.zeros((LOOKUP_ROWS - ROWS, 65))]) for a in (lh, lt))
        if (
            hits.ndim != 2 or hits.shape != trials.shape or hits.shape[1] != len(BIN_EDGES) + 1
            or lh.shape != (LOOKUP_ROWS, 65) or lt.shape != (LOOKUP_ROWS, 65)
            or any(not np.all(np.isfinite(a)) or np.any(a < 0) for a in arrays)
            or np.any(hits > trials) or np.any(lh > lt)
        ):  # fmt: skip
            raise ConfigError(f"{where}: malformed draft calibration (shapes, or hits above trials)")
        return cls(hits, trials, lh, lt, source=str(data.get("source", where)))


CALIBRATION_WEIGHT = 50.0
CALIBRATION_FILE = "draft_calibration.json"


@dataclass(frozen=True)
class DynamicTree:
    """The policy: passed where a static :class:`runtime.tree.Tree` goes (``tree="dynamic"``).

    ``num_nodes`` is the largest tree it may build (root included), what the context must
    hold; ``depth`` the heads it reads."""

    depth: int  # heads used (the model's head count)
    max_nodes: int = DEFAULT_MAX_NODES
    width: int = DEFAULT_WIDTH
    beam: int = DEFAULT_BEAM  # parents a depth's heads call drafts below (the most valuable)
    cost: CostModel = DEFAULT_COST
    calibration: Calibration | None = None  # measured hit rates the call starts from (else the raw probabilities)
    explore: bool = False  # calibrating: always build the max_nodes likeliest nodes (no cost rule)
    name: str = DYNAMIC
    paths: tuple = ()  # no fixed paths (the bench's summaries read this)
    is_chain: bool = False

    def __post_init__(self):
        checked = (("depth", self.depth), ("max_nodes", self.max_nodes), ("width", self.width), ("beam", self.beam))
        for what, v in checked:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"dynamic tree: {what} must be an integer >= 1, got {v!r}")

    @property
    def num_nodes(self) -> int:
        return self.max_nodes + 1

    def __repr__(self) -> str:
        return (
            f"DynamicTree(max_nodes={self.max_nodes}, width={self.width}, depth={self.depth}, cost={self.cost.source})"
        )


def parse_dynamic(
    spec: str, num_heads: int, cost: CostModel = DEFAULT_COST, calibration: Calibration | None = None
) -> DynamicTree:
    """``"dynamic"`` or ``"dynamic:N"`` (at most N drafted nodes a step), optionally ``@PROFILE``:
    a latency profile (JSON, ``medusa-run profile`` writes one) instead of ``cost``."""
    body, at, profile = spec.partition("@")
    if at:
        if not profile:
            raise ConfigError(f"tree {spec!r}: after '@' give a latency profile file")
        cost = CostModel.from_profile(profile)
    name, _, arg = body.partition(":")
    if name != DYNAMIC:
        raise ConfigError(f"not a dynamic tree: {spec!r}")
    max_nodes = DEFAULT_MAX_NODES
    if arg:
        if not (arg.isascii() and arg.isdigit()) or not 1 <= int(arg) <= MAX_DRAFT:
            raise ConfigError(
                f"tree {spec!r}: after 'dynamic:' give the most drafted nodes a step, 1 to {MAX_DRAFT}, e.g. dynamic:12"
            )
        max_nodes = int(arg)
    return DynamicTree(depth=num_heads, max_nodes=max_nodes, cost=cost, calibration=calibration, name=spec)


def read_calibration(path: str | Path) -> Calibration:
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the draft calibration: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a draft calibration (medusa-run calibrate writes one)")
    return Calibration.from_json(data, str(path))


def write_calibration(cal: Calibration, path: str | Path) -> Path:
    from runtime.paths import write_text_atomic

    return write_text_atomic(path, json.dumps(cal.to_json()) + "\n")  # never half-written


def is_dynamic(tree) -> bool:
    return isinstance(tree, DynamicTree)


# ---------------------------------------------------------------------------- per-call state


@dataclass
class DynamicState:
    """What one decode call has learned: calibration counts and its running rate."""

    policy: DynamicTree
    cost_table: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)  # [depth, bins]: head drafts accepted (their parent was)
    trials: np.ndarray = field(init=False)  # [depth, bins]: head drafts tried
    lookup_hits: np.ndarray = field(init=False)  # [n-gram length, position]
    lookup_trials: np.ndarray = field(init=False)
    tokens: float = LAM_PRIOR[0] * LAM_PRIOR[1]
    spent: float = LAM_PRIOR[1]

    def __post_init__(self):
        p = self.policy
        self.cost_table = p.cost.table(p.max_nodes + 1 + 64)
        nb = len(BIN_EDGES) + 1
        self.hits = np.zeros((p.depth, nb))
        self.trials = np.zeros((p.depth, nb))
        self.lookup_hits = np.zeros((LOOKUP_ROWS, 65))
        self.lookup_trials = np.zeros((LOOKUP_ROWS, 65))
        c = p.calibration
        if c is not None:  # measured rates, each cell worth at most CALIBRATION_WEIGHT observations
            d = min(p.depth, len(c.hits))
            scale = np.minimum(1.0, CALIBRATION_WEIGHT / np.maximum(c.trials[:d], 1))
            self.hits[:d] = c.hits[:d] * scale
            self.trials[:d] = c.trials[:d] * scale
            scale = np.minimum(1.0, CALIBRATION_WEIGHT / np.maximum(c.lookup_trials, 1))
            self.lookup_hits = c.lookup_hits * scale
            self.lookup_trials = c.lookup_trials * scale
        if p.explore:
            self.tokens, self.spent = 0.0, 1.0

    @property
    def lam(self) -> float:
        """Tokens per unit of cost so far (0 while exploring: every node pays)."""
        return 0.0 if self.policy.explore else self.tokens / self.spent

    def calibrated(self, depth: int, p: np.ndarray) -> np.ndarray:
        """P(accepted | parent accepted) for head drafts of ``depth`` (1-based) with raw probabilities ``p``."""
        b = np.digitize(p, BIN_EDGES)
        d = depth - 1
        return (self.hits[d, b] + PRIOR_WEIGHT * p) / (self.trials[d, b] + PRIOR_WEIGHT)

    def lookup_value(self, n: int, pos: int) -> float:
        """P(accepted | parent accepted) for the lookup chain's token at ``pos`` (1-based) whose chain
        matched on row ``n`` (:meth:`runtime.lookup.NgramLookup.propose_row`)."""
        n, pos = min(n, LOOKUP_ROWS - 1), min(pos, 64)
        return (self.lookup_hits[n, pos] + 2 * LOOKUP_PRIOR) / (self.lookup_trials[n, pos] + 2)


@dataclass
class Built:
    """One step's tree and what observing its outcome needs."""

    tree: Tree
    tokens: np.ndarray
    raw: np.ndarray  # head drafts' raw probabilities (nan: none)
    lookup_pos: np.ndarray  # position on the lookup chain (j: carries lookup[j - 1]; 0: none, or the root)
    lookup_n: int
    cost: float


DraftFn = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def build(
    state: DynamicState,
    root: int,
    drafts: DraftFn,
    lookup: list[int],
    lookup_n: int,
    room: int,
    branching: bool = True,
    call_cost: float = 0.0,
) -> Built:
    """This step's tree below ``root``.

    ``drafts(depth, parents, paths)`` -> ``(tokens [rows, width], probs [rows, width])``: the
    heads' best candidates at ``depth`` (1-based) below each parent node (``paths``: their
    token paths from the root, ``[rows, depth]``). ``lookup``: the context lookup's chain
    (its calibration row ``lookup_n``: the matched n-gram length, plus ``lookup.ROWS`` for a datastore draft). ``room``: the most tokens this step may verify.
    ``branching=False``: a chain (the likeliest candidate of each depth), for engines exact only
    for chains (``Backend.exact_branching``). ``call_cost``: the relative cost of each ``drafts``
    call after the first (Hydra heads: a heads call per depth; Medusa heads: 0, one call serves
    every depth): a depth is drafted only while its best possible child could pay for it.
    """
    p = state.policy
    lam = state.lam
    cost = state.cost_table
    limit = max(0, min(p.max_nodes, room - 1))
    floor = lam * float(np.min(np.diff(cost[1 : limit + 2]))) if limit else np.inf  # below it no node pays
    # per node: parent, token, value, raw head probability, head, rank, position on the lookup
    # chain (-1: not on it; 0: the root; j: carries lookup[j - 1])
    parent, toks, value, raw, head, rank = [-1], [root], [1.0], [np.nan], [-1], [-1]
    chain = [0 if lookup else -1]
    frontier = [0]
    calls = 0
    for d in range(1, max(p.depth, len(lookup)) + 1):
        if not frontier or limit == 0:
            break
        cand: dict[tuple[int, int], list] = {}  # (parent, token) -> [value, raw, head, rank, chain position]
        # the likeliest child a depth's heads could give (its best frontier node's value x the
        # calibrated rate of the most confident drafts) must pay for its node and for the call
        best_child = value[frontier[0]] * float(state.calibrated(d, _GRID).max()) if d <= p.depth else 0.0
        if d <= p.depth and (calls == 0 or best_child >= floor + lam * call_cost):
            calls += 1
            expand = frontier[: p.beam]  # frontier is sorted by value, best first
            rows = np.asarray(expand, dtype=np.int64)
            paths = np.asarray([_path(parent, toks, v) for v in expand], dtype=np.int64).reshape(len(expand), d)
            top, prob = drafts(d, rows, paths)
            vals = np.asarray(value)[rows][:, None] * state.calibrated(d, prob)
            for i, v in enumerate(expand):
                for r in range(top.shape[1]):
                    if vals[i, r] >= floor:
                        cand[(v, int(top[i, r]))] = [float(vals[i, r]), float(prob[i, r]), d - 1, r, -1]
        for v in frontier:
            j = chain[v]
            if 0 <= j < len(lookup):
                t = lookup[j]
                val = value[v] * state.lookup_value(lookup_n, j + 1)
                c = cand.get((v, t))
                if c is not None:  # a head drafted it too: one node, the better estimate
                    c[0] = max(c[0], val)
                    c[4] = j + 1
                elif val >= floor:
                    cand[(v, t)] = [val, np.nan, -1, -1, j + 1]
        if not cand:
            break
        # no level needs more than the whole tree; a chain keeps one node a level
        best = sorted(cand.items(), key=lambda kv: -kv[1][0])[: limit if branching else 1]
        frontier = []
        for (v, t), (val, pr, h, r, j) in best:
            parent.append(v)
            toks.append(t)
            value.append(val)
            raw.append(pr)
            head.append(h)
            rank.append(r)
            chain.append(j)
            frontier.append(len(parent) - 1)
    # the n most valuable nodes (a parent before its children), n chosen by the marginal rule
    vals = np.asarray(value)
    order = sorted(range(1, len(parent)), key=lambda i: (-vals[i], i))[:limit]
    gains = np.concatenate([[0.0], np.cumsum(vals[order])]) - lam * cost[1 : len(order) + 2]
    n = int(np.argmax(gains))
    keep = sorted(order[:n])
    index = {0: 0}
    for k, i in enumerate(keep, start=1):
        index[i] = k
    sel = [0] + keep
    tree = _tree_from_parents(
        DYNAMIC,
        [-1] + [index[parent[i]] for i in keep],
        [head[i] for i in sel],
        [rank[i] for i in sel],
        (),
    )
    chain_pos = np.asarray([max(chain[i], 0) for i in sel], dtype=np.int64)
    return Built(
        tree=tree,
        tokens=np.asarray([toks[i] for i in sel], dtype=np.int64),
        raw=np.asarray([raw[i] for i in sel], dtype=np.float64),
        lookup_pos=chain_pos,
        lookup_n=lookup_n,
        cost=float(cost[n + 1]) + p.cost.heads + call_cost * max(0, calls - 1),
    )


def _path(parent: list[int], toks: list[int], v: int) -> list[int]:
    out = []
    while v >= 0:
        out.append(toks[v])
        v = parent[v]
    return out[::-1]


def observe(state: DynamicState, built: Built, path: np.ndarray) -> None:
    """Update the calibration with the step's outcome: every child of an accepted node was
    tried; it succeeded if it is on the accepted ``path``. And the running rate."""
    tree = built.tree
    on_path = np.zeros(tree.num_nodes, dtype=bool)
    on_path[path] = True
    tried = np.flatnonzero(on_path[tree.parent.clip(0)] & (tree.parent >= 0))
    for c in tried:
        ok = float(on_path[c])
        h = int(tree.node_head[c])
        if h >= 0:
            pr = built.raw[c]
            b = int(np.digitize(pr, BIN_EDGES))
            state.hits[h, b] += ok
            state.trials[h, b] += 1
        j = int(built.lookup_pos[c])
        if j:
            n, j = min(built.lookup_n, LOOKUP_ROWS - 1), min(j, 64)
            state.lookup_hits[n, j] += ok
            state.lookup_trials[n, j] += 1
    state.tokens += len(path)  # the accepted drafts and the next root
    state.spent += built.cost


def softmax_top(logits: np.ndarray, width: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the ``width`` likeliest tokens, best first, and their softmax probabilities at
    ``temperature`` (a draft vocabulary's filler, the dtype's lowest value, gets 0)."""
    logits = np.asarray(logits, dtype=np.float64 if temperature != 1.0 else np.float32)
    if temperature != 1.0:
        logits = logits / temperature
    k = min(width, logits.shape[-1])
    idx = np.argpartition(logits, -k, axis=-1)[:, -k:]
    sub = np.take_along_axis(logits, idx, axis=-1)
    order = np.argsort(-sub, axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=-1)
    sub = np.take_along_axis(sub, order, axis=-1)
    m = sub[:, :1]
    z = np.exp(logits - m).sum(axis=-1, keepdims=True, dtype=np.float64)
    return idx.astype(np.int64), (np.exp((sub - m).astype(np.float64)) / z)


def calibration_from(states, source: str = "") -> Calibration:
    """A :class:`Calibration` from the observations of finished calls (their states, explored
    without a calibration of their own, so the counts are observations only)."""
    states = [s for s in states if s is not None]
    if not states:
        raise ConfigError("no dynamic-tree step ran: nothing to calibrate from")
    depth = max(len(s.hits) for s in states)
    nb = len(BIN_EDGES) + 1
    hits, trials = np.zeros((depth, nb)), np.zeros((depth, nb))
    lh, lt = np.zeros((LOOKUP_ROWS, 65)), np.zeros((LOOKUP_ROWS, 65))
    for s in states:
        if s.policy.calibration is not None:
            raise ConfigError("calibrate from calls that started without a calibration")
        hits[: len(s.hits)] += s.hits
        trials[: len(s.trials)] += s.trials
        lh += s.lookup_hits
        lt += s.lookup_trials
    return Calibration(hits, trials, lh, lt, source=source)
