"""The small interface the decode loop drives, and a numpy KV cache shared by backends.

A backend holds one sequence's KV cache (batch 1) and offers three calls:

* ``forward(input_ids [n], position_ids [n], tree_mask [n, n]) -> logits [n, V]``
  runs the backbone over ``n`` new tokens on top of the cache. The new tokens' KV entries
  are *staged*, not yet in the cache. :class:`Backend` checks the inputs against the graph
  contract (shapes, dtypes, room) for every backend; subclasses implement ``_forward``.
* ``commit(keep)`` appends the staged entries ``keep`` (indices into the last forward's
  tokens, in order) to the cache: the accepted path. Rejected entries are never written.
* ``head_logits(index) -> [K, V]`` runs the Medusa heads on the hidden state of token
  ``index`` of the last forward (``first_head_logits(index) -> [1, V]``: head 1 alone).

and declares its limits, which the decode loop plans by (the backend never re-plans a call):

* ``max_new_tokens(past)``: the most tokens one ``forward`` takes on a cache of ``past``
  (the loop chunks a prompt by it and takes a plain step where a tree does not fit);
* ``partial_logits``: whether ``forward(..., logits=k)`` computes the last ``k`` rows only;
* ``exact_branching``: whether a branching tree computes exactly as plain steps do.

The loop never sees torch, ONNX Runtime or TensorRT: ``runtime.generate`` drives any backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from runtime.artifact import ModelSpec
from runtime.errors import ContextLengthError, MedusaError

# Cache positions a grown KV buffer keeps when its sequence ends (per sequence; the fused backend's
# reset, the batch engine when every slot is free). A new buffer's pages are mapped on first touch,
# and where the host backs them lazily that touch can be slow: in this project's VM (its kernel
# reports freed pages to the host, "Free page reporting enabled"), growing SmolLM2's buffer from 256
# to 512 positions, an 11 MB copy, took ~10 ms into pages freed a moment before and 160-460 ms into
# pages the host had taken back, and every answer grew it anew while reset started small again
# (scripts/bench_cache_keep.py). Past this size the buffer is given back: GroupQueryAttention's CPU
# kernel costs a little more with a longer bound buffer.
KEEP_CAPACITY = 2048


def gives_back(positions: int, start: int) -> bool:
    """Whether an idle buffer of ``positions`` positions a sequence goes back to ``start`` positions
    (past ``KEEP_CAPACITY``, read at the call: tests and users may change it)."""
    return positions > max(start, KEEP_CAPACITY)


class Backend(ABC):
    spec: ModelSpec

    @property
    @abstractmethod
    def cache_len(self) -> int: ...

    @abstractmethod
    def reset(self) -> None:
        """Empty the cache (a new sequence)."""

    def forward(self, input_ids, position_ids, tree_mask, logits: int | None = None) -> np.ndarray:
        """Logits of the new tokens (the last ``logits`` rows where :attr:`partial_logits`, else
        all); the inputs are checked against the graph contract and the backend's limits first."""
        ids, pos, mask = self._checked(input_ids, position_ids, tree_mask)
        return self._forward(ids, pos, mask, logits)

    def forward_argmax(self, input_ids, position_ids, tree_mask, rows: int | None = None, noise=None,
                       temperature: float = 1.0, allowed=None) -> np.ndarray:  # fmt: skip
        """int64 ``[k]``: the argmax token of each of the last ``rows`` new tokens (all where None),
        all that greedy decoding reads of a forward, or -1 for a row the backend left unsettled:
        :meth:`settle_argmax` gives that row's token. ``noise`` (float32 ``[k, vocab]``, coupled
        sampling's Gumbel vectors, one per row): the argmax of ``logits / temperature + noise``
        instead (:func:`draw_argmax`), the token coupled sampling draws. ``allowed`` (bool ``[k,
        vocab]``, a grammar's mask per row): the argmax over the allowed tokens only. Here from
        :meth:`forward`'s logits (never -1); a backend whose graph screens the lm_head
        (:attr:`screens_argmax`, and :attr:`screens_noise` for noise) computes no float logits, and
        leaves the rows its screen cannot settle (rare) to ``settle_argmax``; it ranks a masked row's
        allowed tokens alone (through the graph's noise input: :attr:`screens_noise`)."""
        check_noise(noise, len(input_ids), rows, self.spec.vocab_size)
        check_noise(allowed, len(input_ids), rows, self.spec.vocab_size, "allowed")
        k = len(input_ids) if rows is None else min(int(rows), len(input_ids))
        if (
            not self.screens_argmax
            or ((noise is not None or allowed is not None) and not self.screens_noise)
            or (self.screen_max_rows is not None and k > self.screen_max_rows)
        ):
            out = self.forward(input_ids, position_ids, tree_mask, logits=rows)
            return draw_argmax(out[len(out) - k :], noise, temperature, allowed)  # (rows may exceed the tokens)
        ids, pos, mask = self._checked(input_ids, position_ids, tree_mask)
        return self._forward_argmax(ids, pos, mask, k, noise, temperature, allowed)

    # True where forward_argmax runs the graph's lm_head screen (exporter.fused._screen), and where it
    # does so with coupled sampling's noise too
    screens_argmax: bool = False
    screens_noise: bool = False
    # the most rows a call screens (more: the float lm_head, which costs less there on some CPUs; the
    # artifact's latency profile measures where, runtime.profile); None: every call
    screen_max_rows: int | None = None

    def _forward_argmax(self, input_ids, position_ids, tree_mask, rows: int, noise=None, temperature=1.0,
                        allowed=None) -> np.ndarray:  # fmt: skip
        raise NotImplementedError(f"{type(self).__name__} does not screen the lm_head")

    def settle_argmax(self, row: int) -> int:
        """The argmax token of row ``row`` (of the rows the last :meth:`forward_argmax` returned) that
        it left at -1, from float logits (before that forward is committed)."""
        raise NotImplementedError(f"{type(self).__name__} leaves no row unsettled")

    def _checked(self, input_ids, position_ids, tree_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A forward's inputs checked against the contract and this backend's limits (and counted)."""
        ids, pos, mask = check_forward(input_ids, position_ids, tree_mask, self.spec.vocab_size)
        n, past = len(ids), self.cache_len
        if past + n > self.max_context:
            raise ContextLengthError(
                f"{past} cached + {n} new tokens exceed the cache capacity of {self.max_context} tokens"
            )
        limit = self.max_new_tokens(past)
        if n > limit:
            raise MedusaError(
                f"{type(self).__name__} takes at most {limit} new tokens on a cache of {past}, got {n} "
                "(the decode loop plans calls by max_new_tokens)"
            )
        self.forwards += 1
        return ids, pos, mask

    # forward calls so far: with cache_len, what a caller that keeps a cache's prefix between calls
    # (runtime.api's prefix reuse) compares to tell whether anyone else drove the backend since
    forwards: int = 0

    @abstractmethod
    def _forward(
        self, input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray, logits: int | None
    ) -> np.ndarray:
        """The engine call(s) on checked inputs: int64 ``[n]``, int64 ``[n]``, bool ``[n, n]``."""

    # the most tokens a decode step should carry where longer ones run apart from the others (None: no such limit)
    step_rows: int | None = None

    def max_new_tokens(self, past: int | None = None) -> int:
        """The most new tokens one :meth:`forward` takes on a cache of ``past`` tokens (default:
        the current cache). Every smaller count fits too."""
        past = self.cache_len if past is None else past
        return max(0, self.max_context - past)

    @abstractmethod
    def commit(self, keep: np.ndarray) -> None: ...

    @abstractmethod
    def head_logits(self, index: int) -> np.ndarray: ...

    def first_head_logits(self, index: int) -> np.ndarray:
        """``[1, V]``: head 1's row of :meth:`head_logits` (what a tree of depth 1 reads). Backends with
        a graph of the first head alone (``heads_int8_first.onnx``) run that smaller call instead."""
        return self.head_logits(index)[:1]

    def draft_logits(self, index: int, path_ids: np.ndarray, path_len: np.ndarray) -> np.ndarray:
        """Hydra heads (``spec.medusa_head_type == "hydra"``) on the hidden state of token ``index``
        of the last forward: row n runs head ``path_len[n] - 1`` on the first ``path_len[n]`` tokens
        of ``path_ids[n]`` (int64 ``[rows, num_medusa_heads]``, the root first) -> ``[rows, V]``."""
        hidden = getattr(self, "_hidden", None)
        if hidden is None:
            raise RuntimeError("draft_logits() before any forward()")
        rows = np.repeat(np.asarray(hidden[index : index + 1]), len(path_ids), axis=0)
        return self._run_drafts(rows, path_ids, path_len)

    def _run_drafts(self, hidden: np.ndarray, path_ids: np.ndarray, path_len: np.ndarray) -> np.ndarray:
        raise MedusaError(f"{type(self).__name__} does not run Hydra heads")

    def hidden_states(self) -> np.ndarray:
        """A copy of the last forward's final-normed last hidden states ``[n, hidden]`` (the heads'
        input; training keeps them, ``medusa-train distill --engine``)."""
        hidden = getattr(self, "_hidden", None)
        if hidden is None:
            raise RuntimeError(f"{type(self).__name__}: no hidden states (no forward yet, or this engine keeps none)")
        return np.array(hidden)

    @property
    def max_context(self) -> int:
        return self.spec.max_context

    # True where forward(..., logits=k) computes logits for the last k rows only (the prefill
    # reads one row of its last chunk and none of the others)
    partial_logits: bool = False

    # what runtime.load reports as the generator's backend_name
    name: str = "onnxruntime"

    # False where a tree's sibling layout changes the last bits of its nodes' attention enough
    # to change greedy tokens (graphs with int8 activations: runtime.onnxrt.row_invariant_rows);
    # greedy Medusa then takes chain trees only, which such graphs compute exactly as plain steps
    exact_branching: bool = True

    # One cache, several sequences in turn (runtime.api's streams): between two steps of the
    # decode loop the cache is all the state a backend holds, so a caller that finds another
    # sequence in it saves that one (snapshot) and puts its own back (restore).
    def snapshot(self):
        """A copy of the cache's used part, for :meth:`restore`; None where this backend cannot
        copy its cache (the caller then re-runs its tokens through forward/commit)."""
        return None

    def restore(self, state) -> None:
        """Put back a cache that :meth:`snapshot` copied (nothing staged after it)."""
        raise NotImplementedError(f"{type(self).__name__} does not snapshot its cache")

    # True where truncate() keeps a prefix of the cache: the next sequence may then start from the
    # entries of a prompt prefix the last one left (runtime.api's prefix reuse); False: reset only
    keeps_prefix: bool = False

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` committed entries (0 <= n <= cache_len) and drop the rest and
        anything staged: the cache of that prefix, as if only its tokens had been prefilled."""
        raise NotImplementedError(f"{type(self).__name__} does not keep a prefix of its cache")

    def _check_truncate(self, n: int) -> int:
        if not 0 <= n <= self.cache_len:
            raise MedusaError(f"truncate({n}): the cache holds {self.cache_len} entries")
        return int(n)


def perturbed(logits: np.ndarray, noise: np.ndarray, temperature: float) -> np.ndarray:
    """Coupled sampling's scores, float32 ``logits / temperature + noise``, whose argmax is the draw:
    the one formula the float path (runtime.decode.PositionNoise), :func:`draw_argmax` and the
    lm_head screen's candidates (runtime.onnxrt.screen_draws) share, so that they round alike."""
    with np.errstate(over="ignore"):  # a draft vocabulary's filler (float32's lowest) / T: -inf, never drawn
        return np.asarray(logits, dtype=np.float32) / np.float32(temperature) + noise


def draw_argmax(logits: np.ndarray, noise: np.ndarray | None = None, temperature: float = 1.0,
                allowed: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Each row's argmax, of ``logits`` or (``noise`` given, one row each) of :func:`perturbed`:
    coupled sampling's draw; ``allowed`` (bool, one row each): over the allowed tokens alone (a
    grammar's mask: the others score -inf, as runtime.grammar.GrammarMask.apply leaves them)."""
    scores = logits if noise is None else perturbed(logits, noise, temperature)
    if allowed is not None:
        scores = np.where(allowed, scores, np.float32(-np.inf))
    return np.argmax(scores, axis=-1)


def check_noise(noise, n: int, rows: int | None, vocab: int, what: str = "noise") -> None:
    """``forward_argmax``'s noise (or ``allowed`` mask), where given: one row of the vocabulary's
    size per drawn row (the last ``rows`` of ``n``, all where None)."""
    if noise is None:
        return
    want = (n if rows is None else min(int(rows), n), vocab)
    if np.shape(noise) != want:
        raise MedusaError(f"forward_argmax: {what} of shape {np.shape(noise)}, expected {want} (one row per drawn row)")


def check_forward(input_ids, position_ids, tree_mask, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph contract's inputs of one forward as int64 ``[n]``, int64 ``[n]``, bool ``[n, n]``
    (n >= 1, ids in the vocabulary, every token sees itself); MedusaError naming the first
    that is not."""
    ids = np.asarray(input_ids)
    pos = np.asarray(position_ids)
    mask = np.asarray(tree_mask)
    n = ids.shape[0] if ids.ndim == 1 else -1
    if n < 1 or pos.shape != (n,) or mask.shape != (n, n):
        raise MedusaError(
            f"forward: input_ids {ids.shape}, position_ids {pos.shape}, tree_mask {mask.shape}; "
            "expected [n], [n], [n, n] with n >= 1"
        )
    if ids.dtype.kind not in "iu" or pos.dtype.kind not in "iu" or mask.dtype.kind not in "bui":
        raise MedusaError(
            f"forward: integer input_ids/position_ids and a boolean tree_mask expected, got "
            f"{ids.dtype}, {pos.dtype}, {mask.dtype}"
        )
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise MedusaError(f"forward: input_ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    mask = mask.astype(bool, copy=False)
    if not mask.diagonal().all():
        raise MedusaError("forward: every new token must see itself (tree_mask's diagonal)")
    return ids.astype(np.int64, copy=False), pos.astype(np.int64, copy=False), mask


class DeviceCacheBackend(Backend):
    """A backend whose engine writes the cache itself: it keeps only the count of committed
    entries (``length``) and the usable size (``capacity``)."""

    length: int = 0
    capacity: int = 0

    @property
    def cache_len(self) -> int:
        return self.length

    @property
    def max_context(self) -> int:
        return self.capacity


class KVCache:
    """Preallocated sequence-major cache: per layer ``[batch, max_context, kv_heads, head_dim]``.

    ``past(i)`` is a view of the first ``length`` positions: contiguous at batch 1, so a
    graph takes it without a copy. ``append`` writes only the kept rows.
    """

    def __init__(self, spec: ModelSpec, max_context: int, dtype=np.float32, batch: int = 1):
        shape = (spec.num_layers, batch, max_context, spec.num_kv_heads, spec.head_dim)
        self.keys = np.zeros(shape, dtype=dtype)
        self.values = np.zeros(shape, dtype=dtype)
        self.capacity = max_context
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        # [batch, length, kv_heads, head_dim]
        return self.keys[layer, :, : self.length], self.values[layer, :, : self.length]

    def check_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise ContextLengthError(
                f"{self.length} cached + {n} new tokens exceed the cache capacity of {self.capacity} tokens"
            )

    def append(self, new_keys, new_values, keep: np.ndarray) -> None:
        """``new_keys[i]``: [batch, n, kv_heads, head_dim] per layer; keep: indices into n."""
        a = len(keep)
        self.check_room(a)
        dst = slice(self.length, self.length + a)
        contiguous = a > 0 and keep[0] == 0 and np.all(np.diff(keep) == 1)
        for i in range(len(new_keys)):
            if contiguous:  # prefill / plain decoding / chain prefix: a block copy
                self.keys[i, :, dst] = new_keys[i][:, :a]
                self.values[i, :, dst] = new_values[i][:, :a]
            else:
                self.keys[i, :, dst] = new_keys[i][:, keep]
                self.values[i, :, dst] = new_values[i][:, keep]
        self.length += a


class GraphBackend(Backend):
    """A backend whose engine follows the graph contract, with the cache on the host.

    Subclasses implement ``_run_backbone`` and ``_run_heads`` (one engine call each); this
    class owns the cache, the staging of new entries and the bookkeeping.
    """

    def __init__(self, spec: ModelSpec, max_context: int | None = None, cache_dtype=np.float32):
        self.spec = spec
        cap = min(max_context or spec.max_context, spec.max_context)
        self.cache = KVCache(spec, cap, dtype=cache_dtype)
        self._staged: tuple[list, list] | None = None
        self._hidden: np.ndarray | None = None

    @property
    def cache_len(self) -> int:
        return self.cache.length

    @property
    def max_context(self) -> int:
        return self.cache.capacity

    def reset(self) -> None:
        self.truncate(0)

    keeps_prefix = True

    def truncate(self, n: int) -> None:
        self.cache.length = self._check_truncate(n)
        self._staged = None
        self._hidden = None

    @abstractmethod
    def _run_backbone(self, input_ids, position_ids, tree_mask, past: list) -> tuple:
        """Engine call: (logits [1, n, V], hidden [1, n, H], presents [k0, v0, k1, v1, ...])."""

    @abstractmethod
    def _run_heads(self, hidden: np.ndarray) -> np.ndarray:
        """Engine call: hidden [1, H] -> medusa logits [1, K, V]."""

    def _forward(self, input_ids, position_ids, tree_mask, logits=None):
        past = []
        for i in range(self.spec.num_layers):
            past.extend(self.cache.past(i))
        logits, hidden, presents = self._run_backbone(
            np.asarray(input_ids, dtype=np.int64)[None],
            np.asarray(position_ids, dtype=np.int64)[None],
            np.asarray(tree_mask, dtype=bool)[None],
            past,
        )
        self._staged = (presents[0::2], presents[1::2])
        self._hidden = hidden[0]
        return logits[0]

    def commit(self, keep):
        if self._staged is None:
            raise RuntimeError("commit() without a forward() to commit")
        self.cache.append(self._staged[0], self._staged[1], np.asarray(keep, dtype=np.int64))
        self._staged = None

    def snapshot(self):
        n = self.cache.length
        return n, self.cache.keys[:, :, :n].copy(), self.cache.values[:, :, :n].copy()

    def restore(self, state) -> None:
        n, keys, values = state
        self.cache.keys[:, :, :n] = keys
        self.cache.values[:, :, :n] = values
        self.cache.length = n
        self._staged = None
        self._hidden = None

    def head_logits(self, index):
        if self._hidden is None:
            raise RuntimeError("head_logits() before any forward()")
        return self._run_heads(np.ascontiguousarray(self._hidden[index : index + 1]))[0]
