"""Tree selection: the tree that maximizes expected accepted tokens per unit of step time.

Inputs:

* ``acc[k][r]``: probability that rank r of head k is the right token, measured on the
  calibration split (never MT-Bench) from the cached hidden states;
* a cost profile ``{"backend": ..., "relative_cost": {"1": 1.0, "2": ..., "64": ...}}``:
  the time of verifying N tokens relative to 1 (``medusa-run profile`` writes it; without
  one, :func:`measure_cost_profile` measures it with the PyTorch reference backend).

Construction (Medusa paper, Sec. 3.3.2 / appendix): a node ``(r1, ..., rd)`` is right
with probability ``prod_i acc[i-1][r_i]`` (heads assumed independent); the expected
accepted length of a tree is ``1 + sum over nodes`` of that product (the 1 is the root,
the backbone's own token). Adding nodes greedily by that value gives the best tree of
each size (a child never beats its parent, so the greedy set is prefix-closed). Among
those nested trees, the chosen one maximizes ``expected length / step cost``, where a
Medusa step costs ``cost(nodes + 1) + heads_cost`` (the heads' call; the profile's
``heads_relative_cost``) and a plain step ``cost(1)``.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.cli import SHIPPED_HEADS
from runtime.errors import MedusaError
from runtime.paths import read_text, write_text_atomic

log = logging.getLogger("medusa_trt.training")


@dataclass
class SelectConfig:
    model: str = "smollm2-135m"
    heads: str = str(SHIPPED_HEADS / "smollm2-135m")  # the package's own, found from any working folder
    data: Path | None = Path("runs/distill/smollm2_alpaca.jsonl")
    cache: Path | None = None
    name: str = "smollm2_selected"
    out_dir: Path = Path("runs/trees")  # outside the source tree; tree_configs/ holds the tracked trees
    force: bool = False  # replace an existing <out_dir>/<name>.json
    profile: Path | None = None
    max_nodes: int = 64  # tree nodes, root excluded
    max_rank: int = 10
    heads_cost: float | None = None  # heads call / plain step; None: the profile's heads_relative_cost (else 0)
    threads: int | None = None
    # a tree file whose recorded calibration accuracies are reused instead of measuring them on `data`
    accuracy_from: Path | None = None


# ---------------------------------------------------------------------------- the builder


def greedy_trees(acc: np.ndarray, max_nodes: int) -> list[tuple[tuple[int, ...], float]]:
    """Nodes in the greedy order with their path probability: the best tree of size n is the first n."""
    acc = np.asarray(acc, dtype=np.float64)
    K, R = acc.shape
    heap: list[tuple[float, tuple[int, ...]]] = [(-acc[0, r], (r,)) for r in range(R) if acc[0, r] > 0]
    heapq.heapify(heap)
    order: list[tuple[tuple[int, ...], float]] = []
    while heap and len(order) < max_nodes:
        neg, path = heapq.heappop(heap)
        order.append((path, -neg))
        if len(path) < K:  # its children become candidates
            for r in range(R):
                v = -neg * acc[len(path), r]
                if v > 0:
                    heapq.heappush(heap, (-v, path + (r,)))
    return order


def acceptance_bound(acc: np.ndarray) -> float:
    """Expected accepted length of the *complete* tree (every rank of every head up to depth K):
    no tree over these ranks accepts more under the same model. It is ``1 + sum_d prod_{k<d} top_R(k)``
    with ``top_R(k) = sum_r acc[k][r]``: what the heads allow whatever the step cost."""
    acc = np.asarray(acc, dtype=np.float64)
    return float(1.0 + np.cumprod(acc.sum(1)).sum())


def interpolate_cost(profile: dict[int, float], n: int) -> float:
    """Relative cost of verifying n tokens, linear between measured sizes (and beyond the last two)."""
    xs = sorted(profile)
    if n <= xs[0]:
        return profile[xs[0]]
    if n >= xs[-1]:
        if len(xs) == 1:
            return profile[xs[-1]]
        a, b = xs[-2], xs[-1]
        return profile[b] + (profile[b] - profile[a]) / (b - a) * (n - b)
    return float(np.interp(n, xs, [profile[x] for x in xs]))


def select(
    acc: np.ndarray, profile: dict[int, float], max_nodes: int = 64, heads_cost: float = 0.0, per_depth: bool = False
) -> dict:
    """The chosen tree: paths, predicted accepted length, cost and the speed objective per size.

    ``heads_cost``: the heads' call per step, relative to a plain step (``cost(1)``); ``per_depth``
    (Hydra heads, drafted level by level): that call is made once per depth of the tree. For Hydra
    heads ``acc[k][r]`` is rank r's accuracy given an accepted path above it (teacher forcing), so
    the product over a path below is exact, not an independence assumption."""
    if heads_cost < 0:
        raise MedusaError(f"heads cost must be >= 0, got {heads_cost}")
    order = greedy_trees(acc, max_nodes)
    if not order:
        raise MedusaError("every head accuracy is 0: no tree can accept anything (train the heads first)")
    cum = 1.0 + np.cumsum([v for _, v in order])  # expected accepted length with the first n nodes
    base = interpolate_cost(profile, 1)
    depth = np.maximum.accumulate([len(p) for p, _ in order])  # of the tree of the first n nodes
    calls = depth if per_depth else np.ones(len(order))
    costs = np.array(
        [interpolate_cost(profile, n + 1) + heads_cost * calls[n - 1] * base for n in range(1, len(order) + 1)]
    )
    speed = cum / (costs / base)
    best = int(np.argmax(speed))
    paths = [list(p) for p, _ in order[: best + 1]]
    return {
        "paths": paths,
        "predicted_accepted_length": float(cum[best]),
        "relative_step_cost": float(costs[best] / base),
        "heads_relative_cost": float(heads_cost),
        "heads_calls_per_step": int(calls[best]),
        "predicted_speedup_vs_plain": float(speed[best]),
        "acceptance_bound": acceptance_bound(acc),
        "by_size": [
            {"nodes": n + 1, "accepted": round(float(cum[n]), 4), "speedup": round(float(speed[n]), 4)}
            for n in range(len(order))
        ],
    }


# ---------------------------------------------------------------------------- cost profile


def read_profile(path: Path) -> tuple[str, dict[int, float]]:
    """(backend, relative cost per token count) of a cost profile file."""
    backend, prof, _ = read_profile_with_heads(path)
    return backend, prof


def read_profile_with_heads(path: Path) -> tuple[str, dict[int, float], float | None]:
    """:func:`read_profile` plus the profile's ``heads_relative_cost`` (None where it has none)."""
    from runtime import checks
    from runtime.dynamic import CostModel

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise MedusaError(f"cost profile {path} cannot be read: {e}") from None
    rc = data.get("relative_cost") if isinstance(data, dict) else None
    if not isinstance(rc, dict) or not rc:
        raise MedusaError(f"cost profile {path}: expected {{'backend': ..., 'relative_cost': {{'1': 1.0, ...}}}}")
    try:
        prof = {int(k): float(v) for k, v in rc.items()}
        heads = data.get("heads_relative_cost")
        heads = None if heads is None else float(heads)
    except (TypeError, ValueError):
        raise MedusaError(f"cost profile {path}: relative_cost keys must be token counts and values numbers") from None
    if any(v <= 0 for v in prof.values()):
        raise MedusaError(f"cost profile {path}: relative costs must be positive")
    CostModel(prof, source=str(path))  # the runtime's rules: finite positive costs, from N = 1
    if heads is not None:
        checks.real(f"cost profile {path}: heads_relative_cost", heads, 0.0)
    return str(data.get("backend", "unknown")), prof, heads


def measure_cost_profile(model, sizes=(1, 2, 4, 8, 16, 24, 32, 48, 64), past: int = 256, repeats: int = 7) -> dict:
    """Relative cost of verifying N tokens with ``past`` cached, PyTorch reference backend.

    Sizes are timed round-robin (``repeats`` rounds, shuffled order each round) so that load
    from other processes spreads over all sizes; the median per size is kept, then made
    non-decreasing (verifying more tokens never costs less; a dip is noise).
    """
    from exporter.torch_backend import TorchBackend

    backend = TorchBackend(model, max_context=past + max(sizes) + 1)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompt = rng.integers(0, vocab, past)
    backend.reset()
    backend.forward(prompt, np.arange(past), np.tril(np.ones((past, past), dtype=bool)))
    backend.commit(np.arange(past))
    inputs = {n: (rng.integers(0, vocab, n), past + np.arange(n), np.tril(np.ones((n, n), dtype=bool))) for n in sizes}
    for n in sizes:  # warm-up
        backend.forward(*inputs[n])
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in rng.permutation(list(sizes)):
            t = time.perf_counter()
            backend.forward(*inputs[int(n)])  # not committed: the cache stays at `past`
            times[int(n)].append(time.perf_counter() - t)
    medians = np.maximum.accumulate([float(np.median(times[n])) for n in sorted(sizes)])
    seconds = dict(zip(sorted(sizes), medians))
    base = seconds[min(sizes)]
    return {
        "backend": "torch-reference (measured by medusa-train select-tree)",
        "past": past,
        "repeats": repeats,
        "seconds": {str(n): round(float(s), 6) for n, s in seconds.items()},
        "relative_cost": {str(n): round(float(s / base), 4) for n, s in seconds.items()},
    }


# ---------------------------------------------------------------------------- command


def calibration_accuracy(
    model, model_folder, heads, data: Path, cache: Path | None, max_rank: int, model_name: str | None = None
) -> np.ndarray:
    """acc[k][r] on the calibration split (hidden-state cache shared with medusa1)."""
    from training.medusa1 import Medusa1Config, load_split, prepare_cache, rank_accuracy

    folder = prepare_cache(model, str(model_folder), Path(data), cache, Medusa1Config.max_len, model_name=model_name)
    calib = load_split(folder, "calib", heads.config.num_heads)
    if not (calib.labels != -100).any():
        raise MedusaError(f"{data}: the calibration split is empty; distill more prompts")
    if getattr(heads.config, "kind", "medusa") == "hydra":  # accuracy given the path above (teacher forcing)
        from training.medusa1 import load_paths

        paths = load_paths(folder, "calib", heads.config.num_heads)
        embed = model.get_input_embeddings().weight.detach()
        return rank_accuracy(heads, model.lm_head, calib, max_rank=max_rank, paths=paths, embed=embed)
    return rank_accuracy(heads, model.lm_head, calib, max_rank=max_rank)


def write_tree(out_dir: Path, name: str, chosen: dict, acc: np.ndarray, profile: dict, source: str) -> Path:
    from runtime.tree import load_tree

    out = Path(out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "paths": chosen["paths"],
        "source": source,
        "description": (
            f"greedy tree for measured head accuracies: {len(chosen['paths'])} nodes, maximizes expected "
            f"accepted tokens / relative step cost on {profile['backend']}"
        ),
        "predicted_accepted_length": round(chosen["predicted_accepted_length"], 4),
        "predicted_speedup_vs_plain": round(chosen["predicted_speedup_vs_plain"], 4),
        "relative_step_cost": round(chosen["relative_step_cost"], 4),
        "heads_calls_per_step": int(chosen["heads_calls_per_step"]),
        "acceptance_bound_any_tree": round(chosen["acceptance_bound"], 4),
        "calibration_accuracy": {"top1": acc[:, 0].round(4).tolist(), "rank_accuracy": acc.round(4).tolist()},
        "cost_profile": profile,
    }
    if chosen.get("head_kind", "medusa") != "medusa":  # Hydra: accuracies given the path, one heads call a depth
        doc["head_kind"] = chosen["head_kind"]
    write_text_atomic(out, json.dumps(doc, indent=1) + "\n")  # a unique temporary name: runs side by side
    load_tree(out)  # the runtime must read what we wrote
    return out


def recorded_accuracy(tree_file: Path) -> tuple[np.ndarray, str]:
    """(acc[k][r], where it was measured) from a tree file that ``select-tree`` wrote."""
    try:
        doc = json.loads(read_text(Path(tree_file)))
        acc = np.asarray(doc["calibration_accuracy"]["rank_accuracy"], dtype=np.float64)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise MedusaError(
            f"{tree_file}: no recorded calibration accuracy to reuse "
            f"(a tree file written by medusa-train select-tree has one): {e}"
        ) from None
    if acc.ndim != 2 or not acc.size or (acc < 0).any() or (acc > 1).any():
        raise MedusaError(
            f"{tree_file}: calibration_accuracy.rank_accuracy must be a [heads, ranks] table of probabilities"
        )
    return acc, str(doc.get("source", tree_file))


def check_name(name) -> str:
    """A tree name: the file OUT_DIR/NAME.json, so no path separator and no ``..`` (it must not
    write outside OUT_DIR)."""
    from runtime import checks

    checks.text("--name", name)
    if not name or "/" in name or "\\" in name or os.sep in name or ".." in name:
        raise MedusaError(
            f"--name must be a plain name (no '/', no '\\', no '..'; the tree is written to OUT_DIR/NAME.json), "
            f"got {name!r}: put the folder in --out-dir"
        )
    return name


def select_tree(cfg: SelectConfig, backbone=None) -> dict:
    from runtime import checks
    from training.files import output_file, output_folder

    check_name(cfg.name)
    checks.integer("--max-nodes", cfg.max_nodes, 1, checks.MAX_TREE_NODES - 1)
    checks.integer("--max-rank", cfg.max_rank, 1)
    checks.real("--heads-cost", cfg.heads_cost, 0.0, optional=True)
    output_folder(cfg.out_dir, "--out-dir")
    target = output_file(Path(cfg.out_dir) / f"{cfg.name}.json", "--out-dir/--name", "the tree file")
    if target.exists() and not cfg.force:  # before minutes of measuring
        raise MedusaError(f"{target} exists: pass --force to replace it (or another --name / --out-dir)")
    profiled = read_profile_with_heads(cfg.profile) if cfg.profile else None  # a bad profile is named first
    if cfg.accuracy_from is not None:
        if cfg.profile is None:
            raise MedusaError("--accuracy-from needs --profile (the engine's cost profile from medusa-run profile)")
        acc, measured = recorded_accuracy(cfg.accuracy_from)
        per_depth = json.loads(Path(cfg.accuracy_from).read_text()).get("head_kind", "medusa") == "hydra"
        acc = acc[:, : cfg.max_rank]
        source = f"medusa-train select-tree --accuracy-from {cfg.accuracy_from} (accuracies of: {measured})"
        model = None
    else:
        import torch

        from exporter.heads import load_heads
        from exporter.models import load_backbone

        if cfg.data is None:
            raise MedusaError("select-tree needs --data (distilled answers) or --accuracy-from TREE_JSON")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model, _, folder = backbone if backbone is not None else load_backbone(cfg.model)
        heads = load_heads(cfg.heads, hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size)
        acc = calibration_accuracy(model, folder, heads, cfg.data, cfg.cache, cfg.max_rank, model_name=cfg.model)
        per_depth = getattr(heads.config, "kind", "medusa") == "hydra"
        source = f"medusa-train select-tree --heads {cfg.heads} --data {cfg.data}"
    heads_cost = cfg.heads_cost
    profile: dict[str, Any]
    if profiled is not None:
        backend, prof, profiled_heads = profiled
        profile = {
            "backend": backend,
            "relative_cost": {str(k): v for k, v in sorted(prof.items())},
            "file": str(cfg.profile),
        }
        if heads_cost is None:
            heads_cost = profiled_heads
    else:
        log.info("no cost profile given: measuring the PyTorch reference backend (256 cached tokens)")
        profile = measure_cost_profile(model)
        prof = {int(k): v for k, v in profile["relative_cost"].items()}
    if heads_cost is None:
        log.warning("the heads' call is not in the cost profile (--heads-cost): counted as free")
        heads_cost = 0.0
    profile["heads_relative_cost"] = heads_cost
    chosen = select(acc, prof, cfg.max_nodes, heads_cost=heads_cost, per_depth=per_depth)
    chosen["head_kind"] = "hydra" if per_depth else "medusa"
    out = write_tree(cfg.out_dir, cfg.name, chosen, acc, profile, source=source)
    print(f"calibration top-1 per head: {acc[:, 0].round(3).tolist()}")
    print(
        f"chose {len(chosen['paths'])} nodes: predicted accepted length {chosen['predicted_accepted_length']:.3f}, "
        f"relative step cost {chosen['relative_step_cost']:.2f}, predicted speedup {chosen['predicted_speedup_vs_plain']:.2f}x"
    )
    print(
        f"no tree over the top-{cfg.max_rank} ranks of these heads can expect more than "
        f"{chosen['acceptance_bound']:.3f} accepted tokens per step (the complete tree)"
    )
    print(f"wrote {out}")
    return {**chosen, "file": str(out), "accuracy": acc}
