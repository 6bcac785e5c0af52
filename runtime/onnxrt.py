"""ONNX Runtime backend: the artifact's two graphs behind the runtime's Backend interface.

CPU and CUDA execution providers (CUDA when available and asked for, never required).
On the CPU the graphs run with I/O binding over preallocated host buffers:

* the cache is the preallocated :class:`runtime.backend.KVCache`; each layer's past is a
  contiguous prefix view bound without a copy;
* outputs (logits, hidden states, the new KV entries) are bound to buffers sized for the
  largest step seen so far, so a decode step allocates nothing;
* accepted entries are written into the cache in place (``KVCache.append``).

No torch import anywhere on this path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.artifact import ArtifactConfig
from runtime.backend import GraphBackend
from runtime.errors import BackendUnavailableError, MedusaError

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "the ONNX Runtime backend needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu on a GPU machine)"
        ) from None
    return onnxruntime


def choose_providers(device: str = "auto") -> list[str]:
    """``auto``: CUDA when onnxruntime-gpu sees a GPU, else CPU; ``cpu``/``cuda`` force one."""
    available = _ort().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"CUDA was asked for but ONNX Runtime offers only {available}: install onnxruntime-gpu on a GPU machine"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise MedusaError(f"unknown device {device!r}: use auto, cpu or cuda")
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def _options(ort, threads: int | None, spin: bool):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class _Outputs:
    """Host buffers for one graph's outputs, grown to the largest step seen (then reused)."""

    def __init__(self):
        self.capacity = 0
        self.buffers: dict[str, np.ndarray] = {}

    def views(self, shapes: dict[str, tuple], dtypes: dict[str, type], n: int, grow_to: int) -> dict[str, np.ndarray]:
        if n > self.capacity:
            self.capacity = max(n, grow_to)
            self.buffers = {
                name: np.empty((shape[0], self.capacity, *shape[2:]), dtype=dtypes[name]) for name, shape in shapes.items()
            }
        return {name: buf[:, :n] for name, buf in self.buffers.items()}


class OnnxRuntimeBackend(GraphBackend):
    """Run ``model.onnx`` / ``heads.onnx`` of an artifact folder with ONNX Runtime."""

    def __init__(
        self,
        folder: str | Path,
        config: ArtifactConfig,
        device: str = "auto",
        threads: int | None = None,
        max_context: int | None = None,
        io_binding: bool = True,
        heads_int8: bool = True,
    ):
        ort = _ort()
        self.folder = Path(folder)
        self.config = config
        self.providers = choose_providers(device)
        self.on_cpu = self.providers[0] == "CPUExecutionProvider"
        self.threads = threads
        self.backbone = ort.InferenceSession(str(self.folder / config.backbone.file), _options(ort, threads, spin=True),
                                             providers=self.providers)
        # int8 heads (proposals only, so the output cannot change) on the CPU when exported
        heads = config.heads_int8 if (heads_int8 and config.heads_int8 and self.on_cpu) else config.heads
        self.heads_file = heads.file
        # The heads session must not spin-wait after its call: on a small CPU its idle spinning
        # threads steal the cores the next backbone call needs (measured on 2 cores: a plain
        # step after a heads call took 82 ms instead of 47 ms). The backbone keeps spinning.
        heads_opts = _options(ort, threads, spin=False)
        self.heads = ort.InferenceSession(str(self.folder / heads.file), heads_opts, providers=self.providers)
        dtype = _NP_DTYPES[config.dtype]
        super().__init__(config.model, max_context=max_context, cache_dtype=dtype)
        self._dtype = dtype
        self._past_names = [n for n in config.backbone.inputs if n.startswith("past_key_values.")]
        self._present_names = [n for n in config.backbone.outputs if n.startswith("present.")]
        self._check_io()
        self.io_binding = io_binding and self.on_cpu
        self._outputs = _Outputs()
        spec = config.model
        kv = (1, 0, spec.num_kv_heads, spec.head_dim)
        self._out_shapes = {"logits": (1, 0, spec.vocab_size), "hidden_states": (1, 0, spec.hidden_size)}
        self._out_shapes.update({name: kv for name in self._present_names})
        self._out_dtypes = {name: dtype for name in self._out_shapes}

    def _check_io(self) -> None:
        want_in = ["input_ids", "position_ids", "tree_mask", *self._past_names]
        got_in = [i.name for i in self.backbone.get_inputs()]
        got_out = [o.name for o in self.backbone.get_outputs()]
        want_out = ["logits", "hidden_states", *self._present_names]
        if got_in != want_in or got_out != want_out:
            raise MedusaError(
                f"{self.folder / self.config.backbone.file}: graph I/O does not match medusa_config.json "
                f"(inputs {got_in[:4]}..., expected {want_in[:4]}...; outputs {got_out[:3]}..., expected {want_out[:3]}...)"
            )
        if len(self._past_names) != 2 * self.config.model.num_layers:
            raise MedusaError(f"{self.folder}: {len(self._past_names)} cache inputs for {self.config.model.num_layers} layers")

    # -- engine calls ------------------------------------------------------------------

    def _run_backbone(self, input_ids, position_ids, tree_mask, past):
        if not self.io_binding:
            feed = {"input_ids": input_ids, "position_ids": position_ids, "tree_mask": tree_mask}
            feed.update(zip(self._past_names, past))
            logits, hidden, *presents = self.backbone.run(None, feed)
            return logits, hidden, presents
        n = input_ids.shape[1]
        # grow output buffers to at least 64 tokens at once so tree steps never reallocate
        outs = self._outputs.views(self._out_shapes, self._out_dtypes, n, grow_to=max(64, n))
        io = self.backbone.io_binding()
        keep = []  # arrays whose memory is bound must outlive the run
        for name, arr in (("input_ids", input_ids), ("position_ids", position_ids), ("tree_mask", tree_mask)):
            keep.append(_bind(io.bind_input, name, arr))
        for name, arr in zip(self._past_names, past):
            keep.append(_bind(io.bind_input, name, arr))
        for name, arr in outs.items():
            keep.append(_bind(io.bind_output, name, arr))
        self.backbone.run_with_iobinding(io)
        del keep
        return outs["logits"], outs["hidden_states"], [outs[n] for n in self._present_names]

    def _run_heads(self, hidden):
        (logits,) = self.heads.run(None, {"hidden_states": hidden.astype(self._dtype, copy=False)})
        return logits


_EMPTY = np.zeros(8, dtype=np.uint8)  # a valid address for zero-size tensors (never read)


def _bind(bind, name: str, arr: np.ndarray) -> np.ndarray:
    """Bind a host array by pointer, without a copy when it is C-contiguous (strided arrays,
    e.g. batch > 1 cache prefixes, are copied). Returns the array whose memory is bound:
    the caller keeps it alive until the run ends."""
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    ptr = arr.ctypes.data if arr.size else _EMPTY.ctypes.data
    bind(name, "cpu", 0, arr.dtype, list(arr.shape), ptr)
    return arr
