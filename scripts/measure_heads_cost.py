"""Measure what the Medusa heads cost per step, against one plain decode step (ONNX Runtime, CPU).

This layout runs ``heads.onnx`` on ONE hidden state per step (the last accepted node):
``[1, hidden] -> [1, K, vocab]``. The official Medusa code instead projects every tree
node through every head (``[K, nodes, vocab]``) and keeps one row; that cost is measured
here by feeding all N nodes' hidden states to the same heads graph (batch = N).

    python -m scripts.measure_heads_cost                      # exports smollm2-135m + 4 fresh heads to a temp folder
    python -m scripts.measure_heads_cost --artifact OUT       # an existing artifact
    python -m scripts.measure_heads_cost --runs 50 --past 256 --threads 2 --json cost.json

Every number is the median of ``--runs`` timed calls after 3 warm-up calls, batch 1,
``--past`` cached tokens. Prints a Markdown table (docs/graph_contract.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _median_ms(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def measure(
    folder: Path,
    runs: int = 30,
    past: int = 128,
    threads: int | None = None,
    trees: tuple[str, ...] = ("cpu_8", "mc_sim_7b_63"),
) -> dict:
    from runtime.artifact import read_artifact
    from runtime.tree import load_tree

    cfg = read_artifact(folder)
    if cfg.flavour != "portable":
        raise SystemExit(
            f"{folder} holds the {cfg.flavour} graph: this script feeds the portable graph's inputs; "
            "export with --graph portable, or use `medusa-run profile`, which measures any artifact "
            "(the heads call included)"
        )
    spec = cfg.model
    dt = np.float16 if cfg.dtype == "float16" else np.float32
    rng = np.random.default_rng(0)
    backbone = _session(folder / cfg.backbone.file, threads)
    heads = _session(folder / cfg.heads.file, threads)
    past_names = [n for n in cfg.backbone.inputs if n.startswith("past_key_values.")]
    cache = {n: (0.5 * rng.standard_normal((1, past, spec.num_kv_heads, spec.head_dim))).astype(dt) for n in past_names}

    def step_feed(mask: np.ndarray, depth: np.ndarray) -> dict:
        n = len(depth)
        return {
            "input_ids": rng.integers(0, spec.vocab_size, (1, n), dtype=np.int64),
            "position_ids": (past + depth)[None].astype(np.int64),
            "tree_mask": mask[None],
            **cache,
        }

    h_in = cfg.heads.inputs[0]
    out = {
        "artifact": str(folder),
        "dtype": cfg.dtype,
        "past": past,
        "runs": runs,
        "threads": threads,
        "num_medusa_heads": spec.num_medusa_heads,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    decode = step_feed(np.ones((1, 1), dtype=bool), np.zeros(1, dtype=np.int64))
    out["decode_ms"] = _median_ms(lambda: backbone.run(None, decode), runs)
    one = {h_in: rng.standard_normal((1, spec.hidden_size)).astype(dt)}
    out["heads_one_node_ms"] = _median_ms(lambda: heads.run(None, one), runs)
    if cfg.heads_int8 is not None:  # what ONNX Runtime on the CPU runs by default
        heads8 = _session(folder / cfg.heads_int8.file, threads)
        out["heads_int8_one_node_ms"] = _median_ms(lambda: heads8.run(None, one), runs)
    out["trees"] = {}
    for name in trees:
        tree = load_tree(name)
        n = tree.num_nodes
        feed = step_feed(tree.attn_mask, tree.position_ids)
        every = {h_in: rng.standard_normal((n, spec.hidden_size)).astype(dt)}
        out["trees"][name] = {
            "nodes": n,
            "verify_ms": _median_ms(lambda feed=feed: backbone.run(None, feed), runs),
            "heads_every_node_ms": _median_ms(lambda every=every: heads.run(None, every), runs),
        }
    return out


def table(r: dict) -> str:
    d, h = r["decode_ms"], r["heads_one_node_ms"]
    lines = [
        f"SmolLM2-style artifact: {r['num_layers']} layers, hidden {r['hidden_size']}, vocabulary {r['vocab_size']}, "
        f"{r['num_medusa_heads']} heads, {r['dtype']}; ONNX Runtime CPU, batch 1, past {r['past']}, "
        f"median of {r['runs']} runs, threads {r['threads'] or 'default'}, {r['cpu_count']} CPUs, "
        f"load average {r['load_average'][0]:.1f}",
        "",
        "| what | median ms | vs one plain decode step |",
        "|---|---:|---:|",
        f"| plain decode step (model.onnx, 1 new token) | {d:.2f} | 1.00x |",
        f"| heads, this layout (heads.onnx on 1 node) | {h:.2f} | {h / d:.2f}x |",
    ]
    if "heads_int8_one_node_ms" in r:
        h8 = r["heads_int8_one_node_ms"]
        lines.append(
            f"| heads, this layout, int8 weights (heads_int8.onnx on 1 node; the CPU default) | {h8:.2f} | {h8 / d:.2f}x |"
        )
    for name, t in r["trees"].items():
        lines.append(
            f"| heads on all {t['nodes']} nodes of {name} (official layout) | {t['heads_every_node_ms']:.2f} | "
            f"{t['heads_every_node_ms'] / d:.2f}x |"
        )
        lines.append(
            f"| tree verification step, {name} ({t['nodes']} new tokens) | {t['verify_ms']:.2f} | "
            f"{t['verify_ms'] / d:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--artifact",
        type=Path,
        help="an exported artifact, portable graph (default: export smollm2-135m "
        "with --graph portable to a temp folder)",
    )
    p.add_argument("--fresh-heads", type=int, default=4, help="heads for the temporary export (default 4)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--past", type=int, default=128, help="cached tokens (default 128)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--trees", nargs="+", default=["cpu_8", "mc_sim_7b_63"])
    p.add_argument("--json", type=Path, help="also write the numbers here")
    a = p.parse_args(argv)
    tmp = None
    folder = a.artifact
    if folder is None:
        from exporter.export import ExportOptions, export_artifact
        from exporter.heads import fresh_heads
        from exporter.models import load_backbone

        tmp = Path(tempfile.mkdtemp(prefix="medusa-heads-cost-"))
        model, tok, _ = load_backbone("smollm2-135m")
        heads = fresh_heads(a.fresh_heads, model.config.hidden_size, model.config.vocab_size)
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # the export's steps, on stderr
        folder = export_artifact(
            model,
            heads,
            tmp / "artifact",
            ExportOptions(validate=False, source_model="smollm2-135m", graph="portable"),
            tokenizer=tok,
        )
        del model
    try:
        r = measure(folder, runs=a.runs, past=a.past, threads=a.threads, trees=tuple(a.trees))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(r))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
