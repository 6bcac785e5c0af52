"""Polygraphy data loader for a medusa-trt artifact: feeds for the graphs' dynamic inputs.

``load_data()`` yields one feed dict per iteration, shaped from the artifact's
``medusa_config.json`` (layer count, KV heads, head dim, dtype, default tree):

    model.onnx   prefill      batch 1, past_sequence 0,  new_tokens 16, causal tree_mask
                 decode       batch 1, past_sequence 16, new_tokens 1
                 tree step    batch 1, past_sequence 16, new_tokens = default tree's nodes
                 tree step    batch 2, the same
    heads.onnx   hidden_states batch 1 and batch 2

The artifact is ``$MEDUSA_ARTIFACT`` if set, else the folder of the ``.onnx`` file on
Polygraphy's command line; which graph it feeds follows that file's name. numpy only,
no project import: the script runs wherever Polygraphy does (the GPU machine included).
Polygraphy loads it by its file path (``--data-loader-script``); the PyTorch reference mode
below imports the exporter, so it runs as a module from the repository root (or anywhere
medusa-trt[export] is installed).

Recipe (docs/graph_contract.md), ONNX Runtime without graph optimizations (plain
per-node kernels) as the reference, then ONNX Runtime with all fusions against it:

    polygraphy run OUT/model.onnx --onnxrt --graph-optimization-level ORT_DISABLE_ALL \\
        --data-loader-script scripts/polygraphy_data_loader.py --save-outputs /tmp/ort_ref.json
    polygraphy run OUT/model.onnx --onnxrt \\
        --data-loader-script scripts/polygraphy_data_loader.py --load-outputs /tmp/ort_ref.json \\
        --atol 1e-3 --rtol 1e-3

PyTorch as the reference instead (needs torch and the source model):

    python -m scripts.polygraphy_data_loader --torch-outputs /tmp/torch_ref.json OUT MODEL
    polygraphy run OUT/model.onnx --onnxrt \\
        --data-loader-script scripts/polygraphy_data_loader.py --load-outputs /tmp/torch_ref.json \\
        --atol 1e-3 --rtol 1e-3
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

PROMPT = 16
SEED = 0


def _artifact_and_graph() -> tuple[Path, str]:
    env = os.environ.get("MEDUSA_ARTIFACT")
    onnx_args = [a for a in sys.argv[1:] if a.endswith(".onnx")]
    graph = Path(onnx_args[0]).name if onnx_args else "model.onnx"
    if env:
        return Path(env), graph
    if not onnx_args:
        raise SystemExit("polygraphy_data_loader: set MEDUSA_ARTIFACT or pass ARTIFACT/model.onnx to polygraphy")
    return Path(onnx_args[0]).resolve().parent, graph


def _tree_buffers(paths: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(attention mask [N, N], depth [N]) in the official node order: root, then by length, lexicographic."""
    ordered = sorted((tuple(p) for p in paths), key=lambda p: (len(p), p))
    nodes = [()] + ordered
    index = {p: i for i, p in enumerate(nodes)}
    n = len(nodes)
    mask = np.zeros((n, n), dtype=bool)
    for p, i in index.items():
        mask[i, 0] = True
        for k in range(1, len(p) + 1):
            mask[i, index[p[:k]]] = True
    depth = np.array([len(p) for p in nodes], dtype=np.int64)
    return mask, depth


def feeds(folder: Path, graph: str = "model.onnx") -> list[dict[str, np.ndarray]]:
    """Every feed dict for ``graph`` of the artifact in ``folder``."""
    cfg = json.loads((Path(folder) / "medusa_config.json").read_text())
    spec = cfg["model"]
    dtype = np.float16 if cfg["dtype"] == "float16" else np.float32
    rng = np.random.default_rng(SEED)
    if graph == cfg["heads"]["file"]:
        name = cfg["heads"]["inputs"][0]
        return [{name: rng.standard_normal((b, spec["hidden_size"])).astype(dtype)} for b in (1, 2)]

    past_names = [n for n in cfg["backbone"]["inputs"] if n.startswith("past_key_values.")]
    kv = (spec["num_kv_heads"], spec["head_dim"])

    def feed(batch: int, past: int, mask: np.ndarray, depth: np.ndarray) -> dict[str, np.ndarray]:
        new = len(depth)
        out = {
            "input_ids": rng.integers(0, spec["vocab_size"], (batch, new), dtype=np.int64),
            "position_ids": np.broadcast_to(past + depth, (batch, new)).astype(np.int64),
            # a copy: np.ascontiguousarray keeps a batch-1 broadcast view (read-only), which torch.from_numpy warns about
            "tree_mask": np.broadcast_to(mask, (batch, new, new)).copy(),
        }
        for name in past_names:
            out[name] = (0.5 * rng.standard_normal((batch, past, *kv))).astype(dtype)
        return out

    tree_mask, tree_depth = _tree_buffers(cfg["default_tree_paths"])
    return [
        feed(1, 0, np.tril(np.ones((PROMPT, PROMPT), dtype=bool)), np.arange(PROMPT, dtype=np.int64)),  # prefill
        feed(1, PROMPT, np.ones((1, 1), dtype=bool), np.zeros(1, dtype=np.int64)),  # decode
        feed(1, PROMPT, tree_mask, tree_depth),  # tree verification
        feed(2, PROMPT, tree_mask, tree_depth),  # batch 2
    ]


def load_data():
    """Polygraphy's entry point: one feed dict per iteration."""
    folder, graph = _artifact_and_graph()
    yield from feeds(folder, graph)


def _torch_outputs(out_json: str, folder: str, model: str) -> None:
    """Run the same feeds through PyTorch (exporter.step) and save Polygraphy RunResults."""
    import torch
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    try:
        from exporter.models import load_backbone
        from exporter.step import BackboneStep
    except ImportError as e:
        sys.exit(
            f"--torch-outputs needs the exporter ({e}): run `python -m scripts.polygraphy_data_loader ...` "
            "from the repository root, or pip install 'medusa-trt[export]'"
        )

    cfg = json.loads((Path(folder) / "medusa_config.json").read_text())
    m, _, _ = load_backbone(model, dtype=cfg["dtype"])
    step = BackboneStep(m).eval()
    names = cfg["backbone"]["outputs"]
    iterations = []
    for f in feeds(Path(folder), "model.onnx"):
        with torch.inference_mode():
            outs = step(*[torch.from_numpy(np.ascontiguousarray(f[n])) for n in cfg["backbone"]["inputs"]])
        iterations.append(IterationResult({n: o.numpy() for n, o in zip(names, outs)}, runner_name="pytorch"))
    results = RunResults()
    results.append(("pytorch", iterations))
    results.save(out_json)
    print(f"saved PyTorch outputs for {len(iterations)} iterations to {out_json}")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Write PyTorch reference outputs for `polygraphy run --load-outputs`.")
    p.add_argument("--torch-outputs", required=True, metavar="JSON", help="RunResults file to write")
    p.add_argument("artifact", help="artifact folder (medusa_config.json)")
    p.add_argument("model", help="the source model: a Hugging Face folder or smollm2-135m")
    a = p.parse_args()
    _torch_outputs(a.torch_outputs, a.artifact, a.model)
