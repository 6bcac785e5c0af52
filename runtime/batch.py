"""Batched decoding: the steps of several sequences in one engine call (``batch.onnx``).

    gen = runtime.load("artifacts/smollm2-135m-medusa", max_batch=8)
    # generate() / stream() from up to 8 threads at once: their steps run together

Every sequence runs the ordinary decode loop (:func:`runtime.decode.decode_steps`: trees,
context lookup, greedy / exact / typical acceptance, stop strings) on its own
:class:`SlotBackend`, a view of one *slot* of a shared KV cache. A slot's ``forward`` and
``head_logits`` do not call an engine: they hand their inputs to the :class:`BatchEngine`'s
thread and wait. That thread gathers the requests of every sequence that is computing,
runs **one** ``batch.onnx`` call for all their forwards (each sequence with its own cache
length, its own tree or plain token, padded to the longest) and **one** ``heads`` call for all
their head requests, and hands each sequence its rows back. Nothing in the acceptance logic
knows it is batched, so a batched sequence emits exactly what the same loop emits alone on
this graph (greedy: lossless; a seed reproduces a sampled answer).

Scheduling. The engine waits until every sequence whose loop is computing has a request in
(or ``gather_timeout`` passed), so steps line up; a sequence whose consumer is busy with its
last chunk is not waited for. Sequences join and leave between calls (continuous batching). A
forward of more than ``max_rows`` tokens (a prompt chunk) runs on its own, one per engine
round, between batched steps, so a newcomer's long prompt delays the others by one chunk at a
time (``prefill_chunk`` tokens), never by the whole prompt.

Load-aware trees. Each sequence's token budget per step (:meth:`SlotBackend.max_new_tokens`,
which the decode loop already obeys: a tree that does not fit becomes a plain step, lookup
drafts are grafted only where they fit) follows the load: ``budgets[k]`` is the budget when
``k + 1`` sequences are decoding (:func:`choose_budgets` picks them from a cost profile of the
batch graph measured at start-up and the acceptance seen so far).

The cache is one buffer ``[layers, key|value, slots, kv_heads, capacity, head_dim]``; a call
binds the slots it covers (a contiguous range: slots are handed out lowest first) and the
graph reads each sequence's first ``cache_lengths[b]`` entries. ``capacity`` grows by
doubling when a sequence needs more (one copy), and falls back when every slot is free, so
attention reads at most about twice what the longest sequence holds. Accepted K/V rows are
written into the slot by the engine thread before its next call (``commit`` only queues
them), so no write races a running call.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import FUSED_CACHE_START, ArtifactConfig
from runtime.backend import Backend
from runtime.decode import decode_steps
from runtime.errors import ArtifactError, ContextLengthError, MedusaError

log = logging.getLogger("medusa_trt.runtime")

DEFAULT_GATHER_TIMEOUT = 0.05  # seconds the engine waits for the stragglers of a step
DEFAULT_MAX_ROWS = 16  # forwards with more tokens (prompt chunks, big trees) run on their own
DEFAULT_BATCH_PREFILL_CHUNK = 128  # prompt tokens per call: the others wait for one chunk at a time
MIN_CAPACITY = 256  # cache positions per slot to start with
GRACE = 0.01  # seconds a slot counts as computing after handing a chunk to its consumer


class _Request:
    __slots__ = ("slot", "kind", "ids", "pos", "mask", "logits", "hidden", "result", "error", "done")

    def __init__(self, slot: int, kind: str, ids=None, pos=None, mask=None, logits=None, hidden=None):
        self.slot, self.kind = slot, kind
        self.ids: Any = ids
        self.pos: Any = pos
        self.mask: Any = mask
        self.logits: int | None = logits
        self.hidden: Any = hidden
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    @property
    def rows(self) -> int:
        return len(self.ids) if self.ids is not None else 0


class SlotBackend(Backend):
    """One sequence's view of a :class:`BatchEngine`: the decode loop's Backend interface over a
    slot of the shared cache. Only one thread drives a slot at a time."""

    partial_logits = True
    name = "onnxruntime-batch"

    def __init__(self, engine: BatchEngine, index: int):
        self.engine = engine
        self.index = index
        self.spec = engine.spec
        self.length = 0  # committed entries, as the decode loop sees them
        self._staged: np.ndarray | None = None  # [layers, 2, kv_heads, n, head_dim] of the last forward
        self._hidden: np.ndarray | None = None

    @property
    def cache_len(self) -> int:
        return self.length

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def max_new_tokens(self, past: int | None = None) -> int:
        """Room in the context; for the next step (no ``past``: what the decode loop asks before a
        tree or a lookup graft) also the load's budget. A prefill plans by ``past`` and is not held
        to the budget (its chunks are bounded by ``prefill_chunk``)."""
        if past is not None:
            return max(0, self.max_context - past)
        return min(max(0, self.max_context - self.length), self.engine.budget())

    def reset(self) -> None:
        self.engine._queue_commit(self.index, 0, None)
        self.length = 0
        self._staged = None
        self._hidden = None

    def _forward(self, input_ids, position_ids, tree_mask, logits=None):
        req = self.engine._submit(
            _Request(self.index, "forward", ids=input_ids, pos=position_ids, mask=tree_mask, logits=logits)
        )
        logits_rows, self._hidden, self._staged = req.result
        return logits_rows

    def commit(self, keep) -> None:
        if self._staged is None:
            raise RuntimeError("commit() without a forward() to commit")
        keep = np.asarray(keep, dtype=np.int64)
        a = len(keep)
        if self.length + a > self.max_context:
            raise ContextLengthError(
                f"{self.length} cached + {a} tokens exceed the cache capacity of {self.max_context}"
            )
        self.engine._queue_commit(self.index, self.length, self._staged[:, :, :, keep])
        self.length += a
        self._staged = None

    def head_logits(self, index):
        if self._hidden is None:
            raise RuntimeError("head_logits() before any forward()")
        return self.engine._submit(_Request(self.index, "heads", hidden=self._hidden[index])).result


class BatchEngine:
    """``batch.onnx`` and the heads graph of an artifact, serving up to ``slots`` sequences.

    ``acquire()`` hands out a :class:`SlotBackend` (blocking while all are taken), ``release``
    takes it back; ``computing(slot)`` brackets the stretches in which a slot's decode loop runs,
    so the engine knows whom to wait for. ``close()`` stops the engine thread; requests still
    waiting get an error.
    """

    def __init__(
        self,
        folder: str | Path,
        config: ArtifactConfig,
        slots: int,
        threads: int | None = None,
        max_context: int | None = None,
        heads_int8: bool = True,
        gather_timeout: float = DEFAULT_GATHER_TIMEOUT,
        max_rows: int = DEFAULT_MAX_ROWS,
        budgets: list[int] | None = None,
    ):
        from runtime.onnxrt import _NP_DTYPES, _options, _ort, _session

        if config.batch is None:
            raise ArtifactError(
                f"{folder}: the artifact has no batch graph (batch.onnx), so it decodes one sequence per engine call; "
                "re-export it with this medusa-export (fused float graphs get one by default)"
            )
        if slots < 1:
            raise MedusaError(f"max_batch must be >= 1, got {slots}")
        ort = _ort()
        self.folder = Path(folder)
        self.config = config
        self.spec = config.model
        self.slots = slots
        self.max_context = min(max_context or self.spec.max_context, self.spec.max_context)
        self.gather_timeout = gather_timeout
        self.max_rows = max_rows
        self._dtype = _NP_DTYPES[config.dtype]
        providers = ["CPUExecutionProvider"]
        self.session = _session(ort, self.folder / config.batch.file, _options(ort, threads, spin=True), providers)
        heads = config.heads_int8 if (heads_int8 and config.heads_int8) else config.heads
        self.heads = _session(ort, self.folder / heads.file, _options(ort, threads, spin=False), providers)
        names = [i.name for i in self.session.get_inputs()]
        if names != list(config.batch.inputs):
            raise ArtifactError(f"{self.folder / config.batch.file}: graph inputs do not match medusa_config.json")
        self._cache_names = names[FUSED_CACHE_START:]
        self._out_names = [o.name for o in self.session.get_outputs()]
        s = self.spec
        self.capacity = min(MIN_CAPACITY, self.max_context)
        self.kv = np.zeros((s.num_layers, 2, slots, s.num_kv_heads, self.capacity, s.head_dim), self._dtype)
        self._len = [0] * slots  # entries written into each slot (the engine's view)
        self._cond = threading.Condition()
        self._pending: dict[int, _Request] = {}
        self._commits: list[tuple[int, int, np.ndarray | None]] = []
        self._computing: set[int] = set()
        self._left: dict[int, float] = {}  # slot -> when its loop last handed a chunk to its consumer
        self._free = list(range(slots))
        self._closed = False
        self._chunk_turn = False
        self.budgets = list(budgets) if budgets else [max(self.max_context, 1)] * slots
        self.stats = {"calls": 0, "sequences": 0, "rows": 0, "padded_rows": 0, "heads_calls": 0, "engine_s": 0.0}
        self._thread = threading.Thread(target=self._loop, name="medusa-batch-engine", daemon=True)
        self._thread.start()

    # -- slots -------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> SlotBackend:
        with self._cond:
            if not self._cond.wait_for(lambda: self._free or self._closed, timeout):
                raise MedusaError(f"no free slot in {timeout} s: all {self.slots} are decoding")
            if self._closed:
                raise MedusaError("the batch engine is closed")
            index = self._free.pop(0)  # lowest first: calls cover a short contiguous range
        return SlotBackend(self, index)

    def release(self, slot: SlotBackend) -> None:
        with self._cond:
            self._computing.discard(slot.index)
            self._left.pop(slot.index, None)
            if slot.index not in self._free:
                self._free.append(slot.index)
                self._free.sort()
            self._cond.notify_all()

    @contextmanager
    def computing(self, slot: SlotBackend):
        """The slot's decode loop runs inside: the engine waits for its request before a call."""
        with self._cond:
            self._computing.add(slot.index)
            self._left.pop(slot.index, None)
        try:
            yield
        finally:
            with self._cond:
                self._computing.discard(slot.index)
                self._left[slot.index] = time.monotonic()
                self._cond.notify_all()

    def _expected(self) -> set[int]:
        """Slots whose next request the engine waits for: computing, or back with their consumer
        for less than ``GRACE`` (a stream's consumer takes the chunk and asks for the next step)."""
        now = time.monotonic()
        return self._computing | {i for i, t in self._left.items() if now - t < GRACE}

    def budget(self) -> int:
        """Tokens a sequence may put into one step now (by how many are decoding)."""
        with self._cond:
            busy = self.slots - len(self._free)
        return self.budgets[max(0, min(busy, len(self.budgets)) - 1)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # -- requests (sequence threads) -----------------------------------------------------

    def _submit(self, req: _Request) -> _Request:
        with self._cond:
            if self._closed:
                raise MedusaError("the batch engine is closed")
            self._pending[req.slot] = req
            self._cond.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req

    def _queue_commit(self, slot: int, base: int, rows: np.ndarray | None) -> None:
        with self._cond:
            self._commits.append((slot, base, rows))

    # -- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    for r in self._pending.values():
                        r.error = MedusaError("the batch engine was closed")
                        r.done.set()
                    self._pending.clear()
                    return
                run = self._take()
                commits, self._commits = self._commits, []
            try:
                self._apply(commits)
            except BaseException as e:  # pragma: no cover - a bug: fail the requests, keep serving
                log.exception("batch engine: writing the cache failed")
                for r in run:
                    r.error = e
                    r.done.set()
                continue
            try:
                if run[0].kind == "heads":
                    self._run_heads(run)
                else:
                    self._run_forward(run)
            except BaseException as e:
                for r in run:
                    r.error = e if isinstance(e, MedusaError) else MedusaError(f"engine call failed: {e}")
            for r in run:
                r.done.set()
            self._maybe_shrink()

    def _take(self) -> list[_Request]:
        """Under the lock: the requests of the next call. Head requests go at once (a heads call is
        cheap, and each sequence's next forward follows it); forwards wait until every sequence
        that is computing has its forward in (or the gather timeout), then go together, except
        that prompt chunks (more than ``max_rows`` tokens) go one at a time, on their own."""
        heads = [r for r in self._pending.values() if r.kind == "heads"]
        if not heads:
            deadline = time.monotonic() + self.gather_timeout
            while not self._closed and not self._expected() <= self._pending.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, GRACE / 2))
                heads = [r for r in self._pending.values() if r.kind == "heads"]
                if heads:  # a sequence needs its heads first: serve them, then gather again
                    break
        if heads:
            run = heads
        else:
            forwards = sorted(self._pending.values(), key=lambda r: r.slot)
            small = [r for r in forwards if r.rows <= self.max_rows]
            big = [r for r in forwards if r.rows > self.max_rows]
            # steps and prompt chunks take turns: a newcomer's prompt advances a chunk per step of the others
            run = [big[0]] if big and (self._chunk_turn or not small) else small
            self._chunk_turn = not (big and run is small)
        for r in run:
            del self._pending[r.slot]
        return sorted(run, key=lambda r: r.slot)

    def _apply(self, commits) -> None:
        for slot, base, rows in commits:
            if rows is None:  # reset
                self._len[slot] = 0
                continue
            a = rows.shape[3]
            self._ensure_capacity(base + a)
            self.kv[:, :, slot, :, base : base + a] = rows
            self._len[slot] = base + a

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if needed > self.max_context:
            raise ContextLengthError(f"{needed} cache entries exceed the context of {self.max_context}")
        cap = self.capacity
        while cap < needed:
            cap *= 2
        cap = min(cap, self.max_context)
        kv = np.zeros((*self.kv.shape[:4], cap, self.kv.shape[5]), self._dtype)
        kv[:, :, :, :, : self.capacity] = self.kv
        self.kv, self.capacity = kv, cap
        log.debug("batch engine: cache capacity %d per slot", cap)

    def _maybe_shrink(self) -> None:
        with self._cond:
            idle = len(self._free) == self.slots and not self._pending and not self._commits
        start = min(MIN_CAPACITY, self.max_context)
        if idle and self.capacity > start:
            self.kv = np.zeros((*self.kv.shape[:4], start, self.kv.shape[5]), self._dtype)
            self.capacity = start

    def _run_heads(self, reqs: list[_Request]) -> None:
        from runtime.onnxrt import run_heads

        hidden = np.stack([r.hidden for r in reqs])
        out = run_heads(self.heads, hidden, self._dtype)
        self.stats["heads_calls"] += 1
        for i, r in enumerate(reqs):
            r.result = out[i]

    def _run_forward(self, reqs: list[_Request]) -> None:
        from runtime.onnxrt import _bind

        lo, hi = reqs[0].slot, reqs[-1].slot + 1
        B = hi - lo
        n = max(r.rows for r in reqs)
        self._ensure_capacity(max(self._len[r.slot] + r.rows for r in reqs))
        ids = np.zeros((B, n), np.int64)
        pos = np.zeros((B, n), np.int64)
        mask = np.broadcast_to(np.eye(n, dtype=bool), (B, n, n)).copy()
        lens = np.zeros(B, np.int64)
        for r in reqs:
            b, m = r.slot - lo, r.rows
            ids[b, :m], ids[b, m:] = r.ids, r.ids[-1]
            pos[b, :m], pos[b, m:] = r.pos, r.pos[-1]
            mask[b, :m, :m] = r.mask
            lens[b] = self._len[r.slot]
        single = len(reqs) == 1
        k = n if not single or reqs[0].logits is None else max(0, min(int(reqs[0].logits), n))
        io = self.session.io_binding()
        keep = [
            _bind(io.bind_input, "input_ids", ids),
            _bind(io.bind_input, "position_ids", pos),
            _bind(io.bind_input, "tree_mask", mask),
            _bind(io.bind_input, "cache_lengths", lens),
            _bind(io.bind_input, "num_logits", np.array([k], np.int64)),
        ]
        for j, name in enumerate(self._cache_names):  # k0, v0, k1, v1, ...
            keep.append(_bind(io.bind_input, name, self.kv[j // 2, j % 2, lo:hi]))
        for name in self._out_names:
            io.bind_output(name, "cpu")
        t = time.perf_counter()
        self.session.run_with_iobinding(io)
        self.stats["engine_s"] += time.perf_counter() - t
        logits, hidden, *presents = io.copy_outputs_to_cpu()
        del keep
        s = self.spec
        new = np.stack(presents).reshape(s.num_layers, 2, B, s.num_kv_heads, n, s.head_dim)
        st = self.stats
        st["calls"] += 1
        st["sequences"] += len(reqs)
        st["rows"] += sum(r.rows for r in reqs)
        st["padded_rows"] += B * n
        for r in reqs:
            b, m = r.slot - lo, r.rows
            rows = logits[b] if single else logits[b, :m][m - (m if r.logits is None else min(r.logits, m)) :]
            r.result = (rows.copy(), hidden[b, :m].copy(), new[:, :, b, :, :m].copy())


def _generator_class():
    from runtime.api import MedusaGenerator

    class BatchedGenerator(MedusaGenerator):
        """A generator whose ``generate`` / ``stream`` calls from several threads decode together:
        each call takes a slot of one :class:`BatchEngine` (waiting while all ``max_batch`` are
        taken) and runs the decode loop on it; the engine runs their steps as one call."""

        def __init__(self, folder, max_batch: int, *, threads=None, max_context=None, tree=None,
                     prefill_chunk=None, verify=False, gather_timeout=DEFAULT_GATHER_TIMEOUT,
                     budgets=None):  # fmt: skip
            self._batch_args = (max_batch, gather_timeout, budgets)
            kwargs = {"prefill_chunk": DEFAULT_BATCH_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk}
            super().__init__(folder, backend="onnxruntime", device="cpu", threads=threads,
                             max_context=max_context, tree=tree, verify=verify, **kwargs)  # fmt: skip

        def _make_backend(self, backend, device, threads, max_context):
            max_batch, gather_timeout, budgets = self._batch_args
            self.engine = BatchEngine(self.folder, self.config, max_batch, threads=threads, max_context=max_context,
                                      gather_timeout=gather_timeout, budgets=budgets)  # fmt: skip
            # the generator's own backend answers the argument checks (vocabulary, context); it never runs
            return SlotBackend(self.engine, -1)

        @property
        def max_batch(self) -> int:
            return self.engine.slots

        def _stream_events(self, ids, cfg, tree):
            slot = self.engine.acquire()
            try:
                events = decode_steps(slot, ids, cfg, tree, decode_text=self.tokenizer.decode)
                while True:
                    with self.engine.computing(slot):
                        event = next(events, None)
                    if event is None:
                        return
                    yield event
            finally:  # finished, failed, closed or collected: the slot is free for the next sequence
                self.engine.release(slot)

        _generate_events = _stream_events

        def close(self) -> None:
            self.engine.close()

    return BatchedGenerator


def load_batched(folder, max_batch: int, **kwargs):
    """``runtime.load(folder, max_batch=N)``: a generator over :class:`BatchEngine` (see the module)."""
    return _generator_class()(folder, max_batch, **kwargs)
