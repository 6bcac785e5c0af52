"""Batched decoding: the steps of several sequences in one engine call (``fold.onnx`` for trees of
2-8 sequences, ``model.onnx`` for plain steps, ``batch.onnx`` for the rest).

    gen = runtime.load("artifacts/smollm2-135m-medusa", max_batch=8)
    # generate() / stream() from up to 8 threads at once: their steps run together

Every sequence runs the ordinary decode loop (:func:`runtime.decode.decode_steps`: trees,
context lookup, greedy / exact / typical acceptance, stop strings) on its own
:class:`SlotBackend`, a view of one *slot* of a shared KV cache. A slot's ``forward`` and
``head_logits`` do not call an engine: they hand their inputs to the :class:`BatchEngine`'s
thread and wait. That thread gathers the requests of every sequence that is computing,
runs **one** ``batch.onnx`` call for all their forwards (each sequence with its own cache
length, its own tree or plain token, padded to the longest; where every one is a plain step,
``model.onnx`` in place instead, which is faster) and **one** ``heads`` call for all
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
drafts are grafted only where they fit) follows the load. With ``budgets="auto"`` (the
default) the engine times its own graph at start-up (:meth:`BatchEngine.profile`: seconds per
call by sequences x rows), counts the tokens each row count of step has emitted so far, and
gives each step the budget with the most tokens per second at the current number of decoding
sequences (:func:`choose_budget`): a tree with lookup drafts alone, the bare tree as the batch
fills, plain steps when speculation no longer pays. Steps without a budget (the warm-up, before
there is anything to weigh, and a rare exploring step) run only at a light load
(``EXPLORE_MAX_BUSY`` sequences): one pads its whole call to its tree. A list fixes the budgets
by load instead.
Greedy tokens do not depend on the trees (lossless); sampled tokens follow the backbone's
distribution whatever the tree (exact acceptance), and with coupled drafts (the default) a seed
draws the same tokens whatever the tree, but they still depend on the last bits of the logits,
which differ between a call alone (model.onnx) and a batched one (batch.onnx, padded): a seeded
sampled request reproduces its tokens when it runs alone, not necessarily beside others (greedy
ones always do, up to near-ties).

The cache is one buffer ``[layers, key|value, slots, kv_heads, capacity, head_dim]``; a call
binds the slots it covers (a contiguous range: slots are handed out lowest first) and the
graph reads each sequence's first ``cache_lengths[b]`` entries. ``capacity`` grows by
doubling when a sequence needs more (one copy), and falls back when every slot is free, so
attention reads at most about twice what the longest sequence holds. Accepted K/V rows are
written into the slot by the engine thread before its next call (``commit`` only queues
them), so no write races a running call.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

from runtime import checks
from runtime.artifact import FUSED_CACHE_START, SCREEN_INPUT, SCREEN_NOISE, SCREEN_OUTPUTS, ArtifactConfig
from runtime.backend import Backend, check_noise, draw_argmax, gives_back
from runtime.decode import DEFAULT_BATCH_PREFILL_CHUNK, common_prefix, decode_steps
from runtime.errors import ArtifactError, ContextLengthError, EngineError, MedusaError

log = logging.getLogger("medusa_trt.runtime")

DEFAULT_GATHER_TIMEOUT = 0.05  # seconds the engine waits for the stragglers of a step
DEFAULT_MAX_ROWS = 16  # forwards with more tokens (prompt chunks, big trees) run on their own
MIN_CAPACITY = 256  # cache positions per slot to start with
GRACE = 0.01  # seconds a slot counts as computing after handing a chunk to its consumer
PROFILE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16)  # rows per sequence the start-up profile times
PROFILE_CACHED = 128  # cache entries per sequence while profiling
TREE_MARGIN = 1.2  # a tree budget is chosen over plain steps only when its estimate is this much faster
SWITCH_INTERVAL = 0.0005  # seconds: sys.setswitchinterval while 2+ sequences decode (Python's default: 0.005)
COST_EMA = 0.1  # weight of each observed step call in the cost table
COST_CLIP = 2.0  # an observed call counts as at most this many times its cell's estimate (and at least 1/this)
BUDGET_REFRESH = 0.5  # seconds a chosen budget is reused for the same number of decoding sequences
HOST_GAP_MAX = 0.5  # seconds: a longer pause between step calls is idleness, not host work
WARMUP_STEPS = 32  # steps without a budget before choose_budget sets one
EXPLORE_EVERY = 4 * WARMUP_STEPS  # one step in this many runs without a budget (a tree budget chosen)
PLAIN_EXPLORE = 8  # ... and this many times fewer while plain steps are chosen for the load
# unlimited steps (the warm-up's, before choose_budget has WARMUP_STEPS to weigh, and the exploring
# ones) run only while at most this many sequences decode: each pads its whole call to its tree
# (SmolLM2, 2 threads, 8 sequences: 130-210 ms against 41 ms a plain call, ~9% of the throughput
# lost to the warm-up and exploring in one in-process run; scripts/bench_batch.py shows it as padding), and what a step emits does not
# depend on the load, so lighter loads (alone above all) supply the estimates
EXPLORE_MAX_BUSY = 2
NOTHING_HELD: tuple[list[int], int, int] = ([], 0, 0)  # a slot's kept tokens, entries, prompt length: none
STEP_WINDOW = 512  # recent unlimited steps choose_budget weighs
# plain steps of several sequences run in place on model.onnx (False: on batch.onnx, as before
# 2026-12-01; scripts/bench_batch.py --plain-steps compares the two)
PLAIN_STEPS_IN_PLACE = True
# steps of 2 .. fold_max_batch sequences that are not all plain (trees, prompt chunks beside steps) run
# on fold.onnx where the artifact has it: GroupQueryAttention in place over the slots' cache (False:
# on batch.onnx, as before 2026-12-01; scripts/bench_batch.py --tree-steps compares the two)
FOLD_STEPS = True


class _Request:
    __slots__ = ("slot", "kind", "ids", "pos", "mask", "logits", "hidden", "paths", "first", "draw", "result", "error",
                 "done")  # fmt: skip

    def __init__(self, slot: int, kind: str, ids=None, pos=None, mask=None, logits=None, hidden=None):
        self.slot, self.kind = slot, kind
        self.ids: Any = ids
        self.pos: Any = pos
        self.mask: Any = mask
        self.logits: int | None = logits
        self.hidden: Any = hidden
        self.paths: Any = None  # Hydra heads: (path_ids [rows, K], path_len [rows]) for ``hidden``
        self.first = False  # Medusa heads: head 1 alone ([1, V]) is enough
        # a forward whose sequence reads only the drawn tokens (Backend.forward_argmax): (noise [k, V] or None,
        # temperature, a grammar's allowed tokens [k, V] or None); its result holds tokens [k] instead of logits rows
        self.draw: tuple[np.ndarray | None, float, np.ndarray | None] | None = None
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

    def __init__(self, engine: BatchEngine, index: int, length: int = 0, reusable: int = 0):
        self.engine = engine
        self.index = index
        self.spec = engine.spec
        self.length = length  # committed entries, as the decode loop sees them (a slot's last sequence left them)
        self.reusable = reusable  # of them, the first tokens of the prompt it was acquired for
        self._staged: np.ndarray | None = None  # [layers, 2, kv_heads, n, head_dim] of the last forward
        self._hidden: np.ndarray | None = None
        self._step_rows = 0
        self._granted = 0  # the budget the decode loop was given for its next step
        self.step_rows = engine.max_rows  # forwards above it run on their own, like prompt chunks

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
        self._granted = self.engine.budget()
        return min(max(0, self.max_context - self.length), self._granted)

    def reset(self) -> None:
        self.truncate(0)

    keeps_prefix = True

    def truncate(self, n: int) -> None:
        n = self._check_truncate(n)
        self.engine._queue_commit(self.index, n, None)
        self.length = n
        self._staged = None
        self._hidden = None

    def _forward(self, input_ids, position_ids, tree_mask, logits=None):
        req = self.engine._submit(
            _Request(self.index, "forward", ids=input_ids, pos=position_ids, mask=tree_mask, logits=logits)
        )
        logits_rows, self._hidden, self._staged = req.result
        self._step_rows = len(input_ids) if logits is None else 0  # a decode step (a prompt chunk asks for k rows)
        return logits_rows

    def forward_argmax(self, input_ids, position_ids, tree_mask, rows=None, noise=None, temperature=1.0, allowed=None):
        """The drawn tokens of the last ``rows`` new tokens (Backend.forward_argmax), computed by the
        engine: through model.onnx's lm_head screen where the call runs there and the engine screens
        (:attr:`BatchEngine.screens`), else from float logits; never -1 (the engine settles a row its
        screen leaves open by running the call again with float logits)."""
        check_noise(noise, len(input_ids), rows, self.spec.vocab_size)
        check_noise(allowed, len(input_ids), rows, self.spec.vocab_size, "allowed")
        ids, pos, mask = self._checked(input_ids, position_ids, tree_mask)
        req = _Request(self.index, "forward", ids=ids, pos=pos, mask=mask, logits=rows)
        req.draw = (None if noise is None else np.asarray(noise, dtype=np.float32), float(temperature),
                    None if allowed is None else np.asarray(allowed, dtype=bool))  # fmt: skip
        tokens, self._hidden, self._staged = self.engine._submit(req).result
        self._step_rows = len(ids) if rows is None else 0
        return tokens

    @property
    def screens_argmax(self) -> bool:  # type: ignore[override]
        return self.engine.screens

    @property
    def screens_noise(self) -> bool:  # type: ignore[override]
        return self.engine.screens_noise

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
        if self._step_rows:  # a step of n rows emitted a tokens (the accepted nodes; the last one's next token
            self.engine._record_step(self._step_rows, a, self._granted)  # is the next root): what budgets weigh
        self.length += a
        self._staged = None

    def head_logits(self, index):
        if self._hidden is None:
            raise RuntimeError("head_logits() before any forward()")
        return self.engine._submit(_Request(self.index, "heads", hidden=self._hidden[index])).result

    def first_head_logits(self, index):
        if self._hidden is None:
            raise RuntimeError("first_head_logits() before any forward()")
        req = _Request(self.index, "heads", hidden=self._hidden[index])
        req.first = True
        return self.engine._submit(req).result

    def draft_logits(self, index, path_ids, path_len):
        if self._hidden is None:
            raise RuntimeError("draft_logits() before any forward()")
        req = _Request(self.index, "heads", hidden=self._hidden[index])
        req.paths = (np.asarray(path_ids, dtype=np.int64), np.asarray(path_len, dtype=np.int64))
        return self.engine._submit(req).result


class BatchEngine:
    """``batch.onnx`` and the heads graph of an artifact, serving up to ``slots`` sequences.

    ``acquire()`` hands out a :class:`SlotBackend` (blocking while all are taken), ``release``
    takes it back with the tokens its cache holds, which the slot keeps for prefix reuse (``acquire``
    with a prompt prefers the slot whose chat the prompt continues, see ``_choose_slot``) until a
    newcomer takes it or the idle engine gives its grown buffer back; ``computing(slot)`` brackets
    the stretches in which a slot's decode loop runs, so the engine knows whom to wait for.
    ``close()`` stops the engine thread; requests still waiting get an error.
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
        budgets: list[int] | str | None = "auto",
        single_graph: bool = True,
    ):
        from runtime.onnxrt import _NP_DTYPES, _options, _ort, _session, open_first_head

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
        self._ort, self._threads, self._providers = ort, threads, providers
        self._session: Any = None  # batch.onnx, opened at its first call (see session)
        self._session_error: EngineError | None = None  # why it could not be opened, if it could not
        # one-sequence calls (a step alone, a prompt chunk) and plain steps of several sequences
        # (one token each) run on model.onnx, whose in-place GroupQueryAttention reads exactly the
        # cached entries (SmolLM2, 2 threads, one token a sequence: 31 against 34-40 ms a call at 4
        # sequences, scripts/bench_batch.py --plain-steps), over the same slots of the
        # same cache; it costs a second copy of the weights in memory (single_graph=False:
        # batch.onnx for every call)
        self.single = (
            _session(ort, self.folder / config.backbone.file, _options(ort, threads, spin=True), providers)
            if single_graph and config.flavour == "fused"
            else None
        )
        # steps of 2 .. fold_max_batch sequences with trees: fold.onnx (in place; another copy of the weights,
        # and batch.onnx's is then only loaded for calls of more sequences)
        self.fold = (
            _session(ort, self.folder / config.fold.file, _options(ort, threads, spin=True), providers)
            if self.single is not None and config.fold is not None
            else None
        )
        self.fold_max = config.fold_max_batch if self.fold is not None else 0
        # model.onnx's lm_head screen (exporter.fused._screen) for calls whose sequences all read drawn tokens
        # alone (greedy, coupled sampling): float32 graphs whose bound holds here (checked below)
        self.screen_graph = self.screen_noise_input = False  # model.onnx's screen inputs (bound on every call)
        if self.single is not None:
            from runtime.onnxrt import screen_io

            self.screen_graph, self.screen_noise_input = screen_io(self.single)
        self.screens = self.screen_graph and config.precision == "fp32"
        # more rows a call: the float lm_head (Backend.screen_max_rows; the generator sets it from the profile)
        self.screen_max_rows: int | None = None
        self.screens_noise = self.screens and self.screen_noise_input
        self._no_noise = np.zeros((1, 1), self._dtype)
        heads = config.heads_int8 if (heads_int8 and config.heads_int8) else config.heads
        self.heads_quantized = heads is config.heads_int8  # its calls' rows are not independent (_run_heads)
        self.heads = _session(ort, self.folder / heads.file, _options(ort, threads, spin=False), providers)
        self.heads_first = open_first_head(ort, self.folder, config, threads, providers, heads_int8)
        fold_spec = config.fold
        if (
            self.fold is not None
            and fold_spec is not None
            and [i.name for i in self.fold.get_inputs()] != list(fold_spec.inputs)
        ):
            raise ArtifactError(f"{self.folder / fold_spec.file}: graph inputs do not match medusa_config.json")
        names = list(config.batch.inputs)
        self._cache_names = names[FUSED_CACHE_START:]
        self._out_names = list(config.batch.outputs)
        self._single_present = self._out_names[2:]  # present.* : the same names in both graphs
        s = self.spec
        self.capacity = min(MIN_CAPACITY, self.max_context)
        self.kv = np.zeros((s.num_layers, 2, slots, s.num_kv_heads, self.capacity, s.head_dim), self._dtype)
        self._len = [0] * slots  # entries written into each slot (the engine's view)
        # per free slot: the tokens whose entries its last sequence left (its prompt and answer, as far as
        # it committed them), and how many: a newcomer whose prompt begins so takes that slot and keeps them
        # (and the length of that sequence's prompt: a chat's next turn resends it whole)
        self._held: list[tuple[list[int], int, int]] = [NOTHING_HELD] * slots
        # I/O bindings with the cache (and the outputs) bound, per slot range: a call rebinds only its
        # five small inputs (binding 2 x layers cache tensors costs ~1 ms of Python a call)
        self._bindings: dict[tuple, Any] = {}
        self._cond = threading.Condition()  # re-entrant: see release
        self._released: deque = deque()  # releases asked for inside a critical section (release)
        self._exec = threading.Lock()  # whoever runs a call (the engine thread, or a sequence alone) holds it
        self._pending: dict[int, _Request] = {}
        self._commits: list[tuple[int, int, np.ndarray | None]] = []
        self._computing: set[int] = set()
        self._left: dict[int, float] = {}  # slot -> when its loop last handed a chunk to its consumer
        self._free = list(range(slots))
        self._closed = False
        self.failure: EngineError | None = None  # what stopped the engine (_fail), if anything did
        self._chunk_turn = False
        # budgets: None (no limit), a list (budgets[k]: tokens per step when k + 1 sequences decode) or "auto"
        # (chosen from a cost profile of this graph, measured now, and the acceptance seen per row count)
        self.budgets = check_budgets(budgets)
        self.costs: dict[tuple[int, int], float] = {}  # (sequences, rows) -> seconds per call
        self._grid: tuple[list[int], list[int]] = ([], [])  # the profiled sequence counts and row counts
        # host seconds per sequence between two step calls, by the kind of step ("plain" / "tree"): measured
        self.host: dict[str, float] = {}
        self._last_call: tuple[float, str, int] | None = None
        self._steps: deque[tuple[int, int]] = deque(maxlen=STEP_WINDOW)  # (rows, tokens) of unlimited steps
        self._explore = 0
        self._budget_cache: dict[int, tuple[int, float]] = {}  # busy -> (budget, when chosen)
        self._widest = 1  # most rows of an unlimited step so far
        self.stats = {"calls": 0, "sequences": 0, "rows": 0, "padded_rows": 0, "heads_calls": 0, "engine_s": 0.0,
                      "screened_calls": 0, "screen_fallbacks": 0}  # fmt: skip
        if self.screens and not self._screen_sound():
            self.screens = self.screens_noise = False
            log.warning(
                "batch engine: the lm_head screen's bound did not hold on this ONNX Runtime build: float logits"
            )
        self.stats.update(calls=0, sequences=0, rows=0, padded_rows=0)  # (the check's call)
        if budgets == "auto":
            self.costs = self.profile()
            # the profile's grid, sorted once (every step call folds its duration into one cell)
            self._grid = (sorted({b for b, _ in self.costs}), sorted({n for _, n in self.costs}))
        self._switch_interval = sys.getswitchinterval()
        self._thread = threading.Thread(target=self._loop, name="medusa-batch-engine", daemon=True)
        self._thread.start()

    @property
    def full_cache_bytes(self) -> int:
        """The KV cache's size with every slot holding a whole context (the buffer grows to it,
        doubling, as sequences lengthen; runtime.serve.cache_peak adds the buffer it grows from)."""
        s = self.spec
        return s.num_layers * 2 * self.slots * s.num_kv_heads * self.max_context * s.head_dim * self.kv.itemsize

    @property
    def session(self):
        """batch.onnx's session, opened at first use: with fold.onnx it takes only calls of more than
        ``fold_max`` sequences (or without model.onnx, every call), so a small server never loads it."""
        if self._session is None:
            if self._session_error is not None:  # loading it failed once: not again at every wide call
                raise own_error(self._session_error)
            from runtime.onnxrt import _options, _session

            try:
                # opened while sequences decode: its huge pages come on a background thread, not in their way
                session = _session(self._ort, self.folder / self.config.batch.file,
                                   _options(self._ort, self._threads, spin=True), self._providers,
                                   huge_pages_background=True)  # fmt: skip
                if [i.name for i in session.get_inputs()] != list(self.config.batch.inputs):
                    raise ArtifactError(
                        f"{self.folder / self.config.batch.file}: graph inputs do not match medusa_config.json"
                    )
            except Exception as e:
                log.error("batch engine: %s cannot be opened: %s", self.config.batch.file, e)
                self._session_error = EngineError(
                    f"{self.config.batch.file} cannot be opened ({type(e).__name__}: {e}): calls of more than "
                    f"{self.fold_max or 1} sequences fail; restart the server with at most that --max-batch or a "
                    "sound artifact"
                )
                raise self._session_error from e
            self._session = session
        return self._session

    # -- slots -------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None, prompt: list[int] | None = None) -> SlotBackend:
        """A free slot (waiting up to ``timeout`` s for one). With ``prompt``: the slot ``_choose_slot``
        picks, and the prefix of ``prompt`` it holds, whose entries the decode loop then keeps
        (``SlotBackend.reusable``)."""
        with self._section():
            # (a release deferred while this thread held the lock is applied by the condition: see _drain)
            if not self._cond.wait_for(lambda: self._drain() or self._free or self._closed, timeout):
                raise MedusaError(f"no free slot in {timeout} s: all {self.slots} are decoding")
            if self._closed:
                raise own_error(self._stopped())
            best, shared = self._choose_slot(prompt)
            index = self._free.pop(best)
            length = self._held[index][1]
            self._held[index] = NOTHING_HELD
            self._switch()
        reusable = min(shared, len(prompt) - 1) if prompt else 0
        return SlotBackend(self, index, length=length, reusable=reusable)

    def _choose_slot(self, prompt: list[int] | None) -> tuple[int, int]:
        """Under the lock: the position in ``_free`` of the slot a sequence with ``prompt`` takes, and
        how many of the prompt's first tokens that slot holds.
        A slot whose chat the prompt continues (it begins with that slot's last prompt whole, as a
        chat's next turn does, or with 3/4 of what the slot holds), the longest shared prefix first;
        else the lowest empty slot, so that a prompt sharing only a system prompt does not end
        another chat's kept entries while there is room; else the free slot sharing the longest
        prefix, the lowest of those (lowest first: a call covers the slots between its sequences)."""
        if not prompt:
            return 0, 0
        shared = [common_prefix(self._held[i][0], prompt) for i in self._free]
        held = [self._held[i][1:] for i in self._free]  # (entries, their prompt's length)
        match = [k for k, (n, p) in enumerate(held) if n and (shared[k] >= p or 4 * shared[k] >= 3 * n)]
        empty = [k for k, (n, _) in enumerate(held) if not n]
        if match:
            k = max(match, key=lambda k: (shared[k], -k))
        elif empty:
            k = empty[0]
        else:
            k = max(range(len(shared)), key=lambda k: (shared[k], -k))
        return k, shared[k]

    def release(self, slot: SlotBackend, held: list[int] | None = None, prompt_len: int = 0) -> None:
        """Give a slot back; ``held``: the tokens whose entries its sequence committed (the first
        ``slot.cache_len`` of its prompt, ``prompt_len`` tokens, and answer), which a later prompt may
        begin with; None: not known (a failed call), nothing is kept.

        A stream that nobody closed is released by its finalizer, which Python's cycle collector
        runs at whatever allocation crosses its threshold, in any thread: maybe inside one of this
        engine's critical sections (the lock is re-entrant), say while ``_choose_slot`` walks the free
        slots. So a release asked for inside a section waits in ``_released`` until that section ends
        (:meth:`_section`): no section sees the slots change under it."""
        self._released.append((slot, held, prompt_len))
        if self._cond._is_owned():  # type: ignore[attr-defined]  # inside this thread's section: at its end
            return
        with self._section():
            pass

    @contextmanager
    def _section(self) -> Iterator[None]:
        """The engine's lock held; at the end of the outermost section, the releases asked for meanwhile."""
        outer = not self._cond._is_owned()  # type: ignore[attr-defined]
        with self._cond:
            try:
                yield
            finally:
                if outer:
                    self._drain()

    def _drain(self) -> bool:
        """Under the lock, at the end of the outermost section or where a section waits on the condition
        (no slot list is being walked then): the releases deferred meanwhile. A finalizer that releases a
        slot while this thread holds the lock (the cycle collector runs at any allocation, the wait's own
        re-acquiring too) defers its release to the section's end, which a wait for a free slot (or for a
        request) would never reach if no other thread woke it. Returns False: a wait's condition then
        reads the state it left."""
        while self._released:
            self._release(*self._released.popleft())
        return False

    def _release(self, slot: SlotBackend, held: list[int] | None, prompt_len: int) -> None:
        """Under the lock, at the end of a section: :meth:`release`'s work."""
        self._computing.discard(slot.index)
        self._left.pop(slot.index, None)
        if slot.index not in self._free:
            self._free.append(slot.index)
            self._free.sort()
        n = slot.cache_len
        self._held[slot.index] = (held[:n], n, min(prompt_len, n)) if held else NOTHING_HELD
        if len(self._free) == self.slots and gives_back(self.capacity, min(MIN_CAPACITY, self.max_context)):
            # nobody decoding and the buffer grew past what an idle engine keeps: back to the start
            self._commits.clear()
            self._shrink()
        self._switch()
        self._cond.notify_all()

    def _switch(self) -> None:
        """Under the lock: Python's GIL switch interval for the number of decoding sequences. With two
        or more, every step hands the GIL from each sequence's thread to the engine thread and back,
        and at the default 5 ms a busy thread (a server's event loop) can keep it that long first;
        alone, a sequence makes its own calls and the default serves it best."""
        want = SWITCH_INTERVAL if self.slots - len(self._free) >= 2 else self._switch_interval
        if sys.getswitchinterval() != want:
            sys.setswitchinterval(want)

    @contextmanager
    def computing(self, slot: SlotBackend):
        """The slot's decode loop runs inside: the engine waits for its request before a call."""
        with self._section():
            self._computing.add(slot.index)
            self._left.pop(slot.index, None)
        try:
            yield
        finally:
            with self._section():
                self._computing.discard(slot.index)
                self._left[slot.index] = time.monotonic()
                self._cond.notify_all()

    def _expected(self) -> set[int]:
        """Slots whose next request the engine waits for: computing, or back with their consumer
        for less than ``GRACE`` (a stream's consumer takes the chunk and asks for the next step)."""
        now = time.monotonic()
        return self._computing | {i for i, t in self._left.items() if now - t < GRACE}

    def budget(self) -> int:
        """Tokens a sequence may put into one step now, by how many sequences are decoding."""
        with self._section():
            busy = max(1, self.slots - len(self._free))
            if self.budgets is None:
                return self.max_context
            if isinstance(self.budgets, list):
                return self.budgets[min(busy, len(self.budgets)) - 1]
            if busy == 1:  # alone: the artifact's tree was chosen for one sequence (select-tree)
                return self.max_context
            now = time.monotonic()
            light = busy <= EXPLORE_MAX_BUSY
            cached = self._budget_cache.get(busy)
            if cached is None or now - cached[1] > BUDGET_REFRESH:  # choose_budget costs ~0.3 ms: not per step
                chosen = choose_budget(busy, self.costs, list(self._steps), self.host)
                # nothing to weigh yet: trees at a light load (the warm-up), plain steps above it
                cached = (chosen if chosen is not None else self.max_context if light else 1, now)
                self._budget_cache[busy] = cached
            # an exploring step pads the whole call to its tree: only at a light load, and where plain
            # steps are chosen PLAIN_EXPLORE times less often (what a step emits does not depend on the
            # load, and steps at a lighter load, alone above all, keep the estimates current meanwhile)
            if light and self._explore % (EXPLORE_EVERY * (1 if cached[0] > 1 else PLAIN_EXPLORE)) == 0:
                return self.max_context
            return cached[0]

    def _record_step(self, rows: int, tokens: int, granted: int) -> None:
        """A step of ``rows`` emitted ``tokens``; kept for the budgets when it ran with no limit
        (``granted``: the budget it was given)."""
        with self._section():
            # a budget at or above every row count seen so far changed nothing: the step counts as unlimited
            if granted >= max(self._widest, rows, self.max_rows if not self._steps else 0):
                self._steps.append((rows, tokens))
                self._widest = max(self._widest, rows)
            # every EXPLORE_EVERY-th step runs without a limit, so the estimates keep up (see budget())
            self._explore = (self._explore + 1) % (EXPLORE_EVERY * PLAIN_EXPLORE)

    def profile(self, rows=PROFILE_ROWS, repeats: int = 3, cached: int = PROFILE_CACHED) -> dict:
        """Seconds per batched call, median of ``repeats``: {(sequences, rows each): s} for 1, 2, 4 ...
        ``slots`` sequences with ``cached`` entries each and ``rows`` (those up to ``max_rows``) new
        tokens. Run before the engine serves (it drives the engine directly); ~2 s for SmolLM2 at 8 slots."""
        sizes = sorted({min(2**k, self.slots) for k in range(self.slots.bit_length() + 1)})
        rows = [n for n in rows if n <= self.max_rows]
        cached = min(cached, self.max_context - max(rows))
        saved = list(self._len)
        costs = {}
        try:
            self._ensure_capacity(cached + max(rows))  # grown first (growing copies the cached entries)
            for b in sizes:
                self._len[:b] = [cached] * b
                for n in rows:
                    reqs = profile_requests(b, n, cached)
                    times = []
                    for _ in range(repeats + 1):  # the first is a warm-up
                        t = time.perf_counter()
                        self._run_forward(reqs)
                        times.append(time.perf_counter() - t)
                    costs[(b, n)] = float(np.median(times[1:]))
        finally:
            self._len[:] = saved
            with self._section():  # the profile's calls wrote over what free slots kept
                self._held = [NOTHING_HELD] * self.slots
            if not any(saved):
                self._shrink()
            self._last_call = None
            self.stats.update(calls=0, sequences=0, rows=0, padded_rows=0, engine_s=0.0, screened_calls=0,
                              screen_fallbacks=0)  # fmt: skip
        log.info("batch engine profile (ms per call): %s",
                 ", ".join(f"{b}x{n} {1000 * t:.1f}" for (b, n), t in sorted(costs.items())))  # fmt: skip
        return costs

    def _screen_sound(self) -> bool:
        """model.onnx's lm_head screen checked against float logits at start-up (runtime.onnxrt.screen_holds),
        on one call of random tokens into slot 0, empty at start-up (later calls overwrite its entries)."""
        from runtime.onnxrt import screen_holds

        n = min(8, self.capacity)
        req = _Request(0, "forward", ids=np.random.default_rng(0).integers(0, self.spec.vocab_size, n),
                       pos=np.arange(n), mask=np.tril(np.ones((n, n), bool)))  # fmt: skip
        feeds = {"input_ids": req.ids[None], "position_ids": req.pos[None], "tree_mask": req.mask[None],
                 "cache_lengths": np.zeros(1, np.int64), "num_logits": np.array([n], np.int64),
                 SCREEN_INPUT: np.array([n], np.int64)}  # fmt: skip
        logits, _, screened = self._call_in_place(self.single, "single", 0, 1, feeds, [req], n)
        assert screened is not None
        return screen_holds(logits[0], *(x[0] for x in screened))

    def close(self) -> None:
        with self._section():
            self._closed = True
            sys.setswitchinterval(self._switch_interval)
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # -- requests (sequence threads) -----------------------------------------------------

    def _stopped(self) -> EngineError:
        """What a request gets once the engine is closed: the failure that stopped it, if one did."""
        return self.failure or EngineError("the batch engine is closed", stopped=True)

    def _submit(self, req: _Request) -> _Request:
        with self._section():
            if self._closed:
                raise own_error(self._stopped())
            # one sequence decoding: its thread makes the call itself (two thread hops fewer a call);
            # a sequence that joins meanwhile goes through the engine thread, which waits for the call
            alone = self.slots - len(self._free) <= 1 and not self._pending
            if not alone:
                self._pending[req.slot] = req
                self._cond.notify_all()
        if alone:
            self._execute([req])
        else:
            req.done.wait()
        if req.error is not None:
            raise own_error(req.error)
        return req

    def _queue_commit(self, slot: int, base: int, rows: np.ndarray | None) -> None:
        with self._section():
            self._commits.append((slot, base, rows))

    # -- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._section():
                self._cond.wait_for(lambda: self._drain() or self._pending or self._closed)
                if self._closed:
                    for r in self._pending.values():
                        r.error = self._stopped()
                        r.done.set()
                    self._pending.clear()
                    return
                run = self._take()
            self._execute(run)

    def _execute(self, run: list[_Request]) -> None:
        """One call for ``run`` (all heads requests, or forwards), by whichever thread holds the
        execution lock: the queued commits first (taken under the lock, so every commit a request's
        sequence queued before it is in the cache when it runs), then the call; errors go to the
        requests."""
        with self._exec:
            with self._section():
                commits, self._commits = self._commits, []
            try:
                self._apply(commits)
            except BaseException as e:  # some sequences' caches now lack entries their lengths count
                log.exception("batch engine: writing the KV cache failed; the engine stops")
                self._fail(EngineError(f"the batch engine stopped: writing the KV cache failed ({type(e).__name__}: "
                                       f"{e}); restart the server", stopped=True))  # fmt: skip
                for r in run:
                    r.error = self._stopped()
            else:
                try:
                    if run[0].kind == "heads":
                        self._run_heads(run)
                    else:
                        self._run_forward(run)
                except BaseException as e:  # the call wrote no cache entry a length counts: the engine goes on
                    # a request's own error (its context) passes as it is; anything else is the engine's fault
                    # (an artifact that cannot load, a broken invariant): the server's 500, not the client's 400
                    if not isinstance(e, (ContextLengthError, EngineError)):
                        log.exception("batch engine: a call failed")
                        e = EngineError(f"engine call failed: {type(e).__name__}: {e}")
                    for r in run:
                        r.error = e
            for r in run:
                r.done.set()

    def _fail(self, error: EngineError) -> None:
        """Stop the engine for good (fail-stop): every request waiting and every later one gets ``error``,
        never a cache that lacks entries (runtime.serve's /health then answers 503)."""
        with self._section():
            self.failure, self._closed = error, True
            for r in self._pending.values():
                r.error = error
                r.done.set()
            self._pending.clear()
            self._cond.notify_all()

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
            self._chunk_turn = bool(big) and run is small  # a chunk waited: it goes next
        for r in run:
            del self._pending[r.slot]
        return sorted(run, key=lambda r: r.slot)

    def _apply(self, commits) -> None:
        for slot, base, rows in commits:
            if rows is None:  # reset / truncate: the first `base` entries stay
                self._len[slot] = base
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
        # the copy touches each slot's kept entries; with numpy's huge-page advice (Linux) that maps most
        # of the new buffer, and the old one stays until the copy ends (runtime.serve.cache_peak counts both)
        kv = np.zeros((*self.kv.shape[:4], cap, self.kv.shape[5]), self._dtype)
        for slot, length in enumerate(self._len):
            if length:
                kv[:, :, slot, :, :length] = self.kv[:, :, slot, :, :length]
        self.kv, self.capacity = kv, cap
        self._bindings.clear()  # they point into the old buffer
        log.debug("batch engine: cache capacity %d per slot", cap)

    def _shrink(self) -> None:
        """Back to the starting capacity where the buffer grew past ``runtime.backend.KEEP_CAPACITY``
        positions a slot (called with every slot free, so no call is running); the slots' lengths
        go to 0 with what they held (a stale length past the new capacity would make the next
        growth copy from outside the buffer)."""
        self._len[:] = [0] * self.slots
        self._held = [NOTHING_HELD] * self.slots
        start = min(MIN_CAPACITY, self.max_context)
        if gives_back(self.capacity, start):
            self.kv = np.zeros((*self.kv.shape[:4], start, self.kv.shape[5]), self._dtype)
            self.capacity = start
            self._bindings.clear()

    def _run_heads(self, reqs: list[_Request]) -> None:
        from runtime.onnxrt import run_heads

        self.stats["heads_calls"] += 1
        if self.spec.medusa_head_type == "hydra":  # every sequence's rows (each its own depth) in one call
            from runtime.onnxrt import run_drafts

            counts = [len(r.paths[1]) for r in reqs]
            hidden = np.concatenate([np.repeat(r.hidden[None], c, axis=0) for r, c in zip(reqs, counts)])
            ids = np.concatenate([r.paths[0] for r in reqs])
            lens = np.concatenate([r.paths[1] for r in reqs])
            out = run_drafts(self.heads, hidden, ids, lens, self._dtype)
            at = 0
            for r, c in zip(reqs, counts):
                r.result, at = out[at : at + c], at + c
            return
        if self.heads_quantized and len(reqs) > 1:
            # int8 heads quantize their input with one scale a call: a sequence's drafts would depend on
            # the others' hidden states (seeded typical / top-k / sampled drafts, and the trees chosen,
            # would change beside other requests): each alone, as the one-sequence backend runs them
            for r in reqs:
                self._run_heads([r])
            return
        hidden = np.stack([r.hidden for r in reqs])
        first = self.heads_first is not None and all(r.first for r in reqs)  # every sequence reads head 1 only
        out = run_heads(self.heads_first if first else self.heads, hidden, self._dtype)
        for i, r in enumerate(reqs):
            r.result = out[i, :1] if r.first else out[i]

    def _run_forward(self, reqs: list[_Request]) -> None:
        start = time.perf_counter()
        step = all(r.logits is None for r in reqs)  # decode steps (prompt chunks ask for k logits rows)
        last = self._last_call
        if step and last is not None and start - last[0] < HOST_GAP_MAX:
            # the time between two step calls is the host's: acceptance, heads, trees (the GIL serialises it)
            kind, seqs = last[1], last[2]
            per_seq = (start - last[0]) / seqs
            self.host[kind] = per_seq if self.host.get(kind) is None else 0.9 * self.host[kind] + 0.1 * per_seq
        capacity = self.capacity
        lens = self._plain_lengths(reqs) if self.single is not None and len(reqs) > 1 else None
        if self.single is not None and (len(reqs) == 1 or lens is not None):
            self._run_single(reqs, lens)
        elif (fold := self._fold_lengths(reqs)) is not None:
            self._run_fold(reqs, fold)
        else:
            self._run_batch(reqs)
        # what calls really cost (cache lengths, capacity) updates the profile; not a call that grew
        # the cache (it copied every slot's entries: hundreds of ms that the next calls do not pay)
        if step and self.costs and self.capacity == capacity:
            self._observe_cost(len(reqs), max(r.rows for r in reqs), time.perf_counter() - start)
        kind = "tree" if any(r.rows > 1 for r in reqs) else "plain"
        self._last_call = (time.perf_counter(), kind, len(reqs)) if step else None

    def _observe_cost(self, seqs: int, rows: int, seconds: float) -> None:
        """Fold a step call's duration into the cost table's cell at or above (seqs, rows): the
        start-up profile guessed cache lengths; the calls themselves know them."""
        sizes, rows_profiled = self._grid
        b = next((x for x in sizes if x >= seqs), sizes[-1])
        n = next((x for x in rows_profiled if x >= rows), None)
        if n is None:
            return
        with self._section():
            was = self.costs[(b, n)]
            # clipped: one call stalled by another process (a shared machine) must not make a cell look
            # several times dearer than its neighbours, which steers the budgets for many steps
            self.costs[(b, n)] = (1 - COST_EMA) * was + COST_EMA * min(max(seconds, was / COST_CLIP), was * COST_CLIP)

    def _plain_lengths(self, reqs: list[_Request]) -> np.ndarray | None:
        """Where several sequences each take a one-token step over non-empty caches, a call
        model.onnx takes too (GroupQueryAttention refuses several new tokens over a cache at
        batch > 1, not one), in place and faster than batch.onnx (SmolLM2, 2 threads: 31 against
        34-40 ms at 4 sequences): the ``cache_lengths`` of the slots ``lo .. hi`` it covers; else None.

        A slot in the range that is not in the call gets a throwaway entry at the length given
        here: a held slot at its own length (where its next forward writes anyway; a held slot
        whose cache fills the buffer the call will have sends the call to batch.onnx instead), a
        free one past the entries it keeps for prefix reuse (at 0 if none)."""
        if not PLAIN_STEPS_IN_PLACE or not all(
            r.rows == 1 and r.logits is None and self._len[r.slot] > 0 for r in reqs
        ):
            return None
        room = max(self.capacity, max(self._len[r.slot] for r in reqs) + 1)  # _run_single grows to it
        lens = self._range_lengths(reqs)
        return None if int(lens.max()) >= room else lens

    def _range_lengths(self, reqs: list[_Request]) -> np.ndarray:
        """The cache lengths of the slots ``lo .. hi`` a call covers: a slot in the call or held by
        another sequence at its own length, a free one at the length of the entries it keeps for
        prefix reuse (0 if none): its throwaway rows go past them."""
        lo, hi = reqs[0].slot, reqs[-1].slot + 1
        inside = {r.slot for r in reqs}
        with self._section():
            free = set(self._free)
            kept = [self._held[s][1] for s in range(lo, hi)]
        return np.array([self._len[s] if s in inside or s not in free else kept[s - lo] for s in range(lo, hi)],
                        np.int64)  # fmt: skip

    def _run_single(self, reqs: list[_Request], lens: np.ndarray | None = None) -> None:
        """One sequence (a step or a prompt chunk), or several one-token steps with the
        ``cache_lengths`` of :meth:`_plain_lengths`, on model.onnx: the slots ``lo .. hi`` of the
        cache bound as past and present, so the new entries land in place at each slot's
        ``cache_lengths`` (the staged rows are read back from there)."""

        lo, hi = reqs[0].slot, reqs[-1].slot + 1
        B = hi - lo
        if B == 1:
            r = reqs[0]
            n, base = r.rows, self._len[r.slot]
            if base == 0 and not np.array_equal(r.pos, np.arange(n)):
                raise MedusaError(
                    "the fused graph's first call on an empty cache must be a prefill at positions 0..n-1"
                )
            self._ensure_capacity(base + n)
            k = n if r.logits is None else max(0, min(int(r.logits), n))
            ids, pos, mask = r.ids[None], r.pos[None], r.mask[None]
            lens = np.array([base], np.int64)
        else:  # one token each, at the cache lengths of _plain_lengths
            assert lens is not None
            n, k = 1, 1
            self._ensure_capacity(max(self._len[r.slot] for r in reqs) + 1)
            ids, pos = np.zeros((B, 1), np.int64), lens[:, None].copy()
            for r in reqs:
                ids[r.slot - lo, 0], pos[r.slot - lo, 0] = r.ids[0], r.pos[0]
            mask = np.ones((B, 1, 1), bool)
        session = self.single
        assert session is not None
        feeds = {"input_ids": ids, "position_ids": pos, "tree_mask": mask, "cache_lengths": lens,
                 "num_logits": np.array([k], np.int64)}  # fmt: skip
        screened = (
            self.screens
            and (self.screen_max_rows is None or B * k <= self.screen_max_rows)
            and all(
                r.draw is not None and ((r.draw[0] is None and r.draw[2] is None) or self.screens_noise) for r in reqs
            )
        )  # every sequence reads its drawn tokens alone: no float lm_head (noise, masks: through the noise input)
        tokens = None
        if screened:
            tokens, hidden = self._screened_single(session, lo, hi, feeds, reqs, n, k)
        if tokens is None:  # float logits (a request wants them, or the screen left a row open)
            logits, hidden, _ = self._call_in_place(session, "single", lo, hi, feeds, reqs, n)
        for r in reqs:
            b, base = r.slot - lo, int(lens[r.slot - lo])
            if tokens is not None:
                out = tokens[b]
            else:
                out = logits[b] if r.draw is None else draw_argmax(logits[b], *r.draw)
            r.result = (out, hidden[b].copy(), self.kv[:, :, r.slot, :, base : base + r.rows].copy())

    def _screened_single(self, session, lo: int, hi: int, feeds: dict, reqs: list[_Request], n: int, k: int):
        """The call on model.onnx through its lm_head screen, the last ``k`` rows of each sequence
        screened (runtime.onnxrt.screen_draws; a sampled request's noise in its rows of
        ``screen_noise``, times its temperature): (``[B, k]`` tokens, or None where a row is left
        open, when the caller runs the call again with float logits: it writes the same entries;
        the hidden states)."""
        from runtime.onnxrt import screen_draws, screen_ranking

        B, V = hi - lo, self.spec.vocab_size
        ranked = [
            (r.slot - lo, *r.draw)
            for r in reqs
            if r.draw is not None and (r.draw[0] is not None or r.draw[2] is not None)
        ]
        noise = np.zeros((B * k, V), np.float32) if ranked else self._no_noise
        for b, g, t, allowed in ranked:  # T g and a grammar's mask (runtime.onnxrt.screen_ranking)
            noise[b * k : (b + 1) * k] = screen_ranking(g, t, allowed)
        call = {**feeds, "num_logits": np.array([0], np.int64), SCREEN_INPUT: np.array([k], np.int64),
                SCREEN_NOISE: noise}  # fmt: skip
        _, hidden, (ids, scores, bound) = self._call_in_place(session, "single", lo, hi, call, reqs, n)
        self.stats["screened_calls"] += 1
        tokens = np.full((B, k), -1, np.int64)
        for r in reqs:
            b = r.slot - lo
            noise_r, t, allowed = r.draw  # type: ignore[misc]
            tokens[b] = screen_draws(ids[b, :k], scores[b, :k], bound[b, :k], noise_r, t, allowed)
            if (tokens[b] < 0).any():
                self.stats["screen_fallbacks"] += 1
                return None, hidden
        return tokens, hidden

    def _call_in_place(self, session, kind: str, lo: int, hi: int, feeds: dict, reqs: list[_Request], n: int):
        """Run ``session`` (model.onnx, or fold.onnx: ``kind`` "fold") over the slots ``lo .. hi`` of
        the cache, bound once per range as every layer's past and present (fold.onnx: the block as
        one sequence ``[1, slots x kv_heads, capacity, head_dim]``); the logits, the hidden states and, on a
        model.onnx with the lm_head screen, its three outputs (else None)."""
        from runtime.onnxrt import _bind

        screen = kind == "single" and self.screen_graph
        if screen:  # bound every call (a binding outlives its call): the defaults where the call screens nothing
            feeds.setdefault(SCREEN_INPUT, np.zeros(1, np.int64))
            if self.screen_noise_input:
                feeds.setdefault(SCREEN_NOISE, self._no_noise)
        io = self._bindings.get((kind, lo, hi))
        if io is None:
            io = self._bindings[(kind, lo, hi)] = session.io_binding()
            io.bind_output("logits", "cpu")  # first: get_outputs() lists the outputs in binding order
            io.bind_output("hidden_states", "cpu")
            for name in SCREEN_OUTPUTS if screen else ():
                io.bind_output(name, "cpu")
            for j, name in enumerate(self._cache_names):  # k0, v0, k1, v1, ...: contiguous slices of the buffer
                buf = self.kv[j // 2, j % 2, lo:hi]
                shape = [1, buf.shape[0] * buf.shape[1], *buf.shape[2:]] if kind == "fold" else list(buf.shape)
                io.bind_input(name, "cpu", 0, self._dtype, shape, buf.ctypes.data)
                io.bind_output(self._single_present[j], "cpu", 0, self._dtype, shape, buf.ctypes.data)
        io.bind_output("logits", "cpu")  # unallocated again: ONNX Runtime sizes them for this call
        io.bind_output("hidden_states", "cpu")
        for name in SCREEN_OUTPUTS if screen else ():
            io.bind_output(name, "cpu")
        keep = [_bind(io.bind_input, name, arr) for name, arr in feeds.items()]
        t = time.perf_counter()
        session.run_with_iobinding(io)
        self.stats["engine_s"] += time.perf_counter() - t
        outs = (
            io.get_outputs()
        )  # logits and hidden states (and the screen's): the cache outputs are the slots themselves
        logits, hidden = outs[0].numpy(), outs[1].numpy()
        screened = tuple(o.numpy() for o in outs[2:5]) if screen else None
        del keep
        st = self.stats
        st["calls"] += 1
        st["sequences"] += len(reqs)
        st["rows"] += sum(r.rows for r in reqs)
        st["padded_rows"] += (hi - lo) * n
        return logits, hidden, screened

    def _fold_lengths(self, reqs: list[_Request]) -> np.ndarray | None:
        """The ``cache_lengths`` of the slots ``lo .. hi`` for a call on fold.onnx, or None where
        it cannot take the call (no folded graph, more slots than it branches over, or new entries
        that would not fit the context at the longest cache). A slot in the range that is not in
        the call gets throwaway rows: a held one at its own length, a free one past what it keeps
        (every row of the call writes its entries at the longest length, past what any slot holds)."""
        if self.fold is None or not FOLD_STEPS:
            return None
        lo, hi = reqs[0].slot, reqs[-1].slot + 1
        if not 2 <= hi - lo <= self.fold_max:
            return None
        lens = self._range_lengths(reqs)
        if int(lens.max()) + max(r.rows for r in reqs) > self.max_context:
            return None
        return lens

    def _run_fold(self, reqs: list[_Request], lens: np.ndarray) -> None:
        """Steps (and prompt chunks) of 2 .. fold_max sequences on fold.onnx: the slots ``lo .. hi``
        of the cache bound as one sequence, past and present, so that GroupQueryAttention reads each
        slot's first ``lens[b]`` entries and writes every sequence's new entries in place at
        ``max(lens)``, whence they are staged (commit writes the kept ones at the slot's length)."""
        lo, hi = reqs[0].slot, reqs[-1].slot + 1
        B = hi - lo
        n = max(r.rows for r in reqs)
        at = int(lens.max())
        self._ensure_capacity(at + n)
        ids, pos, mask = _padded(reqs, lo, B, n)
        session = self.fold
        assert session is not None
        feeds = {"input_ids": ids, "position_ids": pos, "tree_mask": mask, "cache_lengths": lens,
                 "num_logits": np.array([n], np.int64)}  # fmt: skip
        logits, hidden, _ = self._call_in_place(session, "fold", lo, hi, feeds, reqs, n)
        for r in reqs:
            b, m = r.slot - lo, r.rows
            k_r = m if r.logits is None else min(int(r.logits), m)
            rows = logits[b, m - k_r : m]
            r.result = (
                rows.copy() if r.draw is None else draw_argmax(rows, *r.draw),
                hidden[b, :m].copy(),
                self.kv[:, :, r.slot, :, at : at + m].copy(),
            )

    def _run_batch(self, reqs: list[_Request]) -> None:
        from runtime.onnxrt import _bind

        lo, hi = reqs[0].slot, reqs[-1].slot + 1
        B = hi - lo
        n = max(r.rows for r in reqs)
        self._ensure_capacity(max(self._len[r.slot] + r.rows for r in reqs))
        ids, pos, mask = _padded(reqs, lo, B, n)
        lens = np.zeros(B, np.int64)
        for r in reqs:
            lens[r.slot - lo] = self._len[r.slot]
        single = len(reqs) == 1
        k = n if not single or reqs[0].logits is None else max(0, min(int(reqs[0].logits), n))
        io = self._bindings.get(("batch", lo, hi))
        if io is None:
            io = self._bindings[("batch", lo, hi)] = self.session.io_binding()
            for j, name in enumerate(self._cache_names):  # k0, v0, k1, v1, ...: contiguous slices of the buffer
                buf = self.kv[j // 2, j % 2, lo:hi]
                io.bind_input(name, "cpu", 0, self._dtype, list(buf.shape), buf.ctypes.data)
        for name in self._out_names:  # unallocated: ONNX Runtime sizes them for this call
            io.bind_output(name, "cpu")
        keep = [
            _bind(io.bind_input, "input_ids", ids),
            _bind(io.bind_input, "position_ids", pos),
            _bind(io.bind_input, "tree_mask", mask),
            _bind(io.bind_input, "cache_lengths", lens),
            _bind(io.bind_input, "num_logits", np.array([k], np.int64)),
        ]
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
            if single:  # the graph computed the k rows asked for
                rows = logits[b]
            else:  # every row was computed: the last k of this sequence's m
                k_r = m if r.logits is None else min(int(r.logits), m)
                rows = logits[b, m - k_r : m]
            out = rows.copy() if r.draw is None else draw_argmax(rows, *r.draw)
            r.result = (out, hidden[b, :m].copy(), new[:, :, b, :, :m].copy())


def own_error(error: BaseException) -> BaseException:
    """``error`` as one thread raises it: a copy (a traceback of its own), caused by the original. One
    exception object raised again and again (every request of a stopped engine gets its failure, every
    sequence of a failed call that call's error) would gather each raiser's frames into its traceback,
    keeping their arrays alive, and mix threads' tracebacks."""
    try:
        mine = copy.copy(error)
    except Exception:  # a type copy cannot rebuild from its args
        mine = EngineError(f"{type(error).__name__}: {error}")
    mine.__cause__ = error
    return mine


def profile_requests(seqs: int, rows: int, cached: int) -> list[_Request]:
    """The greedy step call :meth:`BatchEngine.profile` times: slots ``0 .. seqs - 1`` (their caches
    ``cached`` long, set by the caller) each with ``rows`` new tokens under a causal mask, drawn as
    greedy steps draw (through the screen where the engine screens)."""
    reqs = [_Request(i, "forward", ids=np.zeros(rows, np.int64), pos=cached + np.arange(rows),
                     mask=np.tril(np.ones((rows, rows), bool))) for i in range(seqs)]  # fmt: skip
    for r in reqs:
        r.draw = (None, 1.0, None)
    return reqs


def _padded(reqs: list[_Request], lo: int, B: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input ids, positions and tree masks ``[B, n]`` / ``[B, n, n]`` for the slots ``lo ..
    lo + B``: each sequence's rows first, then copies of its last token that see only
    themselves (nothing reads them); slots not in the call, one such row at position 0."""
    ids = np.zeros((B, n), np.int64)
    pos = np.zeros((B, n), np.int64)
    mask = np.broadcast_to(np.eye(n, dtype=bool), (B, n, n)).copy()
    for r in reqs:
        b, m = r.slot - lo, r.rows
        ids[b, :m], ids[b, m:] = r.ids, r.ids[-1]
        pos[b, :m], pos[b, m:] = r.pos, r.pos[-1]
        mask[b, :m, :m] = r.mask
    return ids, pos, mask


def choose_budget(busy: int, costs: dict, steps: list, host: dict | None = None) -> int | None:
    """The step budget (tokens per sequence) with the most tokens per second when ``busy``
    sequences decode, or None (no limit) until WARMUP_STEPS steps ran without one.

    ``steps``: (rows, tokens emitted) of recent steps that ran with no limit: how often a step
    carries lookup drafts (more rows than the bare tree, ``T`` = the fewest rows above 1) and what
    each kind emits. A budget ``c`` changes such a step into the bare tree (tokens: the mean of
    ``T``-row steps) where ``c < rows``, or a plain step (1 token) where ``c < T``. A call pads every
    sequence to the largest of its ``busy`` steps, so its cost is the expectation, over the
    distribution of that largest row count, of the profiled seconds per call at the nearest
    profiled batch size and row count at or above it, plus
    ``busy`` times the host's seconds per sequence between two calls of that kind of step
    (``host["plain"]`` / ``host["tree"]``, measured while serving: acceptance, the heads call and the
    tree are paid on the host, serialised by the GIL). A tree budget must beat plain steps by TREE_MARGIN."""
    if not costs or len(steps) < WARMUP_STEPS:
        return None
    rows = np.array([r for r, _ in steps])
    tokens = np.array([t for _, t in steps], dtype=np.float64)
    multi = rows[rows > 1]
    if not len(multi):
        return None
    tree = int(multi.min())
    tree_tokens = float(tokens[rows == tree].mean())
    sizes = sorted({b for b, _ in costs})
    b = next((s for s in sizes if s >= busy), sizes[-1])
    profiled = sorted(n for s, n in costs if s == b)
    best, best_rate, plain_rate = 1, -1.0, 0.0
    for c in sorted({1, *rows.tolist()}):
        r = np.where(rows <= c, rows, tree if c >= tree else 1)
        t = np.where(rows <= c, tokens, tree_tokens if c >= tree else 1.0)
        # a call pads to the largest of `busy` draws: its expected cost over P(max = v) = F(v)^busy - F(v-)^busy
        values, counts = np.unique(r, return_counts=True)
        cdf = np.cumsum(counts) / len(r)
        p_max = np.diff(np.r_[0.0, cdf**busy])
        cost = sum(p * costs[(b, next((n for n in profiled if n >= v), profiled[-1]))] for v, p in zip(values, p_max))
        cost += busy * ((host or {}).get("plain" if c == 1 else "tree") or 0.0)
        rate = float(t.mean()) / cost
        if c == 1:
            plain_rate = rate
        if rate > best_rate:
            best, best_rate = int(c), rate
    # speculation must win clearly: the estimates are noisy, and a wrong tree costs more than a wrong plain step
    return best if best_rate >= TREE_MARGIN * plain_rate else 1


def _generator_class():
    from runtime.api import MedusaGenerator

    class BatchedGenerator(MedusaGenerator):
        """A generator whose ``generate`` / ``stream`` calls from several threads decode together:
        each call takes a slot of one :class:`BatchEngine` (waiting while all ``max_batch`` are
        taken) and runs the decode loop on it; the engine runs their steps as one call."""

        def __init__(self, folder, max_batch: int, *, threads=None, max_context=None, tree=None,
                     prefill_chunk=None, verify=False, gather_timeout=DEFAULT_GATHER_TIMEOUT,
                     budgets="auto", reuse_prefix=True):  # fmt: skip
            self._batch_args = (max_batch, gather_timeout, budgets)
            chunk = DEFAULT_BATCH_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
            super().__init__(folder, backend="onnxruntime", device="cpu", threads=threads, max_context=max_context,
                             tree=tree, verify=verify, prefill_chunk=chunk, reuse_prefix=reuse_prefix)  # fmt: skip

        def _limit_screen(self, rows: int | None) -> None:
            self.engine.screen_max_rows = rows

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
            slot = self.engine.acquire(prompt=list(ids) if self.reuse_prefix else None)
            tokens = list(ids)  # the slot's cache holds a prefix of these (between steps, all but the last)
            failed = False  # a step raised: what the cache holds is not known
            try:
                events = decode_steps(slot, ids, cfg, tree, self.tokenizer.decode, self.datastore, self.cost_model,
                                      slot.reusable)  # fmt: skip
                while True:
                    with self.engine.computing(slot):
                        try:
                            event = next(events, None)
                        except BaseException:
                            failed = True
                            raise
                    if event is None:
                        return
                    tokens.extend(event.tokens)
                    yield event
            finally:  # finished, failed, closed or collected: the slot is free for the next sequence
                self.engine.release(slot, None if failed else tokens, len(ids))

        _generate_events = _stream_events

        def close(self) -> None:
            self.engine.close()

    return BatchedGenerator


def check_budgets(budgets):
    """``budgets`` as the engine keeps it: None, ``"auto"`` or a list of token budgets >= 1."""
    if budgets is None or (isinstance(budgets, str) and budgets == "auto"):
        return budgets
    if not isinstance(budgets, (list, tuple)):
        raise MedusaError(
            "budgets must be 'auto' (from the cost profile and the acceptance seen), None (no limit) or a list of "
            f"token budgets (budgets[k] when k + 1 sequences decode), got {checks.show(budgets)}"
        )
    if not budgets:
        raise MedusaError("budgets: give at least one token budget (or None / 'auto')")
    return [cast(int, checks.integer("budgets", b, 1)) for b in budgets]


def load_batched(folder, max_batch: int, **kwargs):
    """``runtime.load(folder, max_batch=N)``: a generator over :class:`BatchEngine` (see the module)."""
    check_budgets(kwargs.get("budgets", "auto"))  # before the artifact loads
    return _generator_class()(folder, max_batch, **kwargs)
