"""TensorRT backend: the artifact's engines behind the runtime's Backend interface.

Everything stays on the GPU between steps: inputs, outputs, a preallocated KV cache and
the staging rows of the last forward. Three layers, of which only the last needs
``tensorrt``:

1. **Pure planning** (tested without TensorRT): the dtype table, :func:`plan_buffers`
   (every device buffer and its size), :class:`EngineDescription` and
   :func:`check_engine` (an engine's I/O and profiles against ``trt_plan.json``),
   :func:`compaction_runs` (which cache rows receive which staged rows for an accepted
   path, one copy per contiguous run).
2. **Orchestration** (:class:`StagedEngineBackend`): forward/commit/head_logits over a few
   device primitives (run one engine call, copy rows), and the limits it declares to the
   decode loop (``max_new_tokens`` from the plan's profiles). The tests drive it with a
   numpy engine; :class:`TensorRTBackend` drives it with TensorRT and cuda-python.
3. **Glue** (:class:`TensorRTBackend`): lazy ``import tensorrt`` and CUDA runtime binding,
   one execution context per optimization profile (prefill / verify / decode) sharing one
   scratch buffer, fixed tensor addresses, ``set_input_shape`` + ``execute_async_v3`` on
   one CUDA stream.

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

from runtime.artifact import (
    BACKBONE_OUTPUTS,
    HEADS_INPUTS,
    HEADS_OUTPUTS,
    INPUT_DTYPES,
    PORTABLE_INPUTS,
    ArtifactConfig,
    ModelSpec,
    cache_names,
)
from runtime.backend import DeviceCacheBackend
from runtime.errors import ArtifactError, BackendUnavailableError, MedusaError
from runtime.plan import BuildPlan, Graph, PlanError, profile_for, read_plan
from runtime.plan import max_new_tokens as plan_max_new_tokens

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


def require_cudart():
    """NVIDIA's CUDA runtime binding (``cuda-python``): the backend's device memory, copies, stream."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendUnavailableError(
                "the TensorRT backend needs NVIDIA's CUDA runtime binding: pip install cuda-python "
                "(pip install 'medusa-trt[gpu]' installs it with TensorRT)"
            ) from None
    return cudart


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
        dtype = {"int64": "INT64", "bool": "BOOL"}[INPUT_DTYPES[name]] if name in INPUT_DTYPES else act
        shape = tuple(-1 if isinstance(d, str) else d for d in dims)
        tensors.append(TensorIO(name, "input", dtype, shape, [graph.shapes(p)[name] for p in graph.profiles]))
    if which == "backbone":
        kv = (-1, -1, plan.num_kv_heads, plan.head_dim)
        logits, hidden = BACKBONE_OUTPUTS
        tensors.append(TensorIO(logits, "output", act, (-1, -1, plan.vocab_size)))
        tensors.append(TensorIO(hidden, "output", act, (-1, -1, plan.hidden_size)))
        tensors += [TensorIO(n, "output", act, kv) for n in cache_names(plan.num_layers)[1]]
    else:
        tensors.append(TensorIO(HEADS_OUTPUTS[0], "output", act, (-1, plan.num_medusa_heads, plan.vocab_size)))
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
                lo, opt, hi = (tuple(d) for d in engine.get_tensor_profile_shape(name, p))
                profiles.append((lo, opt, hi))
        tensors.append(
            TensorIO(
                name,
                "input" if is_input else "output",
                engine.get_tensor_dtype(name).name,
                tuple(engine.get_tensor_shape(name)),
                profiles,
            )
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
    stage_rows: int  # staged rows: a forward's new tokens
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
    stage_rows = aligned_rows(new, row_bytes)
    kv = (plan.num_layers, None, plan.num_kv_heads, plan.head_dim)
    b = [
        Buffer("input_ids", (new,), "int64"),
        Buffer("position_ids", (new,), "int64"),
        Buffer("tree_mask", (new * new,), "bool"),  # viewed as [1, n, n] per call
        Buffer("logits", (new, plan.vocab_size), act),
        Buffer("hidden_states", (new, plan.hidden_size), act),
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


def compaction_runs(keep) -> list[tuple[int, int, int]]:
    """Copies that append the accepted rows ``keep`` to the cache, as ``(stage_row, offset, count)``.

    ``keep`` indexes the last forward's tokens (in order), staged at rows ``0 .. n-1``;
    accepted token ``j`` goes to cache row ``cache_len + j``. Consecutive accepted rows form
    one run, so a prefill, a chain (or a prefix of the tree's first branch) costs one copy
    for all layers.
    """
    keep = [int(k) for k in keep]
    if any(b <= a for a, b in zip(keep, keep[1:])) or (keep and keep[0] < 0):
        raise MedusaError(f"commit(keep): indices must be distinct, non-negative and increasing, got {keep[:16]}")
    runs: list[tuple[int, int, int]] = []
    for j, src in enumerate(keep):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == j:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, j, 1))
    return runs


# ---------------------------------------------------------------------------- orchestration


class StagedEngineBackend(DeviceCacheBackend):
    """forward / commit / head_logits over a device cache and staging rows.

    One ``forward`` is one engine call, on the profile :func:`runtime.plan.profile_for` picks;
    the backend declares what a call can take (:meth:`max_new_tokens`, from the plan's
    profiles) and the decode loop chunks prompts and falls back to plain steps by it.

    Subclasses provide the device primitives:

    * ``_call(profile, past, ids, pos, mask)``: one engine call on ``n`` tokens whose
      cache is ``cache[:, :past]``; writes ``present`` to stage rows ``[0, n)`` and the
      logits / hidden states to the output rows ``[0, n)``;
    * ``_copy_stage_to_cache(dst_row, src_row, count)``: rows of every layer, K and V;
    * ``_logits(n)``: host array of output logits rows ``[0, n)``;
    * ``_run_heads(row)``: Medusa heads on hidden-state row ``row`` of the last call -> host ``[K, V]``.
    """

    def __init__(self, spec: ModelSpec, plan: BuildPlan, capacity: int):
        self.spec = spec
        self.plan = plan
        self.capacity = capacity
        self.length = 0
        self._staged = False
        self._n = 0

    def max_new_tokens(self, past: int | None = None) -> int:
        past = self.length if past is None else past
        return max(0, min(self.capacity - past, plan_max_new_tokens(self.plan, past)))

    # -- Backend interface -----------------------------------------------------------

    def reset(self) -> None:
        self.truncate(0)

    keeps_prefix = True

    def truncate(self, n: int) -> None:
        self.length = self._check_truncate(n)
        self._staged = False
        self._n = 0

    def _forward(self, ids, pos, mask, logits=None):
        n = len(ids)
        profile = profile_for(self.plan, self.length, n)
        if profile is None:  # Backend.forward checked n against max_new_tokens: a plan/capacity mismatch
            raise MedusaError(f"no engine profile takes {n} new tokens on a cache of {self.length}")
        self._call(profile, self.length, ids, pos, mask)
        self._n = n
        self._staged = True
        return self._logits(n)

    def commit(self, keep) -> None:
        if not self._staged:
            raise RuntimeError("commit() without a forward() to commit")
        keep = np.asarray(keep, dtype=np.int64)
        if len(keep) and (keep.min() < 0 or keep.max() >= self._n):
            raise MedusaError(f"commit(keep): indices must lie in [0, {self._n}), got {keep.min()}..{keep.max()}")
        for src, offset, count in compaction_runs(keep):
            self._copy_stage_to_cache(self.length + offset, src, count)
        self.length += len(keep)
        self._staged = False

    def head_logits(self, index: int) -> np.ndarray:
        if self._n == 0:
            raise RuntimeError("head_logits() before any forward()")
        if not 0 <= index < self._n:
            raise MedusaError(f"head_logits({index}): the last forward had {self._n} tokens")
        return self._run_heads(int(index))

    # -- device primitives -------------------------------------------------------------

    @abstractmethod
    def _call(self, profile: int, past: int, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray) -> None: ...

    @abstractmethod
    def _copy_stage_to_cache(self, dst_row: int, src_row: int, count: int) -> None: ...

    @abstractmethod
    def _logits(self, n: int) -> np.ndarray: ...

    @abstractmethod
    def _run_heads(self, row: int) -> np.ndarray: ...


# ---------------------------------------------------------------------------- TensorRT glue


class TensorRTBackend(StagedEngineBackend):
    """Run ``model.engine`` / ``heads.engine`` of an artifact on one GPU (batch 1).

    ``from_artifact(device=N)`` makes GPU ``N`` current with ``cudaSetDevice``, which CUDA keeps
    per thread: with several threads, pick the GPU with ``CUDA_VISIBLE_DEVICES`` and keep 0
    (what ``runtime.load`` does).

    Device memory, copies and the stream go through NVIDIA's CUDA runtime binding
    (``cuda-python``, the binding TensorRT's own samples use): one ``cudaMalloc`` arena for
    every buffer, page-locked host buffers for the logits, 2-D copies for the cache rows of
    all layers at once. No torch.
    """

    name = "tensorrt"

    @classmethod
    def from_artifact(cls, folder: str | Path, config: ArtifactConfig | None = None, max_context: int | None = None,
                      device: int | str = 0):  # fmt: skip
        """The backend for an artifact folder with a built engine; ``device``: a GPU index (or ``cuda:1``)."""
        trt = require_tensorrt()
        require_gpu()
        cudart = require_cudart()
        folder = Path(folder)
        if config is None:
            from runtime.artifact import read_artifact

            config = read_artifact(folder)
        if config.model.medusa_head_type != "medusa":
            raise MedusaError(
                f"{folder}: Hydra heads run on ONNX Runtime and the PyTorch reference backend; the TensorRT "
                "backend's heads call takes Medusa heads only (its plan and engines build, see docs/tensorrt.md)"
            )
        plan = read_plan(folder)
        for graph in (plan.backbone, plan.heads):
            if not (folder / graph.engine).is_file():
                raise ArtifactError(
                    f"{folder / graph.engine} is missing: build it with `medusa-export build-engine {folder}` "
                    f"or run {folder / 'trtexec.sh'}"
                )
        cap = plan.max_context if max_context is None else min(max_context, plan.max_context)
        return cls(trt, cudart, folder, config.model, plan, cap, _device_index(device))

    def __init__(self, trt, cudart, folder: Path, spec: ModelSpec, plan: BuildPlan, capacity: int, device: int = 0):
        super().__init__(spec, plan, capacity)
        self.trt, self.cudart = trt, cudart
        self._owned: list[tuple[str, int]] = []  # (free function, pointer), released by close()
        _cuda(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")  # TensorRT runs on the current device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._load(folder / plan.backbone.engine)
        self.heads_engine = self._load(folder / plan.heads.engine)
        desc, heads_desc = describe_engine(self.engine, trt), describe_engine(self.heads_engine, trt)
        check_engine(desc, plan, "backbone", folder / plan.backbone.engine)
        check_engine(heads_desc, plan, "heads", folder / plan.heads.engine)
        self.layout = layout = plan_buffers(plan, capacity, desc, heads_desc)
        # one allocation, every buffer at a 256-byte aligned offset from an aligned base
        arena = self._malloc(layout.arena_bytes + ALIGN)
        base = arena + (-arena % ALIGN)
        self.addr = {name: base + layout.offsets[name] for name in layout.buffers}
        self._act = np.dtype(layout.buffers["logits"].dtype)
        self._row_bytes = plan.num_kv_heads * plan.head_dim * self._act.itemsize  # one cache position, one layer
        self._scratch = self._malloc(max(layout.scratch, 1))
        self.stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._stream = int(self.stream)
        self.contexts = [self._context(self.engine, i) for i in range(desc.num_profiles)]
        self.heads_context = self._context(self.heads_engine, 0)
        self._bind_addresses()
        # page-locked host buffers: asynchronous device-to-host copies
        self._host_logits = self._pinned(layout.buffers["logits"].shape)
        self._host_heads = self._pinned(layout.buffers["heads_out"].shape)
        self._sync()

    # -- memory ------------------------------------------------------------------------

    def _malloc(self, nbytes: int) -> int:
        ptr = int(_cuda(self.cudart, self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))
        self._owned.append(("cudaFree", ptr))
        return ptr

    def _pinned(self, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * self._act.itemsize
        ptr = int(_cuda(self.cudart, self.cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        self._owned.append(("cudaFreeHost", ptr))
        raw = memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B")
        return np.frombuffer(raw, dtype=self._act).reshape(shape)

    def close(self) -> None:
        """Release the device and pinned memory and the stream (also at garbage collection);
        the backend refuses every call after it."""
        self.closed = True
        cudart = getattr(self, "cudart", None)
        while cudart is not None and self._owned:
            free, ptr = self._owned.pop()
            getattr(cudart, free)(ptr)
        if cudart is not None and getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA context may already be gone
            pass

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
            ctx.set_device_memory(self._scratch, max(self.layout.scratch, 1))
        else:
            ctx.device_memory = self._scratch
        ctx.set_optimization_profile_async(profile, self._stream)
        return ctx

    def _layer(self, name: str, layer: int) -> int:
        """Address of ``layer``'s rows in a ``[layers, rows, kv_heads, head_dim]`` buffer."""
        rows = self.layout.buffers[name].shape[1]
        return self.addr[name] + layer * rows * self._row_bytes

    def _bind_addresses(self) -> None:
        """Every tensor address is fixed for the backend's life: only shapes change per call."""
        fixed = {name: self.addr[name] for name in (*PORTABLE_INPUTS, *BACKBONE_OUTPUTS)}
        past, present = cache_names(self.plan.num_layers)
        for j in range(len(past)):  # k0, v0, k1, v1, ...
            layer, kv = divmod(j, 2)
            fixed[past[j]] = self._layer(("cache_k", "cache_v")[kv], layer)
            fixed[present[j]] = self._layer(("stage_k", "stage_v")[kv], layer)
        for ctx in self.contexts:
            for name, ptr in fixed.items():
                if not ctx.set_tensor_address(name, ptr):
                    raise RuntimeError(f"TensorRT refused the address of {name}")
        (heads_in,), (heads_out,) = HEADS_INPUTS, HEADS_OUTPUTS
        for name, ptr in ((heads_in, self.addr["heads_in"]), (heads_out, self.addr["heads_out"])):
            if not self.heads_context.set_tensor_address(name, ptr):
                raise RuntimeError(f"TensorRT refused the address of the heads' {name}")

    # -- device primitives -------------------------------------------------------------

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        c = self.cudart
        _cuda(c, c.cudaMemcpyAsync(dst, src, nbytes, getattr(c.cudaMemcpyKind, kind), self.stream), "cudaMemcpyAsync")

    def _sync(self) -> None:
        _cuda(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise MedusaError("this TensorRT backend was closed (its device memory is freed): load the artifact again")

    def _call(self, profile, past, ids, pos, mask):
        self._check_open()
        n = len(ids)
        ctx = self.contexts[profile]
        # pageable, contiguous sources: cudaMemcpyAsync has read them when it returns
        for name, arr in (("input_ids", ids), ("position_ids", pos), ("tree_mask", mask)):
            arr = np.ascontiguousarray(arr, dtype=bool if name == "tree_mask" else np.int64)
            self._memcpy(self.addr[name], arr.ctypes.data, arr.nbytes, "cudaMemcpyHostToDevice")
        kv = (1, past, self.plan.num_kv_heads, self.plan.head_dim)
        shapes = {"input_ids": (1, n), "position_ids": (1, n), "tree_mask": (1, n, n)}
        shapes.update((name, kv) for name in self.plan.past_names)
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused shape {shape} for {name} (profile {profile})")
        if not ctx.execute_async_v3(self._stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed (profile {profile}, past {past}, new {n})")

    def _copy_stage_to_cache(self, dst_row, src_row, count):
        # one 2-D copy per K and V: a row of the copy is one layer's ``count`` positions
        c, rb = self.cudart, self._row_bytes
        for kv in ("k", "v"):
            cache, stage = self.layout.buffers[f"cache_{kv}"], self.layout.buffers[f"stage_{kv}"]
            _cuda(c, c.cudaMemcpy2DAsync(
                self.addr[f"cache_{kv}"] + dst_row * rb, cache.shape[1] * rb,
                self.addr[f"stage_{kv}"] + src_row * rb, stage.shape[1] * rb,
                count * rb, self.plan.num_layers, c.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream,
            ), "cudaMemcpy2DAsync")  # fmt: skip

    def _logits(self, n):
        # valid until the next forward, like the ONNX Runtime backend's output buffers (the decode
        # loop reads a step's logits within that step)
        host = self._host_logits
        self._memcpy(host.ctypes.data, self.addr["logits"], n * host.strides[0], "cudaMemcpyDeviceToHost")
        self._sync()
        return host[:n]

    def _run_heads(self, row):
        self._check_open()
        width = self.plan.hidden_size * self._act.itemsize
        self._memcpy(self.addr["heads_in"], self.addr["hidden_states"] + row * width, width, "cudaMemcpyDeviceToDevice")
        heads_in = HEADS_INPUTS[0]
        if not self.heads_context.set_input_shape(heads_in, (1, self.plan.hidden_size)):
            raise RuntimeError(f"TensorRT refused shape (1, {self.plan.hidden_size}) for the heads' {heads_in}")
        if not self.heads_context.execute_async_v3(self._stream):
            raise RuntimeError("TensorRT execute_async_v3 failed on the heads engine")
        host = self._host_heads
        self._memcpy(host.ctypes.data, self.addr["heads_out"], host.nbytes, "cudaMemcpyDeviceToHost")
        self._sync()
        # a copy: the decode loop keeps a step's heads until the next step, and another stream
        # of the same generator may run a step in between (the pinned buffer is reused)
        return host[0].copy()


def _device_index(device: int | str) -> int:
    if isinstance(device, int):
        return device
    text = str(device)
    if text in ("cuda", "auto"):
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise MedusaError(f"device must be a GPU index or 'cuda[:N]' for TensorRT, got {device!r}")


def _cuda(cudart, result, what: str):
    """The value of a cuda-python call (``(error, value...)``), or RuntimeError naming the call."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA {what} failed: {err}")
    return rest[0] if len(rest) == 1 else None
