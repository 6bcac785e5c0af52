"""int8 Medusa heads for ONNX Runtime: dynamic quantization of ``heads.onnx``.

The heads only *propose* candidates; the backbone verifies every one of them, so the
precision of the heads can never change the output (greedy stays lossless). What it
changes is cost: the heads' vocabulary projection reads the whole ``[vocab, hidden]``
matrix once per step, as much memory traffic as the backbone's own ``lm_head``.
int8 weights read 4x fewer bytes (SmolLM2-135M, 2 CPU threads: see docs/export.md).

TensorRT does not take ONNX Runtime's dynamic-quantization ops: engines are built from
the float ``heads.onnx``, which the artifact always keeps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from runtime.artifact import ArtifactConfig, GraphSpec

INT8_FILE = "heads_int8.onnx"
FIRST_HEAD_FILE = "heads_int8_first.onnx"
DEFAULT_ACCURACY_LEVEL = 4

log = logging.getLogger("medusa_trt.exporter")


@contextlib.contextmanager
def _root_logger_kept() -> Iterator[None]:
    """ONNX Runtime's quantization code configures the root logger: importing
    ``matmul_nbits_quantizer`` calls ``logging.basicConfig(level=INFO)``, and ``quantize_dynamic``
    calls the module-level ``logging.warning("Please consider pre-processing ...")``, which runs
    ``basicConfig`` too. Within the block the root logger holds a ``NullHandler`` (so
    ``basicConfig`` does nothing) and drops the records logged on it directly below ERROR (records
    of named loggers, ours included, pass); its level, handlers and filters are restored on exit."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), list(root.filters))
    root.addHandler(logging.NullHandler())
    root.addFilter(lambda record: record.levelno >= logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        root.filters[:] = saved[2]


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """ONNX Runtime dynamic quantization of a heads graph: int8 weights (QInt8), activations
    quantized per call; the root logger is left as it was."""
    with _root_logger_kept():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def _like_heads(config: ArtifactConfig, file: str) -> GraphSpec:
    """A graph entry for ``file`` with the heads graph's inputs, outputs and axes."""
    h = config.heads
    return GraphSpec(file, list(h.inputs), list(h.outputs), dict(h.dynamic_axes))


def quantize_heads(folder: str | Path, config: ArtifactConfig) -> ArtifactConfig:
    """Write ``heads_int8.onnx`` next to ``heads.onnx`` and record it in ``config``."""
    folder = Path(folder)
    quantize_int8(folder / config.heads.file, folder / INT8_FILE)
    config.heads_int8 = _like_heads(config, INT8_FILE)
    return config


def quantize_first_head(folder: str | Path, config: ArtifactConfig, heads, lm_head, opset: int) -> ArtifactConfig:
    """Write ``heads_int8_first.onnx`` (Medusa heads with K > 1: the first head alone, traced as
    ``heads.onnx`` is and quantized as ``heads_int8.onnx``) and record it in ``config``. A tree that
    reads head 1 only drafts from it: one projected row instead of K (SmolLM2, 2 CPU threads,
    `medusa-run profile`: 1.06-1.16 against 2.03-2.18 ms a call). Its head-1 logits are the int8 graph's up to the activation scale,
    which the dynamic quantization takes over the rows it sees (one here, K there): candidates only."""
    import tempfile

    from exporter.export import export_heads
    from exporter.heads import first_heads

    folder = Path(folder)
    # in tempfile's folder, which the export points inside its partial folder: a kill leaves nothing
    # beside the output that the next export's cleanup would miss
    with tempfile.TemporaryDirectory(prefix=".first-head-") as scratch:
        float_path = Path(scratch) / "heads_first.onnx"
        level = log.level
        log.setLevel(logging.WARNING)  # the caller logs this step as one line, not the trace's own three
        try:
            export_heads(first_heads(heads, 1), lm_head, float_path, opset)
        finally:
            log.setLevel(level)
        quantize_int8(float_path, folder / FIRST_HEAD_FILE)
    config.heads_int8_first = _like_heads(config, FIRST_HEAD_FILE)
    return config


def quantize_backbone(
    folder: str | Path,
    config: ArtifactConfig,
    bits: int,
    external_data_threshold_mb: float = 1024.0,
    *,
    block_size: int = 32,
    check: bool = True,
    accuracy_level: int | None = None,
    check_ids=None,
) -> dict:
    """Replace the fused ``model.onnx``'s weight MatMuls by ONNX Runtime ``MatMulNBits``
    (``bits`` = 4 or 8, symmetric blocks of ``block_size`` along the input dimension;
    weight-only: activations, logits and the KV cache stay in float).

    ``accuracy_level=4`` (the default, as onnxruntime-genai's builder does for CPU int4) lets
    the CPU kernels compute with int8 activations quantized per row and block: several times
    faster than float compute once a step has more than one row (``accuracy_level=1``
    dequantizes every weight matrix per multi-row call: a 4-node tree step cost 3x a plain
    step on SmolLM2). Such graphs are run with at least two rows a call
    (:func:`runtime.onnxrt.row_invariant_rows`), which keeps Medusa exactly lossless against
    plain decoding over *this* graph. ``MEDUSA_TRT_ACCURACY_LEVEL`` overrides the level.

    Returns provenance: bits, block size, which MatMuls, the files written and (``check``)
    how far the quantized graph's logits moved from the float graph's on a random prompt.
    """
    import os
    import shutil

    import onnx

    from exporter.fused import save_model

    with _root_logger_kept():  # the import configures the root logger
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
        from onnxruntime.quantization.quant_utils import QuantFormat

    folder = Path(folder)
    path = folder / config.backbone.file
    from exporter.fused import strip_screen

    model = strip_screen(onnx.load(str(path)))  # the screen scores float rows: not a quantized lm_head's
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    if accuracy_level is None:
        accuracy_level = int(os.environ.get("MEDUSA_TRT_ACCURACY_LEVEL", DEFAULT_ACCURACY_LEVEL))
    algo = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
        bits=bits,
    )
    quantizer = MatMulNBitsQuantizer(
        model, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, algo_config=algo, bits=bits
    )
    with _root_logger_kept():
        quantizer.process()
    quantized = quantizer.model.model
    done = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
    float_copy = None
    if check:
        # the float graph moves into a subfolder with its tensors: its external-data location is a name
        # relative to the graph, so it must keep that name (and the quantized graph's own file, which
        # save_model writes next to model.onnx, must not be mistaken for it)
        float_dir = folder / ".float"
        float_dir.mkdir()
        float_copy = float_dir / path.name
        os.replace(path, float_copy)
        data = path.with_name(path.name + ".data")
        if data.exists():
            os.replace(data, float_dir / data.name)
    try:
        files = save_model(quantized, path, external_data_threshold_mb)  # ONNX Runtime loading it is the check
        info = {
            "bits": bits,
            "block_size": block_size,
            "symmetric": True,
            "accuracy_level": accuracy_level,
            "op": "com.microsoft.MatMulNBits",
            "matmuls_quantized": done,
            "matmuls": len(matmuls),
            "files": files,
        }
        if float_copy is not None:
            info["check"] = _compare_logits(float_copy, path, config, ids=check_ids)
            c = info["check"]
            log.info(
                "int%d vs float graph on %d tokens of %s: top-1 agrees at %.1f%% of positions, max|logits diff| %.3g",
                bits,
                c["tokens"],
                c["on"],
                100 * c["top1_agree"],
                c["max_abs_logits"],
            )
        return info
    finally:
        if float_copy is not None:
            shutil.rmtree(float_copy.parent, ignore_errors=True)


# a fixed English passage: quantization error shows on text the model predicts with confidence
# (on random tokens its distributions are nearly flat and top-1 agreement says little)
CHECK_TEXT = (
    "The water cycle describes how water moves between the oceans, the air and the land. The sun heats "
    "the surface of the sea, and water evaporates into the atmosphere. As the warm, moist air rises, it "
    "cools and the vapour condenses into tiny droplets that form clouds. When the droplets grow heavy "
    "enough, they fall back to the ground as rain or snow. Rivers carry much of this water back to the sea."
)


def _compare_logits(float_path: Path, quant_path: Path, config: ArtifactConfig, tokens: int = 64, ids=None) -> dict:
    """Top-1 agreement and largest logit difference of the quantized graph against the float
    one on ``ids`` (the tokenized CHECK_TEXT when the export has a tokenizer; else random ids)."""
    import numpy as np
    import onnxruntime as ort

    from runtime.onnxrt import run_fused_contract

    spec = config.model
    tokens = min(tokens, spec.max_context)  # the fused graph's rotary tables hold max_context rows
    text = ids is not None and len(ids) >= 2
    if text:
        ids = np.asarray(list(ids)[:tokens], dtype=np.int64)[None]
        tokens = ids.shape[1]
    else:
        ids = np.random.default_rng(0).integers(0, spec.vocab_size, (1, tokens), dtype=np.int64)
    pos = np.arange(tokens, dtype=np.int64)[None]
    mask = np.tril(np.ones((tokens, tokens), dtype=bool))[None]
    past = [np.zeros((1, 0, spec.num_kv_heads, spec.head_dim), np.float32) for _ in range(2 * spec.num_layers)]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    out = []
    for p in (float_path, quant_path):
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        out.append(run_fused_contract(sess, ids, pos, mask, past)[0][0])
        del sess
    ref, got = out
    return {
        "tokens": tokens,
        "on": "text" if text else "random ids",
        "top1_agree": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "max_abs_logits": float(np.abs(ref - got).max()),
    }
