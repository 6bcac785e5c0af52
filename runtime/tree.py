"""Medusa trees: validation and the buffers one verification step needs (numpy only).

A tree is a set of *paths*. The path ``(i, j)`` is the candidate made of rank ``i`` of
head 1 followed by rank ``j`` of head 2, hung below the root (the backbone's own next
token). Every path is one node of the tree; node 0 is the root.

Node order is the official Medusa one (``generate_medusa_buffers``): the root, then the
paths sorted by length and, within one length, lexicographically. The attention mask,
position ids and the set of retrieve rows therefore equal the official buffers.

Two things differ from the official code on purpose:

* each head gets its own top-k (``Tree.topk[h]`` = largest rank the tree uses at depth
  h+1, plus one) instead of a global ``TOPK = 10``;
* ``retrieve_indices`` is padded with ``PAD = -1`` and comes with ``path_lengths``;
  ``-1`` is never used as an index (numpy would read it as "the last node").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import TreeError
from runtime.paths import not_a_file, read_text

PAD = -1


@dataclass(frozen=True)
class Tree:
    """Buffers of one tree. ``N`` = number of paths + 1 (the root)."""

    name: str
    paths: tuple[tuple[int, ...], ...]  # sorted, official order (node i+1 <-> paths[i])
    attn_mask: np.ndarray  # bool [N, N]: node sees the root, its ancestors and itself
    position_ids: np.ndarray  # int64 [N]: depth, root 0
    retrieve_indices: np.ndarray  # int64 [P, D+1]: one row per leaf path, PAD-padded
    path_lengths: np.ndarray  # int64 [P]: real (non-PAD) entries of each retrieve row
    parent: np.ndarray  # int64 [N]: parent node, -1 for the root
    node_head: np.ndarray  # int64 [N]: head (0-based) whose candidate the node carries, -1 root
    node_rank: np.ndarray  # int64 [N]: rank within that head's top-k, -1 root
    topk: tuple[int, ...] = field(default=())  # per head: how many ranks the tree reads

    @property
    def num_nodes(self) -> int:
        return len(self.position_ids)

    @property
    def depth(self) -> int:
        """Number of heads the tree needs (longest path)."""
        return len(self.topk)

    @property
    def is_chain(self) -> bool:
        """One node per depth: every node's ancestors are the nodes just before it."""
        return self.num_nodes == int(self.position_ids.max()) + 1

    def __repr__(self) -> str:  # arrays make the dataclass repr unreadable
        return f"Tree({self.name!r}, nodes={self.num_nodes}, depth={self.depth}, topk={self.topk})"


def validate_paths(paths: object, num_heads: int | None = None, name: str = "tree") -> list[tuple[int, ...]]:
    """Check a list of paths and return them as tuples; raise TreeError naming the bad path."""
    if not isinstance(paths, (list, tuple)) or not paths:
        raise TreeError(f"{name}: expected a non-empty list of paths such as [[0], [0, 0], [1]], got {paths!r:.80}")
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    for raw in paths:
        if not isinstance(raw, (list, tuple)) or not raw:
            raise TreeError(f"{name}: path {raw!r} is not a non-empty list of ranks")
        for r in raw:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
                raise TreeError(f"{name}: path {list(raw)} has a rank that is not an integer: {r!r}")
            if r < 0:
                raise TreeError(f"{name}: path {list(raw)} has a negative rank {r}")
        p = tuple(int(r) for r in raw)
        if p in seen:
            raise TreeError(f"{name}: path {list(p)} appears more than once")
        seen.add(p)
        out.append(p)
    depth = max(len(p) for p in out)
    present_depths = {len(p) for p in out}
    for d in range(1, depth + 1):
        if d not in present_depths:
            # name the first path that jumps over the missing depth
            offender = min((p for p in out if len(p) > d), key=lambda p: (len(p), p))
            raise TreeError(
                f"{name}: path {list(offender)} has depth {len(offender)}, but no path has depth {d} (gap in depth)"
            )
    for p in out:
        for k in range(1, len(p)):
            if p[:k] not in seen:
                raise TreeError(
                    f"{name}: path {list(p)} has no parent: its prefix {list(p[:k])} is missing "
                    "(a tree must be prefix-closed)"
                )
    if num_heads is not None and depth > num_heads:
        longest = max(out, key=len)
        raise TreeError(
            f"{name}: path {list(longest)} has depth {depth} and needs {depth} Medusa heads, "
            f"but the model has {num_heads}"
        )
    return out


def build_tree(paths: Iterable[Sequence[int]], name: str = "tree", num_heads: int | None = None) -> Tree:
    """Validate ``paths`` and build every buffer a verification step needs."""
    checked = validate_paths(list(paths) if not isinstance(paths, (list, tuple)) else paths, num_heads, name)
    ordered = sorted(checked, key=lambda p: (len(p), p))
    n = len(ordered) + 1
    index = {p: i + 1 for i, p in enumerate(ordered)}
    index[()] = 0

    parent = np.full(n, -1, dtype=np.int64)
    head = np.full(n, -1, dtype=np.int64)
    rank = np.full(n, -1, dtype=np.int64)
    for p, i in index.items():
        if p:
            parent[i] = index[p[:-1]]
            head[i] = len(p) - 1
            rank[i] = p[-1]
    topk = tuple(int(rank[head == h].max()) + 1 for h in range(max(len(p) for p in ordered)))
    return _tree_from_parents(name, parent, head, rank, topk, paths=tuple(ordered))


def graft_chain(tree: Tree, tokens: np.ndarray, drafts, branching: bool = True) -> tuple[Tree, np.ndarray, int]:
    """``tree`` with a chain of draft tokens (the tokens after the root, e.g. from context
    lookup) merged in: the chain follows existing nodes while their tokens agree, then
    hangs the rest below the last one as new nodes (so no node gets two children with the
    same token: siblings stay distinct, as exact sampling needs). Returns
    ``(tree, tokens, nodes added)``; the new nodes come last (parents before children), so
    the tree's own nodes keep their indices.

    ``branching=False`` (engines where only chain trees are exact, a chain ``tree``): the
    result stays a chain: where the drafts leave the tree's chain, the tree's nodes below
    that point are dropped and the drafts continue instead.
    """
    parent = [int(p) for p in tree.parent]
    toks = [int(t) for t in tokens]
    head = [int(h) for h in tree.node_head]
    rank = [int(r) for r in tree.node_rank]
    followed = follow_drafts(tree, tokens, drafts)
    node = followed[-1] if followed else 0
    rest = [int(d) for d in drafts[len(followed) :]]
    if rest and not branching:  # cut the chain below `node` (a chain's nodes are in depth order)
        parent, toks, head, rank = parent[: node + 1], toks[: node + 1], head[: node + 1], rank[: node + 1]
    for t in rest:
        parent.append(node)
        toks.append(t)
        head.append(-1)
        rank.append(-1)
        node = len(parent) - 1
    added = len(rest)
    if not added and len(parent) == tree.num_nodes:
        return tree, np.asarray(toks, dtype=np.int64), 0
    return (
        _tree_from_parents(f"{tree.name}+lookup", parent, head, rank, tree.topk),
        np.asarray(toks, dtype=np.int64),
        added,
    )


def follow_drafts(tree: Tree, tokens: np.ndarray, drafts) -> list[int]:
    """The nodes holding the leading ``drafts`` the tree already has (each the child, with that
    token, of the one before; the root's children first): as many as the tree shares with the
    drafts. What :func:`graft_chain` follows before it adds nodes."""
    tokens = np.asarray(tokens)
    nodes: list[int] = []
    for t in drafts:
        child = np.flatnonzero((tree.parent == (nodes[-1] if nodes else 0)) & (tokens == int(t)))
        if not len(child):
            break
        nodes.append(int(child[0]))
    return nodes


def _tree_from_parents(name: str, parent, head, rank, topk: tuple[int, ...], paths: tuple = ()) -> Tree:
    """The buffers of a tree given as a parent list (parents before children): the mask (a
    node sees its ancestors and itself), depths, and one retrieve row per leaf, in node order."""
    n = len(parent)
    par = np.asarray(parent, dtype=np.int64)
    depth = np.zeros(n, dtype=np.int64)
    mask = np.zeros((n, n), dtype=bool)
    mask[0, 0] = True
    for i in range(1, n):
        depth[i] = depth[par[i]] + 1
        mask[i] = mask[par[i]]
        mask[i, i] = True
    has_child = np.zeros(n, dtype=bool)
    has_child[par[par >= 0]] = True
    leaves = [i for i in range(n) if not has_child[i]]
    retrieve = np.full((len(leaves), int(depth.max()) + 1), PAD, dtype=np.int64)
    lengths = np.zeros(len(leaves), dtype=np.int64)
    for row, leaf in enumerate(leaves):
        nodes = [leaf]
        while nodes[-1] != 0:
            nodes.append(int(par[nodes[-1]]))
        retrieve[row, : len(nodes)] = nodes[::-1]
        lengths[row] = len(nodes)
    return Tree(
        name=name,
        paths=paths,
        attn_mask=mask,
        position_ids=depth,
        retrieve_indices=retrieve,
        path_lengths=lengths,
        parent=par,
        node_head=np.asarray(head, dtype=np.int64),
        node_rank=np.asarray(rank, dtype=np.int64),
        topk=topk,
    )


def chain(depth: int) -> list[list[int]]:
    """The chain ``[[0], [0, 0], ...]``: only the top-1 of each head (vLLM-style Medusa)."""
    return [[0] * d for d in range(1, depth + 1)]


def load_tree(spec: str | Path | Sequence[Sequence[int]] | Tree, num_heads: int | None = None) -> Tree:
    """A tree from a name in ``tree_configs/``, a JSON file path, or a list of paths.

    ``num_heads`` (the model's head count) rejects trees deeper than the model can fill.
    """
    if isinstance(spec, Tree):
        if num_heads is not None:
            validate_paths([list(p) for p in spec.paths], num_heads, spec.name)
        return spec
    if isinstance(spec, (list, tuple)):
        return build_tree(spec, name="custom", num_heads=num_heads)
    import tree_configs

    text = str(spec)
    path = Path(text)
    if isinstance(spec, str) and text in tree_configs.available():  # a shipped name wins over a stray file
        name, paths = _read_tree_file(tree_configs.path_of(text))
    elif path.suffix == ".json" or os.path.exists(path):  # os.path: False, not OSError, for a name too long
        if not os.path.isfile(path):
            raise TreeError(f"tree file {path} {not_a_file(path)}")
        name, paths = _read_tree_file(path)
    else:
        raise TreeError(
            f"unknown tree {text!r}: give a name from tree_configs ({', '.join(tree_configs.available())}), "
            "a JSON file, or a list of paths"
        )
    return build_tree(paths, name=name, num_heads=num_heads)


def _read_tree_file(path: Path) -> tuple[str, Any]:
    try:
        data = json.loads(read_text(path, error=TreeError))
    except json.JSONDecodeError as e:
        raise TreeError(f"tree file {path} is not valid JSON: {e}") from None
    if isinstance(data, list):
        return Path(path).stem, data
    if not isinstance(data, dict) or "paths" not in data:
        raise TreeError(f"tree file {path} must hold {{'name': ..., 'paths': [[0], [0, 0], ...]}}")
    return str(data.get("name", Path(path).stem)), data["paths"]
