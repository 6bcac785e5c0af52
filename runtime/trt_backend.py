"""TensorRT backend: the artifact's engines behind the runtime's Backend interface.

Everything stays on the GPU between steps: inputs, outputs, a preallocated KV cache and
the staging rows of the last forward. Three layers, of which only the last needs
``tensorrt``:

1. **Pure planning** (tested without TensorRT): the dtype table, :func:`plan_buffers`
   (every device buffer and its size), :class:`EngineDescription` and
   :func:`check_engine` (an engine's I/O and profiles against ``trt_plan.json``),
   :func:`compaction_runs` (which cache rows receive which staged rows for an accepted
   path, one copy per contiguous run), :func:`schedule_forward` (which engine calls run
   one forward) and :func:`tree_parents`.
2. **Orchestration** (:class:`StagedEngineBackend`): forward/commit/head_logits over a few
   device primitives (run one engine call, copy rows). The tests drive it with a numpy
   engine; :class:`TensorRTBackend` drives it with TensorRT and torch CUDA tensors.
3. **Glue** (:class:`TensorRTBackend`): lazy ``import tensorrt``, one execution context
   per optimization profile (prefill / verify / decode) sharing one scratch buffer, fixed
   tensor addresses, ``set_input_shape`` + ``execute_async_v3`` on one CUDA stream.

Cache layout (per K and per V): ``[layers, rows, kv_heads, head_dim]`` at batch 1, so
layer ``i``'s past is the contiguous prefix of ``cache[i]`` (its address never changes;
only its length does) and the staged ``present.{i}`` rows sit at ``stage[i]``. Both row
counts are padded so that every layer starts on a 256-byte boundary (TensorRT's
requirement for tensor addresses).
"""

from __future__ import annotations

import ctypes
import math
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporter.trt_plan import DECODE, BuildPlan, Graph, PlanError, read_plan, route
from runtime.artifact import ArtifactConfig, ModelSpec
from runtime.backend import DeviceCacheBackend
from runtime.errors import ArtifactError, BackendUnavailableError, ContextLengthError, MedusaError

ALIGN = 256  # bytes: TensorRT needs every tensor address 256-byte aligned
MIN_TENSORRT = (10, 0)

# dtype names as TensorRT's DataType enum spells them -> (numpy dtype, bytes)
TRT_DTYPES = {"FLOAT": (np.float32, 4), "HALF": (np.float16, 2), "INT64": (np.int64, 8), "INT32": (np.int32, 4),
              "BOOL": (np.bool_, 1), "INT8": (np.int8, 1), "UINT8": (np.uint8, 1), "BF16": (None, 2)}  # fmt: skip
ARTIFACT_TO_TRT = {"float32": "FLOAT", "float16": "HALF"}


# ---------------------------------------------------------------------------- availability


def cuda_device_count() -> int:
    """CUDA devices the driver sees (0 without a driver); ctypes only, no torch needed."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def require_tensorrt():
    """``import tensorrt`` (>= 10.0), or one BackendUnavailableError saying what to do."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed: building or running TensorRT engines needs the `tensorrt` Python "
            "package (>= 10.0, pip install tensorrt; wheels come from NVIDIA's index pypi.nvidia.com) and an "
            "NVIDIA GPU. Without it, run the artifact with ONNX Runtime, or print the trtexec commands with "
            "`medusa-export trtexec ARTIFACT` and build on a machine that has TensorRT."
        ) from None
    version = tuple(int(x) for x in str(getattr(trt, "__version__", "0")).split(".")[:2] if x.isdigit())
    if version < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} is too old: medusa-trt needs >= "
            f"{'.'.join(map(str, MIN_TENSORRT))} (name-based I/O, execute_async_v3, INT64 inputs)"
        )
    return trt


def require_gpu() -> None:
    if cuda_device_count() < 1:
        raise BackendUnavailableError(
            "no CUDA GPU is visible (the NVIDIA driver reports no device): TensorRT engines build and run only "
            "on an NVIDIA GPU"
        )


def require_cuda_torch():
    """torch with CUDA: the backend's device buffers are torch CUDA tensors."""
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError("the TensorRT backend keeps its buffers in torch CUDA tensors: install torch with CUDA") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"torch {torch.__version__} has no CUDA device: the TensorRT backend needs torch with CUDA")
    return torch


# ---------------------------------------------------------------------------- engine description


@dataclass
class TensorIO:
    name: str
    mode: str  # "input" | "output"
    dtype: str  # TensorRT DataType name: FLOAT, HALF, INT64, BOOL, ...
    shape: tuple[int, ...]  # -1 for dynamic dims
    profiles: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # inputs


@dataclass
class EngineDescription:
    """What the backend needs to know about an engine; built from a real one or from the plan."""

    tensors: list[TensorIO]
    num_profiles: int
    device_memory: int = 0  # scratch bytes one execution context needs (max over profiles)

    def tensor(self, name: str) -> TensorIO | None:
        return next((t for t in self.tensors if t.name == name), None)


def expected_description(plan: BuildPlan, which: str = "backbone") -> EngineDescription:
    """The description an engine built from ``plan`` must have (the fake engine of the tests)."""
    graph: Graph = plan.backbone if which == "backbone" else plan.heads
    act = ARTIFACT_TO_TRT[plan.dtype]
    tensors = []
    for name, dims in graph.inputs.items():
        dtype = {"input_ids": "INT64", "position_ids": "INT64", "tree_mask": "BOOL"}.get(name, act)
        shape = tuple(-1 if isinstance(d, str) else d for d in dims)
        tensors.append(TensorIO(name, "input", dtype, shape, [graph.shapes(p)[name] for p in graph.profiles]))
    if which == "backbone":
        kv = (-1, -1, plan.num_kv_heads, plan.head_dim)
        tensors.append(TensorIO("logits", "output", act, (-1, -1, plan.vocab_size)))
        tensors.append(TensorIO("hidden_states", "output", act, (-1, -1, plan.hidden_size)))
        tensors += [TensorIO(n.replace("past_key_values.", "present."), "output", act, kv) for n in plan.past_names]
    else:
        tensors.append(TensorIO("medusa_logits", "output", act, (-1, plan.num_medusa_heads, plan.vocab_size)))
    return EngineDescription(tensors, num_profiles=len(graph.profiles))


def check_engine(desc: EngineDescription, plan: BuildPlan, which: str, path: str | Path) -> None:
    """ArtifactError listing every way the engine at ``path`` differs from the plan."""
    want = expected_description(plan, which)
    problems = []
    if desc.num_profiles != want.num_profiles:
        problems.append(f"{desc.num_profiles} optimization profiles, the plan has {want.num_profiles}")
    for w in want.tensors:
        got = desc.tensor(w.name)
        if got is None:
            problems.append(f"no {w.mode} tensor {w.name}")
            continue
        if got.mode != w.mode or got.dtype != w.dtype:
            problems.append(f"{w.name}: {got.mode} {got.dtype}, expected {w.mode} {w.dtype}")
        if len(got.shape) != len(w.shape) or any(g != x for g, x in zip(got.shape, w.shape) if x != -1):
            problems.append(f"{w.name}: shape {got.shape}, expected {w.shape}")
        if w.mode == "input" and desc.num_profiles == want.num_profiles:
            for i, (g, x) in enumerate(zip(got.profiles, w.profiles)):
                if tuple(map(tuple, g)) != tuple(map(tuple, x)):
                    problems.append(f"{w.name} profile {i}: min/opt/max {g}, the plan says {x}")
    extra = {t.name for t in desc.tensors} - {t.name for t in want.tensors}
    if extra:
        problems.append(f"tensors the plan does not know: {sorted(extra)[:4]}")
    if problems:
        raise ArtifactError(
            f"{path} was not built from this trt_plan.json ({len(problems)} difference(s); rebuild with "
            "medusa-export build-engine):\n  " + "\n  ".join(problems[:12])
        )


def describe_engine(engine, trt) -> EngineDescription:
    """Read an ICudaEngine's I/O and profile shapes (TensorRT >= 10 name-based API)."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        profiles = []
        if is_input:
            for p in range(engine.num_optimization_profiles):
                profiles.append(tuple(tuple(d) for d in engine.get_tensor_profile_shape(name, p)))
        tensors.append(
            TensorIO(name, "input" if is_input else "output", engine.get_tensor_dtype(name).name, tuple(engine.get_tensor_shape(name)), profiles)
        )
    memory = getattr(engine, "device_memory_size_v2", None)
    if memory is None:
        memory = engine.device_memory_size
    return EngineDescription(tensors, engine.num_optimization_profiles, int(memory))


# ---------------------------------------------------------------------------- buffer planner


def aligned_rows(rows: int, row_bytes: int, align: int = ALIGN) -> int:
    """Smallest count >= ``rows`` whose byte size is a multiple of ``align``."""
    step = align // math.gcd(align, row_bytes)
    return -(-rows // step) * step


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class BufferPlan:
    """The backend's device memory: one arena, each buffer at a 256-byte aligned offset."""

    buffers: dict[str, Buffer]
    capacity: int  # cache positions the runtime uses
    stage_rows: int  # staged rows: a forward's new tokens, plus one (node-by-node forwards)
    scratch: int  # TensorRT activation memory shared by the execution contexts
    offsets: dict[str, int] = field(default_factory=dict)  # byte offset of each buffer in the arena
    arena_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values()) + self.scratch


def plan_buffers(plan: BuildPlan, capacity: int | None = None, backbone: EngineDescription | None = None,
                 heads: EngineDescription | None = None) -> BufferPlan:  # fmt: skip
    """Every device buffer the backend allocates, at its largest shape."""
    cap = plan.max_context if capacity is None else capacity
    if not 2 <= cap <= plan.max_context:
        raise PlanError(f"cache capacity must lie in [2, {plan.max_context}] (the engine's max_context), got {cap}")
    act = np.dtype(TRT_DTYPES[ARTIFACT_TO_TRT[plan.dtype]][0]).name
    row_bytes = plan.num_kv_heads * plan.head_dim * np.dtype(act).itemsize
    new = plan.max_new_tokens
    cache_rows = aligned_rows(cap, row_bytes)
    stage_rows = aligned_rows(new + 1, row_bytes)
    kv = (plan.num_layers, None, plan.num_kv_heads, plan.head_dim)
    b = [
        Buffer("input_ids", (new,), "int64"),
        Buffer("position_ids", (new,), "int64"),
        Buffer("tree_mask", (new * new,), "bool"),  # viewed as [1, n, n] per call
        Buffer("logits", (new, plan.vocab_size), act),
        Buffer("hidden_states", (new, plan.hidden_size), act),
        Buffer("hidden_store", (cap, plan.hidden_size), act),  # hidden rows of multi-call forwards
        Buffer("cache_k", (kv[0], cache_rows, *kv[2:]), act),
        Buffer("cache_v", (kv[0], cache_rows, *kv[2:]), act),
        Buffer("stage_k", (kv[0], stage_rows, *kv[2:]), act),
        Buffer("stage_v", (kv[0], stage_rows, *kv[2:]), act),
        Buffer("heads_in", (1, plan.hidden_size), act),
        Buffer("heads_out", (1, plan.num_medusa_heads, plan.vocab_size), act),
    ]
    scratch = max(backbone.device_memory if backbone else 0, heads.device_memory if heads else 0)
    offsets, end = {}, 0
    for x in b:  # one arena: alignment does not depend on the allocator
        offsets[x.name] = end
        end += -(-x.nbytes // ALIGN) * ALIGN
    return BufferPlan({x.name: x for x in b}, cap, stage_rows, scratch, offsets, end)


# ---------------------------------------------------------------------------- KV compaction


def compaction_runs(keep, resident: int = 0, stage_base: int = 0) -> list[tuple[int, int, int]]:
    """Copies that append the accepted rows ``keep`` to the cache, as ``(stage_row, offset, count)``.

    ``keep`` indexes the last forward's tokens (in order); accepted token ``j`` goes to
    cache row ``cache_len + j``. Tokens below ``resident`` are already in the cache at
    ``cache_len + index`` (earlier chunks of a chunked prefill): they must be kept in
    place. The others come from staging row ``stage_base + index - resident``.
    Consecutive accepted rows form one run, so a chain (or a prefix of the tree's first
    branch) costs one copy for all layers.
    """
    keep = [int(k) for k in keep]
    if any(b <= a for a, b in zip(keep, keep[1:])) or (keep and keep[0] < 0):
        raise MedusaError(f"commit(keep): indices must be distinct, non-negative and increasing, got {keep[:16]}")
    runs: list[tuple[int, int, int]] = []
    for j, k in enumerate(keep):
        if k < resident:
            if k != j:
                raise MedusaError(
                    f"commit(keep): token {k} of a chunked forward is already cached at offset {k}; it cannot move to {j}"
                )
            continue
        src = stage_base + k - resident
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == j:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, j, 1))
    return runs


# ---------------------------------------------------------------------------- scheduling


def tree_parents(mask: np.ndarray) -> np.ndarray:
    """Parent of each token under ``mask`` (-1 for roots) when every token sees exactly its
    ancestors and itself (tree or causal masks); MedusaError naming the first row that does not."""
    mask = np.asarray(mask, dtype=bool)
    n = len(mask)
    parents = np.full(n, -1, dtype=np.int64)
    for j in range(n):
        seen = np.flatnonzero(mask[j])
        if not mask[j, j] or seen.max() != j:
            raise MedusaError(f"tree_mask row {j} must see itself and only earlier tokens, sees {seen.tolist()[:8]}")
        if len(seen) > 1:
            p = seen[-2]
            want = mask[p].copy()
            want[j] = True
            if not np.array_equal(mask[j], want):
                raise MedusaError(f"tree_mask row {j} is not its parent row {p} plus itself: not a tree mask")
            parents[j] = p
    return parents


@dataclass
class ForwardSchedule:
    """How one forward of ``n`` tokens runs: ``single`` / ``chunked`` (list of chunks) or
    ``nodes`` (each token alone on the decode profile, its ancestors copied in front of it)."""

    kind: str
    chunks: list = field(default_factory=list)
    parents: np.ndarray | None = None


def schedule_forward(plan: BuildPlan, past: int, mask: np.ndarray) -> ForwardSchedule:
    """Engine calls for ``len(mask)`` new tokens on a cache of ``past``.

    One call when a profile takes (past, n). Else chunks (a long prompt): exact when every
    chunk's tokens see all earlier tokens of the forward, since earlier chunks are then
    ordinary cache. Else, for a tree near the end of the context (where the verify
    profile's ``past <= max_context - max_tree_nodes`` does not reach), each token runs
    alone on the decode profile with its ancestors' entries copied in front of it: exact,
    and only ever needed for the last ``max_tree_nodes`` positions of the context.
    """
    n = len(mask)
    chunks = route(plan, past, n)
    if len(chunks) == 1:
        return ForwardSchedule("single", chunks)
    if all(np.asarray(mask)[c.start : c.start + c.size, : c.start].all() for c in chunks):
        return ForwardSchedule("chunked", chunks)
    if n > plan.max_new_tokens:
        raise MedusaError(
            f"a forward of {n} tokens whose mask is not causal exceeds the engine's largest profile "
            f"({plan.max_new_tokens} new tokens): rebuild the engine with a larger --max-tree-nodes"
        )
    parents = tree_parents(mask)
    return ForwardSchedule("nodes", [], parents)


# ---------------------------------------------------------------------------- orchestration


class StagedEngineBackend(DeviceCacheBackend):
    """forward / commit / head_logits over a device cache and staging rows.

    Subclasses provide the device primitives:

    * ``_call(profile, past, ids, pos, mask)``: one engine call on ``n`` tokens whose
      cache is ``cache[:, :past]``; writes ``present`` to stage rows ``[0, n)`` and the
      logits / hidden states to the output rows ``[0, n)``;
    * ``_copy(dst, dst_row, src, src_row, count)``: rows of every layer, K and V, between
      ``"cache"`` and ``"stage"``;
    * ``_logits(n)``: host array of output logits rows ``[0, n)``;
    * ``_store_hidden(n, offset)``: output hidden rows ``[0, n)`` -> hidden store;
    * ``_run_heads(row, stored)``: Medusa heads on one hidden row -> host ``[K, V]``.
    """

    def __init__(self, spec: ModelSpec, plan: BuildPlan, capacity: int):
        self.spec = spec
        self.plan = plan
        self.capacity = capacity
        self.length = 0
        self._staged = False
        self._resident = 0  # forward tokens already in the cache (chunked prefill)
        self._stage_base = 0  # stage row of forward token ``resident``
        self._hidden_stored = False
        self._n = 0
        self._decode = plan.backbone.profile_index(DECODE)

    # -- Backend interface -----------------------------------------------------------

    def reset(self) -> None:
        self.length = 0
        self._staged = False
        self._n = 0

    def forward(self, input_ids, position_ids, tree_mask):
        ids = np.asarray(input_ids, dtype=np.int64)
        pos = np.asarray(position_ids, dtype=np.int64)
        mask = np.asarray(tree_mask, dtype=bool)
        n = len(ids)
        if n < 1 or pos.shape != (n,) or mask.shape != (n, n):
            raise MedusaError(
                f"forward: input_ids {ids.shape}, position_ids {pos.shape}, tree_mask {mask.shape}; "
                "expected [n], [n], [n, n] with n >= 1"
            )
        if self.length + n > self.capacity:
            raise ContextLengthError(
                f"{self.length} cached + {n} new tokens exceed the cache capacity of {self.capacity} tokens"
            )
        sched = schedule_forward(self.plan, self.length, mask)
        self._n = n
        if sched.kind == "single":
            self._call(sched.chunks[0].profile, self.length, ids, pos, mask)
            self._resident, self._stage_base, self._hidden_stored = 0, 0, False
            logits = self._logits(n)
        elif sched.kind == "chunked":
            logits = self._forward_chunked(sched.chunks, ids, pos, mask)
        else:
            logits = self._forward_nodes(sched.parents, ids, pos)
        self._staged = True
        return logits

    def commit(self, keep) -> None:
        if not self._staged:
            raise RuntimeError("commit() without a forward() to commit")
        keep = np.asarray(keep, dtype=np.int64)
        if len(keep) and (keep.min() < 0 or keep.max() >= self._n):
            raise MedusaError(f"commit(keep): indices must lie in [0, {self._n}), got {keep.min()}..{keep.max()}")
        for src, offset, count in compaction_runs(keep, self._resident, self._stage_base):
            self._copy("cache", self.length + offset, "stage", src, count)
        self.length += len(keep)
        self._staged = False

    def head_logits(self, index: int) -> np.ndarray:
        if self._n == 0:
            raise RuntimeError("head_logits() before any forward()")
        if not 0 <= index < self._n:
            raise MedusaError(f"head_logits({index}): the last forward had {self._n} tokens")
        return self._run_heads(int(index), self._hidden_stored)

    # -- multi-call forwards -----------------------------------------------------------

    def _forward_chunked(self, chunks, ids, pos, mask) -> np.ndarray:
        logits = np.empty((len(ids), self.spec.vocab_size), dtype=np.float32)
        for c in chunks:
            s, e = c.start, c.start + c.size
            self._call(c.profile, self.length + s, ids[s:e], pos[s:e], mask[s:e, s:e])
            logits[s:e] = self._logits(c.size)
            self._store_hidden(c.size, s)
            if e < len(ids):  # earlier chunks become cache for the later ones
                self._copy("cache", self.length + s, "stage", 0, c.size)
        self._resident, self._stage_base, self._hidden_stored = chunks[-1].start, 0, True
        return logits

    def _forward_nodes(self, parents, ids, pos) -> np.ndarray:
        """Each token alone, on a cache of ``length + depth`` whose tail holds its ancestors.

        Token ``j``'s entries are kept in stage row ``1 + j`` (row 0 receives each call's
        present), and copied into the cache tail when a later token needs them.
        """
        n = len(ids)
        logits = np.empty((n, self.spec.vocab_size), dtype=np.float32)
        tail: list[int] = []  # tokens whose entries sit at cache rows length + 0, 1, ...
        one = np.ones((1, 1), dtype=bool)
        for j in range(n):
            chain = []
            p = parents[j]
            while p >= 0:
                chain.append(int(p))
                p = parents[p]
            chain.reverse()
            common = 0
            while common < min(len(chain), len(tail)) and chain[common] == tail[common]:
                common += 1
            for d in range(common, len(chain)):
                self._copy("cache", self.length + d, "stage", 1 + chain[d], 1)
            tail = chain
            self._call(self._decode, self.length + len(chain), ids[j : j + 1], pos[j : j + 1], one)
            logits[j] = self._logits(1)[0]
            self._store_hidden(1, j)
            self._copy("stage", 1 + j, "stage", 0, 1)
        self._resident, self._stage_base, self._hidden_stored = 0, 1, True
        return logits

    # -- device primitives -------------------------------------------------------------

    @abstractmethod
    def _call(self, profile: int, past: int, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray) -> None: ...

    @abstractmethod
    def _copy(self, dst: str, dst_row: int, src: str, src_row: int, count: int) -> None: ...

    @abstractmethod
    def _logits(self, n: int) -> np.ndarray: ...

    @abstractmethod
    def _store_hidden(self, n: int, offset: int) -> None: ...

    @abstractmethod
    def _run_heads(self, row: int, stored: bool) -> np.ndarray: ...


# ---------------------------------------------------------------------------- TensorRT glue


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "bool": "bool"}


class TensorRTBackend(StagedEngineBackend):
    """Run ``model.engine`` / ``heads.engine`` of an artifact on one GPU (batch 1)."""

    @classmethod
    def from_artifact(cls, folder: str | Path, config: ArtifactConfig | None = None, max_context: int | None = None,
                      device: str = "cuda"):  # fmt: skip
        """The backend for an artifact folder with a built engine; ``device``: a torch device (``cuda:1``)."""
        trt = require_tensorrt()
        require_gpu()
        torch = require_cuda_torch()
        folder = Path(folder)
        if config is None:
            from runtime.artifact import read_artifact

            config = read_artifact(folder)
        plan = read_plan(folder)
        for graph in (plan.backbone, plan.heads):
            if not (folder / graph.engine).is_file():
                raise ArtifactError(
                    f"{folder / graph.engine} is missing: build it with `medusa-export build-engine {folder}` "
                    f"or run {folder / 'trtexec.sh'}"
                )
        cap = plan.max_context if max_context is None else min(max_context, plan.max_context)
        return cls(trt, torch, folder, config.model, plan, cap, device)

    def __init__(self, trt, torch, folder: Path, spec: ModelSpec, plan: BuildPlan, capacity: int, device: str = "cuda"):
        super().__init__(spec, plan, capacity)
        self.trt, self.torch = trt, torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._load(folder / plan.backbone.engine)
        self.heads_engine = self._load(folder / plan.heads.engine)
        desc, heads_desc = describe_engine(self.engine, trt), describe_engine(self.heads_engine, trt)
        check_engine(desc, plan, "backbone", folder / plan.backbone.engine)
        check_engine(heads_desc, plan, "heads", folder / plan.heads.engine)
        self.layout = plan_buffers(plan, capacity, desc, heads_desc)
        dev = self.device = torch.device(device)
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)  # TensorRT runs on the current device
        # one allocation, every buffer at a 256-byte aligned offset from an aligned base
        self.arena = torch.empty(self.layout.arena_bytes + ALIGN, dtype=torch.uint8, device=dev)
        base = -self.arena.data_ptr() % ALIGN
        self.buf = {}
        for b in self.layout.buffers.values():
            start = base + self.layout.offsets[b.name]
            raw = self.arena[start : start + b.nbytes]
            self.buf[b.name] = raw.view(getattr(torch, _TORCH_DTYPES.get(b.dtype, b.dtype))).view(b.shape)
        self.scratch = torch.empty(max(self.layout.scratch, 1), dtype=torch.uint8, device=dev)
        self.stream = torch.cuda.Stream()
        self.contexts = [self._context(self.engine, i) for i in range(desc.num_profiles)]
        self.heads_context = self._context(self.heads_engine, 0)
        self._bind_addresses()
        pinned = dev.type == "cuda"  # page-locked host buffers: asynchronous device-to-host copies
        host = torch.empty(self.layout.buffers["logits"].shape, dtype=self.buf["logits"].dtype, pin_memory=pinned)
        self._host_logits = host
        self._host_heads = torch.empty(self.layout.buffers["heads_out"].shape, dtype=host.dtype, pin_memory=pinned)
        self.stream.synchronize()

    def _load(self, path: Path):
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ArtifactError(
                f"{path}: TensorRT {self.trt.__version__} could not load this engine (built by another TensorRT "
                "version or for another GPU?); rebuild it with medusa-export build-engine"
            )
        return engine

    def _context(self, engine, profile: int):
        # user-managed scratch: the contexts run one at a time on one stream, so they share it
        ctx = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        else:
            ctx.device_memory = self.scratch.data_ptr()
        ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
        return ctx

    def _bind_addresses(self) -> None:
        """Every tensor address is fixed for the backend's life: only shapes change per call."""
        b = self.buf
        fixed = {
            "input_ids": b["input_ids"], "position_ids": b["position_ids"], "tree_mask": b["tree_mask"],
            "logits": b["logits"], "hidden_states": b["hidden_states"],
        }  # fmt: skip
        for i in range(self.plan.num_layers):
            fixed[f"past_key_values.{i}.key"] = b["cache_k"][i]
            fixed[f"past_key_values.{i}.value"] = b["cache_v"][i]
            fixed[f"present.{i}.key"] = b["stage_k"][i]
            fixed[f"present.{i}.value"] = b["stage_v"][i]
        for ctx in self.contexts:
            for name, tensor in fixed.items():
                if not ctx.set_tensor_address(name, tensor.data_ptr()):
                    raise RuntimeError(f"TensorRT refused the address of {name}")
        self.heads_context.set_tensor_address("hidden_states", b["heads_in"].data_ptr())
        self.heads_context.set_tensor_address("medusa_logits", b["heads_out"].data_ptr())

    # -- device primitives -------------------------------------------------------------

    def _call(self, profile, past, ids, pos, mask):
        t, b, n = self.torch, self.buf, len(ids)
        ctx = self.contexts[profile]
        with t.cuda.stream(self.stream):
            b["input_ids"][:n].copy_(t.from_numpy(ids), non_blocking=False)
            b["position_ids"][:n].copy_(t.from_numpy(pos), non_blocking=False)
            b["tree_mask"][: n * n].copy_(t.from_numpy(np.ascontiguousarray(mask).reshape(-1)), non_blocking=False)
        for name in ("input_ids", "position_ids"):
            ctx.set_input_shape(name, (1, n))
        ctx.set_input_shape("tree_mask", (1, n, n))
        kv = (1, past, self.plan.num_kv_heads, self.plan.head_dim)
        for name in self.plan.past_names:
            ctx.set_input_shape(name, kv)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed (profile {profile}, past {past}, new {n})")

    def _copy(self, dst, dst_row, src, src_row, count):
        b = self.buf
        with self.torch.cuda.stream(self.stream):
            for kv in ("k", "v"):
                b[f"{dst}_{kv}"][:, dst_row : dst_row + count].copy_(b[f"{src}_{kv}"][:, src_row : src_row + count])

    def _logits(self, n):
        # valid until the next forward, like the ONNX Runtime backend's output buffers
        with self.torch.cuda.stream(self.stream):
            self._host_logits[:n].copy_(self.buf["logits"][:n], non_blocking=True)
        self.stream.synchronize()
        return self._host_logits[:n].numpy()

    def _store_hidden(self, n, offset):
        with self.torch.cuda.stream(self.stream):
            self.buf["hidden_store"][offset : offset + n].copy_(self.buf["hidden_states"][:n])

    def _run_heads(self, row, stored):
        b = self.buf
        source = b["hidden_store"] if stored else b["hidden_states"]
        with self.torch.cuda.stream(self.stream):
            b["heads_in"].copy_(source[row : row + 1])
        self.heads_context.set_input_shape("hidden_states", (1, self.plan.hidden_size))
        if not self.heads_context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed on the heads engine")
        with self.torch.cuda.stream(self.stream):
            self._host_heads.copy_(b["heads_out"], non_blocking=True)
        self.stream.synchronize()
        return self._host_heads[0].numpy()
