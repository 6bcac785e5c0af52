"""medusa-train on a CUDA GPU (``--device cuda``), for GPU machines (marker ``gpu``)::

    python -m pytest -q -m gpu tests/gpu      # from the repository root, on a machine with a CUDA GPU

Self-distillation and Medusa-1 on a tiny random Llama: greedy answers generated on the GPU equal the
CPU's, sampled ones follow one seeded generator a batch (a run repeats, a prompt's samples differ), and
heads trained on the GPU (the training vocabulary and the draft vocabulary on the device) beat fresh
heads and are saved on the CPU (loadable anywhere). Skipped, with the reason, without a CUDA device.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch", reason="medusa-train needs torch (pip install -e .[export])")
pytest.importorskip("transformers", reason="medusa-train needs transformers (pip install -e .[export])")
if not torch.cuda.is_available():
    pytest.skip(f"torch {torch.__version__} sees no CUDA device: these run on a GPU machine", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from train_helpers import VOCAB, CharTokenizer, tiny_llama  # noqa: E402
from train_helpers import synthetic_records as _records  # noqa: E402


def _cfg(tmp_path, **kw):
    from training.distill import DistillConfig

    rows = [{"instruction": f"question {i} " + "x" * (i % 4), "input": "", "output": "-"} for i in range(12)]
    prompts = tmp_path / "alpaca.json"
    prompts.write_text(json.dumps(rows))
    return DistillConfig(model="tiny", prompts=prompts, out=tmp_path / "cpu.jsonl", num_prompts=12,
                         max_new_tokens=10, batch_size=5, **kw)  # fmt: skip


def test_greedy_distillation_on_the_gpu_writes_the_cpus_answers(tmp_path):
    from training.distill import distill

    tok = CharTokenizer()
    cfg = _cfg(tmp_path)
    cpu = distill(cfg, backbone=(tiny_llama(), tok))
    gpu = distill(dataclasses.replace(cfg, device="cuda", out=tmp_path / "gpu.jsonl"), backbone=(tiny_llama(), tok))
    assert [r["response_ids"] for r in gpu] == [r["response_ids"] for r in cpu]
    sampled = distill(dataclasses.replace(cfg, device="cuda", temperature=1.0, samples=2, out=tmp_path / "s.jsonl"),
                      backbone=(tiny_llama(), tok))  # fmt: skip
    again = distill(dataclasses.replace(cfg, device="cuda", temperature=1.0, samples=2, out=tmp_path / "s2.jsonl"),
                    backbone=(tiny_llama(), tok))  # fmt: skip
    assert len(sampled) == 24 and [r["response_ids"] for r in sampled] == [r["response_ids"] for r in again]
    assert sum(a["response_ids"] != b["response_ids"] for a, b in zip(sampled[::2], sampled[1::2])) > 6  # ID@1 != ID@2


def test_medusa1_on_the_gpu_beats_fresh_heads_and_saves_them_on_the_cpu(tmp_path):
    from exporter.heads import load_heads
    from training.distill import write_atomic
    from training.medusa1 import Medusa1Config, train_medusa1

    data = tmp_path / "d.jsonl"
    write_atomic(data, _records(160))
    cfg = Medusa1Config(model="tiny", data=data, out=tmp_path / "heads", num_heads=3, lr=1e-2, epochs=4,
                        batch_tokens=128, device="cuda")  # fmt: skip
    summary = train_medusa1(cfg, backbone=(tiny_llama(), None, tmp_path))
    for k in range(3):
        assert summary["heldout_top1"][k] > summary["heldout_top1_untrained"][k] + 0.2, summary
    assert torch.cuda.get_device_name(0) in summary["machine"]
    heads = load_heads(tmp_path / "heads", hidden_size=32, vocab_size=VOCAB)
    assert next(heads.parameters()).device.type == "cpu" and heads.config.num_heads == 3
