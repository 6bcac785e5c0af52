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

import logging
from pathlib import Path

import numpy as np

from runtime import hugepages
from runtime.artifact import (
    FUSED_CACHE_START,
    SCREEN_CANDIDATES,
    SCREEN_INPUT,
    SCREEN_NOISE,
    SCREEN_OUTPUTS,
    ArtifactConfig,
    cache_names,
)
from runtime.backend import Backend, DeviceCacheBackend, GraphBackend, draw_argmax, gives_back, perturbed
from runtime.errors import ArtifactError, BackendUnavailableError, ContextLengthError, MedusaError

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


def _session(ort, path: Path, options, providers, huge_pages_background: bool = False):
    """An InferenceSession of ``path``; a file ONNX Runtime cannot load (truncated, corrupt, not
    ONNX) is an ArtifactError naming it, not ONNX Runtime's InvalidProtobuf. On the CPU its
    weights are then backed by huge pages (runtime.hugepages; ``MEDUSA_TRT_HUGE_PAGES=0``: off), on a
    background thread with ``huge_pages_background`` (a session opened while others serve)."""
    try:
        on = None if providers[0] == "CPUExecutionProvider" else False
        with hugepages.backing(str(path), on=on, background=huge_pages_background):
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        reason = (str(e).strip().splitlines() or [""])[0].split(" failed:")[-1].strip()[:200]
        links = [f.name for f in path.parent.iterdir() if f.is_symlink()]  # batch.onnx reads model.onnx.data
        if links and "escapes" in str(e):  # ONNX Runtime reads external weights only from inside the folder
            raise ArtifactError(
                f"{path.name} in {path.parent}: ONNX Runtime refuses its weights through {', '.join(sorted(links))}, "
                "a link to outside the artifact folder: copy the file into the folder instead of linking it"
            ) from None
        raise ArtifactError(
            f"{path.name} in {path.parent} cannot be loaded by ONNX Runtime ({type(e).__name__}: {reason}): the file "
            "is damaged, truncated or not this artifact's graph; re-export it (or copy the artifact again)"
        ) from None


_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


def check_graph_sizes(folder: Path, config: ArtifactConfig, backbone, heads, heads_file: str, fused: bool) -> None:
    """The graphs' static dimensions against medusa_config.json (vocabulary, hidden size, KV
    heads, head size, Medusa heads, dtype), at load: a config that does not belong to its graphs
    is an ArtifactError naming the file, the tensor and both sizes, not a failure at the first
    generate. Dimensions a graph leaves symbolic are not compared."""
    spec = config.model
    kv = (
        {1: (spec.num_kv_heads, "KV heads"), 3: (spec.head_dim, "head size")}
        if fused
        else {2: (spec.num_kv_heads, "KV heads"), 3: (spec.head_dim, "head size")}
    )
    expect_backbone = {
        "logits": (3, {2: (spec.vocab_size, "vocabulary size")}),
        "hidden_states": (3, {2: (spec.hidden_size, "hidden size")}),
    }
    for t in backbone.get_inputs():
        if t.name.startswith("past_key_values."):
            expect_backbone[t.name] = (4, kv)
    expect_heads: dict = {"hidden_states": (2, {1: (spec.hidden_size, "hidden size")})}
    if spec.medusa_head_type == "hydra":
        expect_heads["path_ids"] = (2, {1: (spec.num_medusa_heads, "Medusa heads count")})
        expect_heads["path_len"] = (1, {})
        expect_heads["draft_logits"] = (2, {1: (spec.vocab_size, "vocabulary size")})
    else:
        expect_heads["medusa_logits"] = (
            3,
            {1: (spec.num_medusa_heads, "Medusa heads count"), 2: (spec.vocab_size, "vocabulary size")},
        )
    float_type = _ONNX_TYPES.get(config.dtype)
    for session, file, expect in ((backbone, config.backbone.file, expect_backbone), (heads, heads_file, expect_heads)):
        tensors = {t.name: t for t in [*session.get_inputs(), *session.get_outputs()]}
        for name, (rank, axes) in expect.items():
            t = tensors.get(name)
            if t is None:
                raise ArtifactError(f"{folder / file}: the graph has no tensor {name!r} (not a medusa-trt graph?)")
            if len(t.shape) != rank:
                raise ArtifactError(
                    f"{folder / file}: {name} has {len(t.shape)} dimensions in the graph, expected {rank}"
                )
            for axis, (size, what) in axes.items():
                got = t.shape[axis]
                if isinstance(got, int) and got != size:
                    raise ArtifactError(
                        f"{folder / file}: {name} has {what} {got} in the graph but medusa_config.json says {size}: "
                        "the config does not belong to this graph (re-export the artifact)"
                    )
            if float_type and t.type.startswith("tensor(float") and t.type != float_type:
                raise ArtifactError(
                    f"{folder / file}: {name} is {t.type} in the graph but medusa_config.json says "
                    f"dtype {config.dtype} (re-export the artifact)"
                )
    out = {t.name: t for t in heads.get_outputs()}.get("medusa_logits")
    if spec.medusa_head_type == "medusa" and out is not None and not isinstance(out.shape[1], int):
        # an exported heads graph leaves its heads axis symbolic (it comes out of a scatter): one call
        # on a zero hidden state tells the count (a millisecond), which a tree's depth is checked against
        (inp,) = [t for t in heads.get_inputs() if t.name == "hidden_states"]
        hidden = np.zeros((1, spec.hidden_size), np.float16 if inp.type == "tensor(float16)" else np.float32)
        got = heads.run(["medusa_logits"], {"hidden_states": hidden})[0].shape[1]
        if got != spec.num_medusa_heads:
            raise ArtifactError(
                f"{folder / heads_file}: medusa_logits has Medusa heads count {got} in the graph but "
                f"medusa_config.json says {spec.num_medusa_heads}: the config does not belong to this graph "
                "(re-export the artifact)"
            )


def open_sessions(
    ort, folder: Path, config: ArtifactConfig, threads: int | None, providers: list[str], heads_int8: bool
) -> tuple:
    """(backbone session, heads session, heads file) of an artifact. The int8 heads serve on the
    CPU when exported (they only propose candidates, so the output cannot change). The heads
    session must not spin-wait after its call: on a small CPU its idle spinning threads steal
    the cores the next backbone call needs (measured on 2 cores: a plain step after a heads
    call took 82 ms instead of 47 ms). The backbone keeps spinning."""
    backbone = _session(ort, folder / config.backbone.file, _options(ort, threads, spin=True), providers)
    on_cpu = providers[0] == "CPUExecutionProvider"
    heads = config.heads_int8 if (heads_int8 and config.heads_int8 and on_cpu) else config.heads
    return backbone, _session(ort, folder / heads.file, _options(ort, threads, spin=False), providers), heads.file


def open_first_head(
    ort, folder: Path, config: ArtifactConfig, threads: int | None, providers: list[str], heads_int8: bool
):
    """The session of ``heads_int8_first.onnx`` (the first Medusa head alone, int8), where the CPU
    serves the int8 heads and the artifact has it; else None (head 1 comes from the heads graph)."""
    first = config.heads_int8_first
    if not (heads_int8 and first and config.heads_int8 and providers[0] == "CPUExecutionProvider"):
        return None
    return _session(ort, folder / first.file, _options(ort, threads, spin=False), providers)


def _first_head_logits(backend, index: int) -> np.ndarray:
    """``Backend.first_head_logits`` of both ONNX Runtime backends: the first-head graph where they
    opened one (``open_first_head``), else head 1's row of the heads graph."""
    if backend.heads_first is None or backend._hidden is None:
        return Backend.first_head_logits(backend, index)
    return run_heads(backend.heads_first, backend._hidden[index : index + 1], backend._dtype)[0]


def run_heads(session, hidden: np.ndarray, dtype) -> np.ndarray:
    """The heads graph on hidden states ``[rows, hidden]``: ``[rows, heads, vocab]``."""
    (logits,) = session.run(None, {"hidden_states": np.ascontiguousarray(hidden).astype(dtype, copy=False)})
    return logits


def run_drafts(session, hidden: np.ndarray, path_ids: np.ndarray, path_len: np.ndarray, dtype) -> np.ndarray:
    """The Hydra heads graph: hidden ``[rows, hidden]``, paths ``[rows, heads]``, lengths ``[rows]``
    -> ``[rows, vocab]`` (artifact.HYDRA_INPUTS)."""
    feeds = {
        "hidden_states": np.ascontiguousarray(hidden).astype(dtype, copy=False),
        "path_ids": np.ascontiguousarray(path_ids, dtype=np.int64),
        "path_len": np.ascontiguousarray(path_len, dtype=np.int64),
    }
    (logits,) = session.run(None, feeds)
    return logits


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


KEEP_OUTPUT_ROWS = 64  # output rows a backend keeps between sequences (see _Outputs.give_back)


class _Outputs:
    """Host buffers for one graph's outputs, grown to the largest step seen (then reused)."""

    def __init__(self) -> None:
        self.capacity = 0
        self.buffers: dict[str, np.ndarray] = {}

    def views(self, shapes: dict[str, tuple], dtypes: dict[str, type], n: int, grow_to: int) -> dict[str, np.ndarray]:
        if n > self.capacity:
            self.capacity = max(n, grow_to)
            self.buffers = {
                name: np.empty((shape[0], self.capacity, *shape[2:]), dtype=dtypes[name])
                for name, shape in shapes.items()
            }
        return {name: buf[:, :n] for name, buf in self.buffers.items()}

    def give_back(self, keep: int = KEEP_OUTPUT_ROWS) -> None:
        """Between sequences: buffers grown past ``keep`` rows (a long prefill chunk's logits, ~200 KB a row
        at SmolLM2's vocabulary) go, as the KV cache's do (runtime.backend.gives_back)."""
        if self.capacity > keep:
            self.capacity, self.buffers = 0, {}


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
        self.backbone, self.heads, self.heads_file = open_sessions(
            ort, self.folder, config, threads, self.providers, heads_int8
        )
        self.heads_first = open_first_head(ort, self.folder, config, threads, self.providers, heads_int8)
        dtype = _NP_DTYPES[config.dtype]
        self._past_names = [n for n in config.backbone.inputs if n.startswith("past_key_values.")]
        self._present_names = [n for n in config.backbone.outputs if n.startswith("present.")]
        self._check_io()  # before the cache is sized from the config
        super().__init__(config.model, max_context=max_context, cache_dtype=dtype)
        self._dtype = dtype
        self.io_binding = io_binding and self.on_cpu
        self._outputs = _Outputs()
        spec = config.model
        kv = (1, 0, spec.num_kv_heads, spec.head_dim)
        self._out_shapes: dict[str, tuple[int, ...]] = {
            "logits": (1, 0, spec.vocab_size),
            "hidden_states": (1, 0, spec.hidden_size),
        }
        self._out_shapes.update({name: kv for name in self._present_names})
        self._out_dtypes = {name: dtype for name in self._out_shapes}

    def _check_io(self) -> None:
        want_in = ["input_ids", "position_ids", "tree_mask", *self._past_names]
        got_in = [i.name for i in self.backbone.get_inputs()]
        got_out = [o.name for o in self.backbone.get_outputs()]
        want_out = ["logits", "hidden_states", *self._present_names]
        if got_in != want_in or got_out != want_out:
            raise ArtifactError(
                f"{self.folder / self.config.backbone.file}: graph I/O does not match medusa_config.json "
                f"(inputs {got_in[:4]}..., expected {want_in[:4]}...; outputs {got_out[:3]}..., expected {want_out[:3]}...)"
            )
        if len(self._past_names) != 2 * self.config.model.num_layers:
            raise ArtifactError(
                f"{self.folder}: {len(self._past_names)} cache inputs for {self.config.model.num_layers} layers"
            )
        check_graph_sizes(self.folder, self.config, self.backbone, self.heads, self.heads_file, fused=False)

    # -- engine calls ------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        self._outputs.give_back()

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
        return run_heads(self.heads, hidden, self._dtype)

    first_head_logits = _first_head_logits

    def _run_drafts(self, hidden, path_ids, path_len):
        return run_drafts(self.heads, hidden, path_ids, path_len, self._dtype)


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


# ---------------------------------------------------------------------------- the lm_head screen


def screen_io(session) -> tuple[bool, bool]:
    """(whether a fused graph has the lm_head screen, whether it takes coupled sampling's noise):
    their inputs are optional (initializers of their names: listed as overridable)."""
    optional = {i.name for i in session.get_overridable_initializers()}
    outputs = [o.name for o in session.get_outputs()]
    screened = SCREEN_INPUT in optional and outputs[-len(SCREEN_OUTPUTS) :] == list(SCREEN_OUTPUTS)
    return screened, screened and SCREEN_NOISE in optional


def screen_draws(ids, scores, bound, noise=None, temperature=1.0, allowed=None) -> np.ndarray:
    """Each screened row's token, or -1 where the bound does not settle it: the best exactly scored
    candidate, of ``scores`` or (``noise``, the rows' Gumbel vectors ``[rows, vocab]``; the graph was
    fed ``temperature`` x noise) of float32 ``score / T + g``, where it beats ``bound`` (/ T).

    ``allowed`` (bool ``[rows, vocab]``, a grammar's mask): the best *allowed* candidate, where it
    beats the bound, is the argmax over the allowed tokens (every token outside the candidates,
    allowed or not, lies below the bound); a row that allows one token only draws that token
    whatever the scores; a row with no allowed candidate above the bound is left open (-1).

    With noise the graph ranked ``upper + T g``, so its bound B is above every other token's
    ``logit + T g``, and B / T above its ``logit / T + g``. The candidates are scored as the float
    path scores a row (runtime.backend.perturbed); the extra roundings (``+ T g``, ``/ T``: ~1e-6
    relative) sit far inside the bound's absolute slack (exporter.fused.SCREEN_ABS, 1e-3 of a logit)."""
    if noise is not None:
        scores = perturbed(scores, np.take_along_axis(noise, ids, axis=1), temperature)
        bound = bound / np.float32(temperature)
    if allowed is not None:
        scores = np.where(np.take_along_axis(allowed, ids, axis=1), scores, np.float32(-np.inf))
    r = np.arange(len(ids))
    j = np.argmax(scores, axis=1)
    out = np.where((scores[r, j] > bound) & ~screen_ties(scores), ids[r, j], -1)
    if allowed is not None:
        only = allowed.sum(axis=1) == 1  # a forced token: the masked argmax needs no score
        out[only] = np.argmax(allowed[only], axis=1)
    return out


# candidates whose scores lie this close (a logit's units) are a near-tie the screen leaves to the float path:
# they are scored by another MatMul than the float lm_head's (a gather, then one dot product a candidate), whose
# roundings may order two nearly equal logits the other way, and the float argmax breaks an exact tie by the
# lower token id where the screen would take the graph's TopK order (the bound's own slack, exporter.fused.SCREEN_ABS)
SCREEN_TIE = np.float32(1e-3)


def screen_ties(scores: np.ndarray) -> np.ndarray:
    """Rows (bool) whose best two candidate scores are within :data:`SCREEN_TIE`: the float path draws them."""
    if scores.shape[1] < 2:
        return np.zeros(len(scores), dtype=bool)
    top = np.partition(scores, -2, axis=1)[:, -2:]
    with np.errstate(invalid="ignore"):  # -inf - -inf (a row with no allowed candidate): no tie, left open anyway
        return (top[:, 1] - top[:, 0]) <= SCREEN_TIE


# what a grammar's disallowed tokens add to the screen's ranking: far below any logit, finite (float32)
SCREEN_MASKED = np.float32(-1e30)


def screen_ranking(noise, temperature, allowed, dtype=np.float32) -> np.ndarray | None:
    """The ``screen_noise`` input for rows drawn with coupled sampling's ``noise`` (``T g``) and/or a
    grammar's ``allowed`` mask (:data:`SCREEN_MASKED` where a token is not allowed), or None (the
    input's default, 0). With the mask the graph ranks the allowed tokens alone, so its candidates
    are the row's best allowed ones and its bound is above every other *allowed* token's (a row
    allowing fewer than ``SCREEN_CANDIDATES + 1`` tokens gets a bound near SCREEN_MASKED: its best
    allowed candidate always settles it); :func:`screen_draws` reads the candidates with the
    unmasked noise and the mask."""
    if allowed is None:
        return None if noise is None else noise * np.float32(temperature)
    ranking = np.where(allowed, np.float32(0), SCREEN_MASKED).astype(dtype, copy=False)
    if noise is not None:
        ranking += noise * np.float32(temperature)
    return ranking


def screen_holds(logits, cand, scores, bound) -> bool:
    """The lm_head screen's outputs against float ``logits`` of the same rows: the candidates'
    scores are their float logits and the bound is above every other token's. Its proof
    (exporter.fused._screen) assumes ONNX Runtime's int8 MatMulNBits quantizes a row in symmetric
    blocks of 32, as the CPU kernels of 1.32 (x86-64) do; a build that does not turns the screen
    off (the callers) rather than risk a token."""
    logits = np.array(logits, dtype=np.float64)
    cand, scores, bound = np.asarray(cand), np.asarray(scores), np.asarray(bound)
    others = logits.copy()
    np.put_along_axis(others, cand, -np.inf, axis=1)
    exact = np.take_along_axis(logits, cand, axis=1)
    return bool(np.allclose(scores, exact, rtol=1e-4, atol=1e-3) and (others.max(axis=1) <= bound).all())


# ---------------------------------------------------------------------------- fused flavour


START_CAPACITY = 256  # cache positions a fused backend's buffer starts with (it doubles as needed)


class FusedOnnxRuntimeBackend(DeviceCacheBackend):
    """The ``fused`` graph (exporter/fused.py) with its KV cache updated in place.

    The cache is one preallocated buffer ``[layers, 2, 1, kv_heads, capacity, head_dim]``
    whose per-layer slices are bound once as both ``past_key_values.*`` and ``present.*``:
    GroupQueryAttention writes the new tokens' entries at ``cache_len ..`` directly into it,
    so a step copies no cache and allocates nothing. ``commit(keep)`` then moves the
    accepted nodes' entries down to ``cache_len, cache_len + 1, ...`` (a few rows per layer,
    one numpy operation for all layers; nothing at all for a prefill, a plain step or a
    chain prefix, which are already in place). Rejected entries are simply overwritten by
    the next step: the graph reads only ``cache_lengths`` entries plus the new ones.

    The buffer starts at ``START_CAPACITY`` positions and doubles when a call needs more (the
    cached entries copied once per doubling, the cache rebound); ``reset`` keeps it up to
    ``runtime.backend.KEEP_CAPACITY`` positions (the next answer reuses its mapped pages), else starts small again.
    """

    def __init__(
        self,
        folder: str | Path,
        config: ArtifactConfig,
        device: str = "auto",
        threads: int | None = None,
        max_context: int | None = None,
        heads_int8: bool = True,
    ):
        ort = _ort()
        self.folder = Path(folder)
        self.config = config
        self.spec = config.model
        self.providers = choose_providers(device if device != "auto" else "cpu")
        if self.providers[0] != "CPUExecutionProvider":
            raise BackendUnavailableError(
                "the fused graph's in-place cache runs on the CPU provider here (use device='cpu', or a portable "
                "artifact with TensorRT on a GPU)"
            )
        self.threads = threads
        self.backbone, self.heads, self.heads_file = open_sessions(
            ort, self.folder, config, threads, self.providers, heads_int8
        )
        self.heads_first = open_first_head(ort, self.folder, config, threads, self.providers, heads_int8)
        self._dtype = _NP_DTYPES[config.dtype]
        spec = self.spec
        self.min_rows = row_invariant_rows(config)
        self.exact_branching = self.min_rows == 1
        # the usable context keeps room for the pad rows, so that every one-token step, the last one
        # included, runs as min_rows rows: a max_context asked for gets them on top, where the
        # rotary tables allow (the buffer may not outgrow them)
        asked = spec.max_context if max_context is None else max_context + self.min_rows - 1
        buffer = min(asked, spec.max_context)
        self.capacity = buffer - (self.min_rows - 1)
        self.screened_graph = self._check_io()
        # the lm_head screen serves greedy steps of float32 graphs (a quantized backbone's logits come
        # from its own quantized lm_head, which the screen's exact scores are not)
        self.screens_argmax = self.screened_graph and config.precision == "fp32" and self.min_rows == 1
        # coupled sampling's draws too, where the graph takes the noise (exports since 2026-12-02)
        self.screens_noise = self.screens_argmax and self._noise_input
        self.screen_fallbacks = 0  # screened rows decoding needed that the bound left unsettled (a second call)
        self._screened_call: tuple | None = None  # the last screened call's inputs (settle_argmax reruns it)
        # [layers, key|value, batch, kv_heads, allocated, head_dim], ``allocated`` growing by doubling
        # from START_CAPACITY up to ``buffer``: GroupQueryAttention's CPU kernel costs more with a
        # longer bound buffer (SmolLM2, 300 cached: 4-6% a step with 8,192 positions against 512 in one
        # measurement, inside the noise in another; docs/results/README.md, "A cache buffer that grows")
        self._buffer = buffer
        self.kv: np.ndarray = np.zeros(0, self._dtype)  # allocated by _alloc below
        self.length = 0
        self._staged = 0
        self._io = self.backbone.io_binding()
        self._alloc(min(START_CAPACITY, buffer))
        # the two scalar inputs are bound once too: each call writes them in place
        self._lengths = np.zeros(1, dtype=np.int64)
        self._num_logits = np.zeros(1, dtype=np.int64)
        _bind(self._io.bind_input, "cache_lengths", self._lengths)
        _bind(self._io.bind_input, "num_logits", self._num_logits)
        self._num_screened = np.zeros(1, dtype=np.int64)
        self._outputs = _Outputs()
        self._out_shapes: dict[str, tuple] = {
            "logits": (1, 0, spec.vocab_size),
            "hidden_states": (1, 0, spec.hidden_size),
        }
        self._out_dtypes: dict[str, type] = {name: self._dtype for name in self._out_shapes}
        self._no_noise = np.zeros((1, 1), dtype=self._dtype)  # the noise input's own default: greedy's ranking
        if self.screened_graph:
            _bind(self._io.bind_input, SCREEN_INPUT, self._num_screened)
            ids, scores, bound = SCREEN_OUTPUTS
            self._out_shapes.update({ids: (1, 0, SCREEN_CANDIDATES), scores: (1, 0, SCREEN_CANDIDATES), bound: (1, 0)})
            self._out_dtypes.update({ids: np.int64, scores: self._dtype, bound: self._dtype})
        self._hidden: np.ndarray | None = None
        self._bound: list[np.ndarray] = []
        if self.screens_argmax and not self._screen_sound():
            self.screens_argmax = self.screens_noise = False
            logging.getLogger("medusa_trt.runtime").warning(
                "%s: the lm_head screen's bound did not hold on this ONNX Runtime build (its int8 kernel "
                "quantizes rows otherwise than in blocks of 32?): greedy steps compute float logits",
                self.folder / config.backbone.file,
            )

    def _alloc(self, size: int) -> None:
        """A cache buffer of ``size`` positions holding the cached entries, bound as every layer's
        past and present (np.zeros maps its pages lazily: only what is copied or written costs)."""
        spec = self.spec
        kv = np.zeros((spec.num_layers, 2, 1, spec.num_kv_heads, size, spec.head_dim), self._dtype)
        if self.length:
            kv[:, :, :, :, : self.length] = self.kv[:, :, :, :, : self.length]
        self.kv = kv
        past, present = cache_names(spec.num_layers)
        for j in range(len(past)):  # k0, v0, k1, v1, ...: layer j // 2, key or value j % 2
            buf = self.kv[j // 2, j % 2]
            self._io.bind_input(past[j], "cpu", 0, self._dtype, list(buf.shape), buf.ctypes.data)
            self._io.bind_output(present[j], "cpu", 0, self._dtype, list(buf.shape), buf.ctypes.data)

    def _room(self, needed: int) -> None:
        """Grow the buffer (doubling, at most to the whole context) until ``needed`` positions fit."""
        size = self.kv.shape[4]
        if needed <= size:
            return
        while size < needed:
            size *= 2
        self._alloc(min(size, self._buffer))

    def _screen_sound(self) -> bool:
        """The lm_head screen checked against float logits at load, on one call of random tokens (then
        dropped; :func:`screen_holds`). ~30 ms for SmolLM2."""
        n = min(8, self.capacity)
        ids = np.random.default_rng(0).integers(0, self.spec.vocab_size, n)
        try:
            outs = self._run(ids, np.arange(n), np.tril(np.ones((n, n), dtype=bool)), n, n)
            return screen_holds(outs["logits"][0, :n], *(outs[name][0, :n] for name in SCREEN_OUTPUTS))
        finally:
            self.truncate(0)

    def _check_io(self) -> bool:
        """The graph's I/O against the fused contract; True where it has the lm_head screen."""
        from runtime.artifact import fused_io_names

        want_in, want_out = fused_io_names(self.spec.num_layers)
        got_in = [i.name for i in self.backbone.get_inputs()]
        got_out = [o.name for o in self.backbone.get_outputs()]
        # the screen's inputs have defaults (initializers of their names): listed as overridable, not as inputs
        screened, self._noise_input = screen_io(self.backbone)
        screened = screened and got_out == [*want_out, *SCREEN_OUTPUTS]
        self._noise_input &= screened
        if got_in != want_in or (got_out != want_out and not screened):
            raise ArtifactError(
                f"{self.folder / self.config.backbone.file}: graph I/O does not match the fused contract for "
                f"{self.spec.num_layers} layers in medusa_config.json ({len(got_in) - FUSED_CACHE_START} cache inputs; "
                f"inputs {got_in[:6]}..., expected {want_in[:6]}...; re-export with this medusa-export)"
            )
        check_graph_sizes(self.folder, self.config, self.backbone, self.heads, self.heads_file, fused=True)
        return screened

    def reset(self) -> None:
        self.truncate(0)
        if gives_back(self.kv.shape[4], START_CAPACITY):
            self._alloc(START_CAPACITY)
        self._outputs.give_back()

    keeps_prefix = True

    def truncate(self, n: int) -> None:
        # the entries past n stay in the buffer, stale: cache_lengths hides them, the next call overwrites them
        self.length = self._check_truncate(n)
        self._staged = 0
        self._hidden = None

    partial_logits = True  # forward(..., logits=k): the lm_head runs on the last k rows only

    def _forward(self, input_ids, position_ids, tree_mask, logits=None):
        n = len(input_ids)
        rows = max(n, self.min_rows)
        # logits for the last k rows (all of a padded step: its real rows come first)
        k = rows if (logits is None or rows != n) else max(0, min(int(logits), n))
        outs = self._run(input_ids, position_ids, tree_mask, k, 0)
        self._screened_call = None  # a later float call: nothing screened to settle
        return outs["logits"][0, : min(k, n)]

    def _forward_argmax(self, input_ids, position_ids, tree_mask, rows, noise=None, temperature=1.0, allowed=None):
        """The last ``rows`` tokens' argmax (of ``logits / T + noise`` where ``noise`` is given, over
        the ``allowed`` tokens where a mask is given) from the graph's lm_head screen
        (:func:`screen_draws`), or -1 where its bound does not settle a row (rare: ``settle_argmax``
        then runs the same call again with float logits)."""
        n = len(input_ids)
        s = max(0, min(int(rows), n))
        t = np.float32(temperature)
        if noise is not None:  # one row per screened row (Backend.forward_argmax checked it)
            noise = np.asarray(noise, dtype=self._dtype)
        outs = self._run(input_ids, position_ids, tree_mask, 0, s, screen_ranking(noise, t, allowed, self._dtype))
        self._screened_call = (input_ids, position_ids, tree_mask, s, noise, t, allowed)
        return screen_draws(*(outs[name][0, :s] for name in SCREEN_OUTPUTS), noise, t, allowed)

    def settle_argmax(self, row: int) -> int:
        """The call is run again with float logits for its screened rows: it writes the same cache
        entries again (staged, not yet committed), and its hidden states are the same."""
        if self._screened_call is None or not self._staged:  # (commit, truncate and restore unstage)
            raise RuntimeError("settle_argmax() without a screened forward to settle")
        input_ids, position_ids, tree_mask, s, noise, t, allowed = self._screened_call
        self.screen_fallbacks += 1
        logits = self._run(input_ids, position_ids, tree_mask, s, 0)["logits"][0, :s]
        r = slice(int(row), int(row) + 1)
        g, a = (None if x is None else x[r] for x in (noise, allowed))
        return int(draw_argmax(logits[r], g, t, a)[0])

    def _run(self, input_ids, position_ids, tree_mask, k: int, screened: int, noise=None) -> dict:
        """One backbone call on checked inputs: float logits for the last ``k`` rows, the lm_head
        screen for the last ``screened`` (ranked with ``noise``, ``[screened, vocab]``, added where
        given); the bound outputs (views of reused buffers)."""
        n = len(input_ids)
        if self.length == 0 and not np.array_equal(position_ids, np.arange(n)):
            # GroupQueryAttention's first-prompt path rotates by 0..n-1 whatever position_ids say
            raise MedusaError("the fused graph's first call on an empty cache must be a prefill at positions 0..n-1")
        rows = n
        if n < self.min_rows:  # capacity leaves the buffer room for the pad rows
            # one-row steps take the multi-row kernels too (see row_invariant_rows): pad with copies of the
            # last token that nothing sees (the mask) and nothing keeps (commit indexes the first n rows)
            rows = self.min_rows
            pad = rows - n
            input_ids = np.r_[input_ids, np.repeat(input_ids[-1:], pad)]
            step = 1 if self.length == 0 else 0  # a prefill keeps positions 0..rows-1
            position_ids = np.r_[position_ids, position_ids[-1] + step * np.arange(1, pad + 1)]
            mask = np.eye(rows, dtype=bool)
            mask[:n, :n] = tree_mask
            tree_mask = mask
        self._room(self.length + rows)
        io = self._io
        # Backend.forward hands int64 ids/positions and a bool mask: bound as they are
        bound = [
            _bind(io.bind_input, "input_ids", input_ids[None]),
            _bind(io.bind_input, "position_ids", position_ids[None]),
            _bind(io.bind_input, "tree_mask", tree_mask[None]),
        ]
        self._lengths[0] = self.length
        self._num_logits[0] = k
        self._num_screened[0] = screened
        outs = self._outputs.views(self._out_shapes, self._out_dtypes, rows, grow_to=max(64, rows))
        outs["logits"] = outs["logits"][:, :k]
        if self.screened_graph:
            for name in SCREEN_OUTPUTS:
                outs[name] = outs[name][:, :screened]
        if self._noise_input:  # bound every call: a binding outlives its call
            bound.append(_bind(io.bind_input, SCREEN_NOISE, self._no_noise if noise is None else noise))
        for name, arr in outs.items():
            bound.append(_bind(io.bind_output, name, arr))
        self._bound = bound  # kept alive until the next call
        self.backbone.run_with_iobinding(io)
        self._staged = n
        self._hidden = outs["hidden_states"][0, :n]
        return outs

    def commit(self, keep):
        keep = np.asarray(keep, dtype=np.int64)
        if not self._staged:
            raise RuntimeError("commit() without a forward() to commit")
        a = len(keep)
        if self.length + a > self.capacity:
            raise ContextLengthError(f"{self.length} cached + {a} tokens exceed the cache capacity of {self.capacity}")
        if a and (keep.min() < 0 or keep.max() >= self._staged):  # a pad row or a stale entry: never commit it
            raise MedusaError(f"commit(): rows {keep.tolist()} outside the {self._staged} the last forward staged")
        moved = np.flatnonzero(keep != np.arange(a))
        if len(moved):  # accepted tree nodes that are not already in place
            src = self.length + keep[moved]
            dst = self.length + moved
            self.kv[:, :, :, :, dst] = self.kv[:, :, :, :, src]
        self.length += a
        self._staged = 0

    def snapshot(self):
        return self.length, self.kv[:, :, :, :, : self.length].copy()

    def restore(self, state) -> None:
        n, kv = state
        self.length = 0  # nothing to keep: the buffer is overwritten below
        self._room(n)
        self.kv[:, :, :, :, :n] = kv  # in place: the bound buffers keep their addresses
        self.length = n
        self._staged = 0
        self._hidden = None

    def head_logits(self, index):
        if self._hidden is None:
            raise RuntimeError("head_logits() before any forward()")
        return run_heads(self.heads, self._hidden[index : index + 1], self._dtype)[0]

    first_head_logits = _first_head_logits

    def _run_drafts(self, hidden, path_ids, path_len):
        return run_drafts(self.heads, hidden, path_ids, path_len, self._dtype)


def row_invariant_rows(config: ArtifactConfig) -> int:
    """Fewest rows every backbone call of this artifact runs with, so that outputs do not
    depend on how tokens are grouped into calls.

    On weights quantized with int8 activations (MatMulNBits ``accuracy_level`` 4) a one-token
    step and a row of a multi-token step differ in the last bit of attention (a one-row
    kernel path), and the dynamic activation quantization of the next MatMul amplifies that
    to tenths of a logit, so greedy Medusa would drift from plain decoding. Rows of calls
    with two or more rows are bit-identical whatever the other rows hold (tested), so such
    graphs run every one-token step as two rows: plain decoding, prefill and tree
    verification then compute every position the same way, and Medusa is exactly lossless.
    Float graphs (and ``accuracy_level`` 1) need no padding: 1.
    """
    quant = (config.provenance or {}).get("quantization") or {}
    return 2 if config.precision in ("int8", "int4") and quant.get("accuracy_level", 4) >= 2 else 1


def run_fused_contract(session, input_ids, position_ids, tree_mask, past: list) -> list[np.ndarray]:
    """Run a fused graph on the portable contract's tensors (used by export validation):
    ``past`` sequence-major ``[batch, past, kv_heads, head_dim]`` per tensor in, the new
    entries alone out, so both flavours are compared with one reference.

    One sequence per call: ONNX Runtime's GroupQueryAttention takes several new tokens over
    a cache at batch 1 only, so batch rows run one after the other and are stacked.
    """
    names = [i.name for i in session.get_inputs()][FUSED_CACHE_START:]
    fetch = [o.name for o in session.get_outputs() if o.name not in SCREEN_OUTPUTS]
    rows = []
    for b in range(input_ids.shape[0]):
        p = past[0].shape[1]
        feed = {
            "input_ids": input_ids[b : b + 1],
            "position_ids": position_ids[b : b + 1],
            "tree_mask": tree_mask[b : b + 1],
            "cache_lengths": np.full(1, p, dtype=np.int64),
            "num_logits": np.full(1, input_ids.shape[1], dtype=np.int64),
        }
        feed.update({name: np.ascontiguousarray(t[b : b + 1].transpose(0, 2, 1, 3)) for name, t in zip(names, past)})
        logits, hidden, *presents = session.run(fetch, feed)
        n = input_ids.shape[1]
        rows.append([logits, hidden, *[t[:, :, p : p + n].transpose(0, 2, 1, 3) for t in presents]])
    return [np.ascontiguousarray(np.concatenate(parts, axis=0)) for parts in zip(*rows)]
