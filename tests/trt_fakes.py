"""Fakes shared by the TensorRT tests: artifact configs (no export needed) and a numpy engine.

``ToyEngine`` follows the graph contract (exporter/step.py) with a few attention layers in
numpy: the cache is always visible, ``tree_mask`` rules among the new tokens, ``present``
holds only the new entries. ``ReferenceBackend`` runs it over the runtime's host
``KVCache`` (the established GraphBackend semantics); ``ToyStagedBackend`` runs it
through the TensorRT backend's orchestration with numpy "device" buffers laid out by
the real buffer planner, and refuses any call outside the engine's profiles as TensorRT
would. ``fake_tensorrt_runtime`` and ``fake_cudart`` stand in for ``tensorrt`` and
cuda-python under the real :class:`runtime.trt_backend.TensorRTBackend`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.artifact import ArtifactConfig, GraphSpec, ModelSpec, cache_names
from runtime.backend import GraphBackend
from runtime.plan import BuildPlan
from runtime.trt_backend import StagedEngineBackend, plan_buffers


def fake_config(
    layers=2, kv_heads=1, head_dim=8, hidden=16, vocab=64, max_context=64, heads=4, dtype="float32",
    tree="cpu_8", tree_paths=None, attention_heads=None, dynamic_axes=None,
) -> ArtifactConfig:  # fmt: skip
    spec = ModelSpec(
        architecture="LlamaForCausalLM", num_layers=layers, num_attention_heads=attention_heads or 2 * kv_heads,
        num_kv_heads=kv_heads, head_dim=head_dim, hidden_size=hidden, vocab_size=vocab, max_context=max_context,
        eos_token_ids=[], num_medusa_heads=heads, medusa_num_layers=1,
    )  # fmt: skip
    past, present = cache_names(layers)
    if dynamic_axes is None:
        dynamic_axes = {
            "input_ids": ["batch", "new"],
            "position_ids": ["batch", "new"],
            "tree_mask": ["batch", "new", "new"],
        }
        dynamic_axes.update({p: ["batch", "past"] for p in past})
    backbone = GraphSpec(
        "model.onnx",
        ["input_ids", "position_ids", "tree_mask", *past],
        ["logits", "hidden_states", *present],
        dynamic_axes,
    )
    heads_graph = GraphSpec("heads.onnx", ["hidden_states"], ["medusa_logits"], {"hidden_states": ["batch"]})
    return ArtifactConfig(model=spec, backbone=backbone, heads=heads_graph, dtype=dtype, default_tree=tree,
                          default_tree_paths=tree_paths or [])  # fmt: skip


def smollm2_config(max_context=8192, dtype="float16") -> ArtifactConfig:
    """SmolLM2-135M-Instruct's shapes: 30 layers, 3 KV heads of 64, hidden 576, vocab 49152."""
    return fake_config(layers=30, kv_heads=3, head_dim=64, hidden=576, vocab=49152, max_context=max_context,
                       heads=4, dtype=dtype, attention_heads=9)  # fmt: skip


def write_fake_artifact(folder: Path, cfg: ArtifactConfig) -> Path:
    """An artifact folder that read_artifact accepts (placeholder graph files)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg.write(folder)
    for name in (cfg.backbone.file, cfg.heads.file):
        (folder / name).write_bytes(b"placeholder, not an ONNX file")
    (folder / "tokenizer.json").write_text(json.dumps({}))
    return folder


# ---------------------------------------------------------------------------- numpy engine


class ToyEngine:
    """A small causal LM that follows the graph contract, in float64 numpy."""

    def __init__(self, layers=2, kv_heads=1, head_dim=8, hidden=16, vocab=64, heads=3, seed=0):
        rng = np.random.default_rng(seed)
        self.L, self.kv, self.hd, self.H, self.V = layers, kv_heads, head_dim, hidden, vocab
        d = kv_heads * head_dim
        self.emb = rng.normal(size=(vocab, hidden))
        self.wq, self.wk, self.wv = (rng.normal(size=(layers, hidden, d)) / np.sqrt(hidden) for _ in range(3))
        self.wo = rng.normal(size=(layers, d, hidden)) / np.sqrt(d)
        self.lm = rng.normal(size=(hidden, vocab))
        self.heads = rng.normal(size=(heads, hidden, vocab))

    def step(self, ids, pos, mask, past_k, past_v):
        """ids, pos [n]; mask [n, n]; past_k[l] [p, kv, hd] -> logits [n, V], hidden [n, H], presents."""
        n = len(ids)
        x = self.emb[ids] + np.sin(np.outer(pos, np.arange(1, self.H + 1) * 0.1))
        pk, pv = [], []
        for l in range(self.L):
            q, k, v = ((x @ w[l]).reshape(n, self.kv, self.hd) for w in (self.wq, self.wk, self.wv))
            keys = np.concatenate([past_k[l], k])
            vals = np.concatenate([past_v[l], v])
            scores = np.einsum("nhd,mhd->hnm", q, keys) / np.sqrt(self.hd)
            visible = np.concatenate([np.ones((n, len(past_k[l])), dtype=bool), mask], axis=1)
            scores = np.where(visible[None], scores, -np.inf)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            x = x + np.einsum("hnm,mhd->nhd", w, vals).reshape(n, -1) @ self.wo[l]
            pk.append(k)
            pv.append(v)
        hidden = np.tanh(x)
        return hidden @ self.lm, hidden, pk, pv

    def medusa(self, hidden_row):
        return np.einsum("h,khv->kv", hidden_row, self.heads)


class ReferenceBackend(GraphBackend):
    """The toy engine over the runtime's host KVCache: the semantics every backend must match."""

    def __init__(self, engine: ToyEngine, spec: ModelSpec, max_context: int):
        self.engine = engine
        super().__init__(spec, max_context=max_context, cache_dtype=np.float64)

    def _run_backbone(self, input_ids, position_ids, tree_mask, past):
        pk = [p[0] for p in past[0::2]]
        pv = [p[0] for p in past[1::2]]
        logits, hidden, k, v = self.engine.step(input_ids[0], position_ids[0], tree_mask[0], pk, pv)
        presents = []
        for a, b in zip(k, v):
            presents += [a[None], b[None]]
        return logits[None], hidden[None], presents

    def _run_heads(self, hidden):
        return self.engine.medusa(hidden[0])[None]


class ToyStagedBackend(StagedEngineBackend):
    """The TensorRT backend's orchestration on numpy buffers shaped by ``plan_buffers``."""

    def __init__(self, engine: ToyEngine, spec: ModelSpec, plan: BuildPlan, capacity: int | None = None):
        cap = capacity or plan.max_context
        super().__init__(spec, plan, cap)
        self.engine = engine
        self.layout = plan_buffers(plan, cap)
        self.buf = {name: np.full(b.shape, np.nan) if b.dtype.startswith("float") else np.zeros(b.shape, b.dtype)
                    for name, b in self.layout.buffers.items()}  # fmt: skip
        self.calls: list[tuple[int, int, int]] = []  # (profile, past, n) of every engine call

    def _call(self, profile, past, ids, pos, mask):
        n = len(ids)
        if not self.plan.backbone.profiles[profile].contains(past, n):
            raise AssertionError(f"TensorRT would refuse: profile {profile} does not take past={past}, new={n}")
        self.calls.append((profile, past, n))
        b = self.buf
        pk = [b["cache_k"][l, :past] for l in range(self.plan.num_layers)]
        pv = [b["cache_v"][l, :past] for l in range(self.plan.num_layers)]
        logits, hidden, k, v = self.engine.step(ids, pos, mask, pk, pv)
        b["logits"][:n], b["hidden_states"][:n] = logits, hidden
        for l in range(self.plan.num_layers):
            b["stage_k"][l, :n], b["stage_v"][l, :n] = k[l], v[l]

    def _copy_stage_to_cache(self, dst_row, src_row, count):
        for kv in ("k", "v"):
            self.buf[f"cache_{kv}"][:, dst_row : dst_row + count] = self.buf[f"stage_{kv}"][
                :, src_row : src_row + count
            ]

    def _logits(self, n):
        return self.buf["logits"][:n].copy()

    def _run_heads(self, row):
        return self.engine.medusa(self.buf["hidden_states"][row])


class OrtEngine:
    """An exported artifact's two graphs in ONNX Runtime, behind ToyEngine's interface."""

    def __init__(self, folder, config: ArtifactConfig):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.dtype = np.float32 if config.dtype == "float32" else np.float16
        self.backbone = ort.InferenceSession(
            str(Path(folder) / config.backbone.file), opts, providers=["CPUExecutionProvider"]
        )
        self.heads = ort.InferenceSession(
            str(Path(folder) / config.heads.file), opts, providers=["CPUExecutionProvider"]
        )
        self.layers = config.model.num_layers

    def step(self, ids, pos, mask, past_k, past_v):
        feed = {
            "input_ids": ids[None].astype(np.int64),
            "position_ids": pos[None].astype(np.int64),
            "tree_mask": mask[None],
        }
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = np.ascontiguousarray(past_k[i][None], dtype=self.dtype)
            feed[f"past_key_values.{i}.value"] = np.ascontiguousarray(past_v[i][None], dtype=self.dtype)
        logits, hidden, *presents = self.backbone.run(None, feed)
        return logits[0], hidden[0], [p[0] for p in presents[0::2]], [p[0] for p in presents[1::2]]

    def medusa(self, hidden_row):
        return self.heads.run(None, {"hidden_states": hidden_row[None].astype(self.dtype)})[0][0]


# ---------------------------------------------------------------------------- a TensorRT runtime stand-in

_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 9: "BOOL", 16: "BF16"}


def onnx_io(path: Path, plan: BuildPlan, which: str) -> dict:
    """An engine's I/O as TensorRT's parser would derive it from the ONNX file at ``path``
    (names, modes, dtypes, static dims; dynamic dims -1), with the profile shapes the builder
    set from ``plan``. Independent of runtime.trt_backend.expected_description, which the
    backend's check compares with."""
    import types

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = plan.backbone if which == "backbone" else plan.heads
    io = {}
    for mode, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            profiles = [graph.shapes(p)[v.name] for p in graph.profiles] if mode == "input" else []
            io[v.name] = types.SimpleNamespace(
                name=v.name, mode=mode, dtype=_ONNX_TO_TRT[t.elem_type], shape=shape, profiles=profiles
            )
    return io


def fake_tensorrt_runtime(plan: BuildPlan, engine, log: dict, onnx_folder: Path):
    """A ``tensorrt`` module whose engines run ``engine`` through raw tensor addresses.

    Engine I/O comes from the artifact's ONNX files (:func:`onnx_io`). It enforces what
    TensorRT enforces at run time: every input shape inside the context's active profile,
    every address set, 256-byte aligned, and reads/writes the tensors as contiguous arrays at
    those addresses (host memory here: see :func:`fake_cudart`).
    """
    import ctypes
    import types

    from runtime.trt_backend import ALIGN, TRT_DTYPES

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.8.0.43"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user")

    def view(ptr, shape, dtype):
        count = int(np.prod(shape, dtype=np.int64))
        buf = (ctypes.c_char * max(1, count * np.dtype(dtype).itemsize)).from_address(ptr)
        return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)

    class Context:
        def __init__(self, eng):
            self.eng, self.addr, self.shapes, self.profile, self.memory = eng, {}, {}, None, None

        def set_device_memory(self, ptr, size):
            assert size >= self.eng.device_memory_size_v2
            self.memory = ptr

        def set_optimization_profile_async(self, index, stream):
            self.profile = index

        def set_tensor_address(self, name, ptr):
            assert ptr % ALIGN == 0, f"{name}: address not {ALIGN}-byte aligned"
            self.addr[name] = ptr
            return name in self.eng.io

        def set_input_shape(self, name, shape):
            lo, _, hi = self.eng.io[name].profiles[self.profile]
            if not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                raise RuntimeError(f"{name}: shape {tuple(shape)} outside profile {self.profile} [{lo}, {hi}]")
            self.shapes[name] = tuple(shape)
            return True

        def execute_async_v3(self, stream):
            assert self.memory is not None and set(self.addr) == set(self.eng.io)
            log.setdefault("calls", []).append((self.eng.which, self.profile, dict(self.shapes)))
            dt = {t.name: TRT_DTYPES[t.dtype][0] for t in self.eng.io.values()}
            get = lambda name: view(self.addr[name], self.shapes[name], dt[name])
            if self.eng.which == "heads":
                out = engine.medusa(get("hidden_states")[0])
                view(self.addr["medusa_logits"], (1, *out.shape), dt["medusa_logits"])[:] = out
                return True
            ids, pos, mask = get("input_ids")[0], get("position_ids")[0], get("tree_mask")[0]
            n = len(ids)
            pk = [get(f"past_key_values.{i}.key")[0] for i in range(plan.num_layers)]
            pv = [get(f"past_key_values.{i}.value")[0] for i in range(plan.num_layers)]
            logits, hidden, k, v = engine.step(ids, pos, mask, pk, pv)
            view(self.addr["logits"], (1, n, plan.vocab_size), dt["logits"])[:] = logits
            view(self.addr["hidden_states"], (1, n, plan.hidden_size), dt["hidden_states"])[:] = hidden
            for i in range(plan.num_layers):
                for name, x in ((f"present.{i}.key", k[i]), (f"present.{i}.value", v[i])):
                    view(self.addr[name], (1, n, plan.num_kv_heads, plan.head_dim), dt[name])[:] = x
            return True

    class Engine:
        def __init__(self, which):
            self.which = which
            graph = plan.backbone if which == "backbone" else plan.heads
            self.io = onnx_io(Path(onnx_folder) / graph.onnx, plan, which)
            self.names = list(self.io)
            self.num_optimization_profiles = len(graph.profiles)
            self.device_memory_size_v2 = 4096

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return self.io[name].mode

        def get_tensor_dtype(self, name):
            return types.SimpleNamespace(name=self.io[name].dtype)

        def get_tensor_shape(self, name):
            return self.io[name].shape

        def get_tensor_profile_shape(self, name, p):
            return self.io[name].profiles[p]

        def create_execution_context(self, strategy):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            which = json.loads(data)["which"]
            return None if which == "corrupt" else Engine(which)

    trt.Runtime = Runtime
    return trt


def fake_cudart(log: dict):
    """A stand-in for cuda-python's runtime module on host memory: cudaMalloc hands out
    256-byte aligned host blocks, and every copy is checked to lie inside one block (so a
    wrong offset or pitch in the backend's address arithmetic fails instead of corrupting)."""
    import ctypes
    import enum
    import types

    class Error(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1

    class Stream:
        def __init__(self, handle):
            self.handle = handle

        def __int__(self):
            return self.handle

    m = types.ModuleType("cudart")
    m.cudaError_t = Error
    m.cudaMemcpyKind = types.SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )
    blocks: dict[int, tuple[int, object]] = {}  # aligned address -> (size, buffer kept alive)
    log.setdefault("copies", [])

    def malloc(size):
        buf = ctypes.create_string_buffer(size + 256)
        addr = ctypes.addressof(buf)
        addr += -addr % 256
        blocks[addr] = (size, buf)
        return Error.cudaSuccess, addr

    def inside(ptr, n, host_ok):
        for start, (size, _) in blocks.items():
            if start <= ptr and ptr + n <= start + size:
                return True
        return host_ok  # a numpy array's memory (pageable host): not ours to bound

    def memcpy(dst, src, count, kind, stream):
        if not (inside(dst, count, kind == 2) and inside(src, count, kind == 1)):
            return (Error.cudaErrorInvalidValue,)
        ctypes.memmove(dst, src, count)
        log["copies"].append(("1d", kind, count))
        return (Error.cudaSuccess,)

    def memcpy2d(dst, dpitch, src, spitch, width, height, kind, stream):
        if width > dpitch or width > spitch:
            return (Error.cudaErrorInvalidValue,)
        for r in range(height):
            if not (inside(dst + r * dpitch, width, False) and inside(src + r * spitch, width, False)):
                return (Error.cudaErrorInvalidValue,)
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        log["copies"].append(("2d", kind, width * height))
        return (Error.cudaSuccess,)

    def free(ptr):
        blocks.pop(int(ptr))
        return (Error.cudaSuccess,)

    m.cudaMalloc = m.cudaMallocHost = malloc
    m.cudaFree = m.cudaFreeHost = free
    m.cudaMemcpyAsync = memcpy
    m.cudaMemcpy2DAsync = memcpy2d
    m.cudaSetDevice = lambda device: (Error.cudaSuccess,)
    m.cudaStreamCreate = lambda: (Error.cudaSuccess, Stream(7))
    m.cudaStreamSynchronize = lambda stream: (Error.cudaSuccess,)
    m.cudaStreamDestroy = lambda stream: (Error.cudaSuccess,)
    m.blocks = blocks
    return m


def write_fake_engines(folder: Path, plan: BuildPlan) -> None:
    plan.write(folder)
    (folder / plan.backbone.engine).write_text(json.dumps({"which": "backbone"}))
    (folder / plan.heads.engine).write_text(json.dumps({"which": "heads"}))
