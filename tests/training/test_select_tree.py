"""training/select_tree.py: choosing a tree from the heads' accuracy and a cost profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_helpers import tiny_llama

from runtime.errors import MedusaError


def test_tree_is_a_chain_when_only_rank_0_is_ever_right():
    from training.select_tree import select

    acc = np.zeros((4, 10))
    acc[:, 0] = [0.6, 0.4, 0.3, 0.2]
    flat = {1: 1.0, 64: 1.0}  # verification is free: take every useful node
    chosen = select(acc, flat)
    assert chosen["paths"] == [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]
    want = 1 + 0.6 + 0.6 * 0.4 + 0.6 * 0.4 * 0.3 + 0.6 * 0.4 * 0.3 * 0.2
    assert chosen["predicted_accepted_length"] == pytest.approx(want)


def test_tree_widens_when_ranks_spread_and_shrinks_when_verification_costs():
    from training.select_tree import select

    acc = np.zeros((3, 10))
    acc[0, :5] = [0.3, 0.15, 0.1, 0.08, 0.05]
    acc[1, :5] = [0.2, 0.1, 0.08, 0.05, 0.04]
    acc[2, :5] = [0.15, 0.08, 0.05, 0.04, 0.03]
    flat = select(acc, {1: 1.0, 64: 1.0}, max_nodes=20)
    assert len(flat["paths"]) == 20
    assert {p[0] for p in flat["paths"] if len(p) == 1} >= {0, 1, 2, 3}  # several ranks of head 1
    steep = select(acc, {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.8, 16: 2.8, 64: 8.0}, max_nodes=20)
    assert 1 <= len(steep["paths"]) < 20
    # the objective picked is the best over all sizes
    assert steep["predicted_speedup_vs_plain"] == pytest.approx(max(s["speedup"] for s in steep["by_size"]), abs=1e-4)


def test_acceptance_bound_is_the_complete_tree():
    """The bound equals the greedy builder's expected length once every node of every rank is
    in the tree (3 + 9 nodes for 2 heads x 3 ranks), and no smaller tree exceeds it."""
    from training.select_tree import acceptance_bound, select

    acc = np.array([[0.5, 0.2, 0.1], [0.3, 0.25, 0.05]])
    full = select(acc, {1: 1.0, 64: 1.0}, max_nodes=100)
    assert len(full["paths"]) == 12
    assert full["predicted_accepted_length"] == pytest.approx(acceptance_bound(acc))
    assert acceptance_bound(acc) == pytest.approx(1 + 0.8 + 0.8 * 0.6)
    assert full["acceptance_bound"] == pytest.approx(acceptance_bound(acc))
    assert all(s["accepted"] <= acceptance_bound(acc) + 1e-9 for s in full["by_size"])
    assert select(acc, {1: 1.0, 2: 1.5, 64: 20.0})["acceptance_bound"] == pytest.approx(acceptance_bound(acc))


def test_heads_cost_enters_the_step_time():
    """A costly heads call makes every Medusa step dearer: the predicted speedup drops by
    exactly that share, and a tree that gains too little is no longer worth it."""
    from training.select_tree import select

    acc = np.zeros((2, 4))
    acc[0, :2] = [0.3, 0.1]
    acc[1, :2] = [0.2, 0.05]
    prof = {1: 1.0, 2: 1.0, 4: 1.2, 8: 1.5}
    free = select(acc, prof, max_nodes=6)
    paid = select(acc, prof, max_nodes=6, heads_cost=0.2)
    n = len(paid["paths"])
    assert paid["relative_step_cost"] == pytest.approx(np.interp(n + 1, [1, 2, 4, 8], [1.0, 1.0, 1.2, 1.5]) + 0.2)
    assert paid["predicted_speedup_vs_plain"] == pytest.approx(
        paid["predicted_accepted_length"] / paid["relative_step_cost"]
    )
    assert paid["predicted_speedup_vs_plain"] < free["predicted_speedup_vs_plain"]
    assert select(acc, prof, max_nodes=6, heads_cost=0.0)["by_size"] == free["by_size"]
    with pytest.raises(MedusaError, match="heads cost"):
        select(acc, prof, heads_cost=-0.1)


def test_written_tree_loads_in_the_runtime(tmp_path):
    from runtime.tree import load_tree
    from training.select_tree import select, write_tree

    acc = np.zeros((2, 10))
    acc[0, :3] = [0.5, 0.2, 0.1]
    acc[1, :3] = [0.4, 0.2, 0.1]
    prof = {"backend": "test", "relative_cost": {"1": 1.0, "8": 1.2, "64": 3.0}}
    chosen = select(acc, {1: 1.0, 8: 1.2, 64: 3.0})
    path = write_tree(tmp_path, "t", chosen, acc, prof, source="test")
    doc = json.loads(path.read_text())
    assert {"name", "paths", "source", "description", "predicted_accepted_length", "cost_profile"} <= doc.keys()
    assert doc["acceptance_bound_any_tree"] == pytest.approx(1 + 0.8 + 0.8 * 0.7, abs=1e-4)
    assert doc["heads_calls_per_step"] == chosen["heads_calls_per_step"] == 1  # Medusa heads: one call a step
    tree = load_tree(path, num_heads=2)
    assert tree.num_nodes == len(chosen["paths"]) + 1


def test_cost_profile_is_read_and_interpolated(tmp_path):
    from training.select_tree import interpolate_cost, read_profile

    p = tmp_path / "prof.json"
    p.write_text(json.dumps({"backend": "onnxruntime-cpu", "relative_cost": {"1": 1.0, "4": 1.6, "8": 2.0}}))
    backend, prof = read_profile(p)
    assert backend == "onnxruntime-cpu"
    assert interpolate_cost(prof, 6) == pytest.approx(1.8)
    assert interpolate_cost(prof, 12) == pytest.approx(2.4)  # extrapolated from the last two sizes
    p.write_text(json.dumps({"backend": "x"}))
    with pytest.raises(MedusaError, match="relative_cost"):
        read_profile(p)


def test_measured_cost_profile_grows_with_tokens():
    from training.select_tree import measure_cost_profile

    prof = measure_cost_profile(tiny_llama(), sizes=(1, 8, 64), past=16, repeats=3)
    rel = [prof["relative_cost"][k] for k in ("1", "8", "64")]
    assert rel[0] == 1.0 and rel == sorted(rel)  # never cheaper to verify more tokens
    assert all(s > 0 for s in prof["seconds"].values()) and prof["past"] == 16


def test_select_tree_writes_outside_the_source_tree_and_never_over_a_file(tmp_path, repo_root, capsys, monkeypatch):
    """select-tree's default output folder is runs/trees (git-ignored), not tree_configs/; an existing
    tree file is replaced only with --force."""
    from training.cli import main
    from training.select_tree import SelectConfig

    assert SelectConfig().out_dir == Path("runs/trees")
    monkeypatch.chdir(tmp_path)
    argv = [
        "select-tree",
        "--accuracy-from",
        str(repo_root / "tree_configs" / "smollm2_ort_cpu.json"),
        "--profile",
        str(repo_root / "docs" / "results" / "latency_profile.json"),
        "--name",
        "t",
    ]
    assert main(argv) == 0
    out = tmp_path / "runs" / "trees" / "t.json"
    first = out.read_text()
    out.write_text(first + " ")  # an edit the next run must not silently undo
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "t.json exists: pass --force" in err and out.read_text() == first + " "
    assert main([*argv, "--force"]) == 0 and out.read_text() == first
