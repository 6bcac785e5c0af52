"""scripts/device_check.py's two stages as tests, for GPU machines (marker ``gpu``)::

    python -m pytest -q -m gpu tests/gpu      # from the repository root, on a machine with a CUDA GPU

Stage 1 needs torch with CUDA: the tiny random Llama with Medusa heads on the PyTorch
reference backend on the GPU; Medusa greedy == plain greedy == Hugging Face ``generate``.
Stage 2 needs ``tensorrt`` too: export, both engines built from the plan, Polygraphy
(TensorRT against ONNX Runtime on every profile), then lossless decoding on TensorRT.
Without a CUDA device, or without tensorrt for stage 2, they are skipped with the reason.
``python -m scripts.device_check`` runs the same functions as a script (PASS/FAIL lines);
here each stage's PASS/FAIL lines are in the test's captured stdout.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch", reason="the device check needs torch (pip install -e .[export])")
pytest.importorskip("transformers", reason="the device check needs transformers (pip install -e .[export])")

from scripts import device_check  # noqa: E402

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"torch {torch.__version__} sees no CUDA device: the device check runs on a GPU machine",
)


def _run(stage, *args):
    """``stage(*args)`` and the names of the checks it reported as FAIL (device_check.failures)."""
    start = len(device_check.failures)
    try:
        result = stage(*args)
    finally:
        failed = device_check.failures[start:]
        del device_check.failures[start:]
    return result, failed


@pytest.fixture(scope="module")
def tiny():
    """The device check's tiny random Llama, its fresh heads and word-level tokenizer."""
    return device_check.tiny_model()


@pytest.fixture(scope="module")
def torch_stage(tiny):
    """Stage 1, run once: (plain greedy tokens on CUDA, the checks that failed)."""
    model, heads, _ = tiny
    return _run(device_check.stage_torch, model, heads)


@needs_cuda
def test_torch_cuda_stage(torch_stage):
    tokens, failed = torch_stage
    assert not failed, f"torch CUDA stage: {failed} failed (PASS/FAIL lines in the captured stdout)"
    assert tokens, "the plain greedy decode on CUDA gave no token"


@needs_cuda
def test_tensorrt_stage(tiny, torch_stage, tmp_path):
    pytest.importorskip(
        "tensorrt",
        reason="tensorrt is not installed: export, engine build, Polygraphy and TensorRT decoding "
        "need it (pip install -e .[gpu] on a GPU machine)",
    )
    model, heads, tok = tiny
    _, failed = _run(device_check.stage_tensorrt, model, heads, tok, tmp_path, torch_stage[0])
    assert not failed, f"TensorRT stage: {failed} failed (PASS/FAIL lines in the captured stdout)"
