"""Tree buffers against an independent port of the official ``generate_medusa_buffers``.

The reference below is a line-by-line numpy transcription of FasterDecoding/Medusa
``medusa/model/utils.py::generate_medusa_buffers`` (commit e2a5d20), including its global
``TOPK = 10`` tree indices and its ``-2 + 1 = -1`` padding. It shares no code with
``runtime.tree``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import tree_configs
from runtime.errors import TreeError
from runtime.tree import PAD, Tree, build_tree, chain, load_tree, validate_paths

OFFICIAL_NAMES = [
    "mc_sim_7b_63",
    "vicuna_7b_stage1",
    "vicuna_7b_stage2",
    "vicuna_7b_stage1_ablation",
    "vicuna_13b_stage1",
    "vicuna_13b_stage2",
    "vicuna_33b_stage1",
    "vicuna_33b_stage2",
    "zephyr_stage2",
]
OFFICIAL_TOPK = 10


def official_buffers(medusa_choices):
    """numpy port of the official generate_medusa_buffers (same loops, same quirks)."""
    sorted_choices = sorted(medusa_choices, key=lambda x: (len(x), x))
    medusa_len = len(sorted_choices) + 1

    depth_counts = []
    prev_depth = 0
    for path in sorted_choices:
        depth = len(path)
        if depth != prev_depth:
            depth_counts.append(0)
        depth_counts[depth - 1] += 1
        prev_depth = depth

    attn_mask = np.eye(medusa_len, medusa_len)
    attn_mask[:, 0] = 1
    start = 0
    for i in range(len(depth_counts)):
        for j in range(depth_counts[i]):
            cur = sorted_choices[start + j]
            if len(cur) == 1:
                continue
            ancestor_idx = [sorted_choices.index(cur[: c + 1]) + 1 for c in range(len(cur) - 1)]
            attn_mask[j + start + 1, ancestor_idx] = 1
        start += depth_counts[i]

    tree_indices = np.zeros(medusa_len, dtype=np.int64)
    start = 0
    for i in range(len(depth_counts)):
        for j in range(depth_counts[i]):
            tree_indices[start + j + 1] = sorted_choices[start + j][-1] + OFFICIAL_TOPK * i + 1
        start += depth_counts[i]

    position_ids = np.zeros(medusa_len, dtype=np.int64)
    start = 0
    for i in range(len(depth_counts)):
        position_ids[start + 1 : start + depth_counts[i] + 1] = i + 1
        start += depth_counts[i]

    nest, seen = [], []
    for i in range(len(sorted_choices)):
        cur = sorted_choices[-i - 1]
        if cur in seen:
            continue
        row = []
        for c in range(len(cur)):
            row.append(sorted_choices.index(cur[: c + 1]))
            seen.append(cur[: c + 1])
        nest.append(row)
    max_length = max(len(x) for x in nest)
    retrieve = np.array([r + [-2] * (max_length - len(r)) for r in nest], dtype=np.int64) + 1
    retrieve = np.concatenate([np.zeros((len(retrieve), 1), dtype=np.int64), retrieve], axis=1)
    return {
        "attn_mask": attn_mask,
        "tree_indices": tree_indices,
        "position_ids": position_ids,
        "retrieve_indices": retrieve,
        "sorted_choices": sorted_choices,
    }


def _rows(retrieve, pad) -> set[tuple[int, ...]]:
    return {tuple(int(x) for x in row if x != pad) for row in retrieve}


@pytest.fixture(scope="module")
def official_trees(shared_data) -> dict:
    return json.loads((shared_data / "medusa_official_trees.json").read_text())


def test_the_nine_official_trees_are_shipped(official_trees):
    assert sorted(official_trees) == sorted(OFFICIAL_NAMES)
    for name in OFFICIAL_NAMES:
        doc = json.loads(tree_configs.path_of(name).read_text())
        assert doc["name"] == name
        assert doc["paths"] == official_trees[name], f"tree_configs/{name}.json differs from the official tree"
        assert "source" in doc and "Medusa" in doc["source"]


@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_buffers_match_official(name, official_trees):
    ref = official_buffers(official_trees[name])
    tree = load_tree(name)
    n = len(official_trees[name]) + 1
    assert tree.num_nodes == n == 64

    assert tree.attn_mask.dtype == bool and tree.attn_mask.shape == (n, n)
    np.testing.assert_array_equal(tree.attn_mask, ref["attn_mask"].astype(bool))
    assert np.issubdtype(tree.position_ids.dtype, np.integer)
    np.testing.assert_array_equal(tree.position_ids, ref["position_ids"])

    # Same node order: node i+1 carries the official sorted path i.
    assert [list(p) for p in tree.paths] == ref["sorted_choices"]
    # Official tree_indices = rank + TOPK * depth_index + 1: the same (head, rank) per node.
    off = ref["tree_indices"][1:] - 1
    np.testing.assert_array_equal(tree.node_head[1:], off // OFFICIAL_TOPK)
    np.testing.assert_array_equal(tree.node_rank[1:], off % OFFICIAL_TOPK)

    # The official pads with -2 + 1 = -1 and orders rows differently: compare the row sets.
    ours = _rows(tree.retrieve_indices, PAD)
    assert ours == _rows(ref["retrieve_indices"], -1)
    assert len(ours) == len(tree.retrieve_indices), "duplicate retrieve rows"
    assert tree.retrieve_indices.shape == ref["retrieve_indices"].shape


@pytest.mark.parametrize("name", tree_configs.available())
def test_buffer_invariants(name):
    tree = load_tree(name)
    paths = [list(p) for p in tree.paths]
    n = tree.num_nodes
    assert n == len(paths) + 1

    # topk per head = the largest rank the tree uses at that depth + 1 (no global TOPK)
    depth = max(len(p) for p in paths)
    expected_topk = tuple(max(p[-1] for p in paths if len(p) == d) + 1 for d in range(1, depth + 1))
    assert tree.topk == expected_topk
    assert tree.depth == depth

    # node i carries the last element of its path, from head len(path)-1; the root carries none
    assert tree.node_head[0] == -1 and tree.node_rank[0] == -1 and tree.parent[0] == -1
    for i, p in enumerate(paths, start=1):
        assert tree.node_head[i] == len(p) - 1
        assert tree.node_rank[i] == p[-1]
        assert tree.position_ids[i] == len(p)
        parent = tree.parent[i]
        assert paths[parent - 1] == p[:-1] if len(p) > 1 else parent == 0
        # a node sees exactly the root, its ancestors and itself
        visible = {j for j in range(n) if tree.attn_mask[i, j]}
        assert visible == {0} | {paths.index(p[:k]) + 1 for k in range(1, len(p) + 1)}
    assert tree.attn_mask[0].tolist() == [True] + [False] * (n - 1)

    # PAD can never be mistaken for a node index, and comes only after a row's real entries
    assert PAD < 0 and PAD not in range(n)
    ri = tree.retrieve_indices
    real = ri != PAD
    assert np.all((ri[real] >= 0) & (ri[real] < n))
    np.testing.assert_array_equal(real.sum(axis=1), tree.path_lengths)
    for row, length in zip(ri, tree.path_lengths):
        assert np.all(row[length:] == PAD) and np.all(row[:length] != PAD)
        assert row[0] == 0
    # one row per leaf: every node on exactly the leaf paths below it, and leaves are what no path extends
    leaves = [p for p in paths if not any(len(q) == len(p) + 1 and q[:-1] == p for q in paths)]
    assert sorted(tuple(int(x) for x in row[1:l]) for row, l in zip(ri, tree.path_lengths)) == sorted(
        tuple(paths.index(p[:k]) + 1 for k in range(1, len(p) + 1)) for p in leaves
    )


def test_chains_and_cpu_trees_are_shipped():
    names = tree_configs.available()
    for d in range(1, 6):
        tree = load_tree(f"chain_{d}")
        assert [list(p) for p in tree.paths] == chain(d) == [[0] * k for k in range(1, d + 1)]
        assert tree.topk == (1,) * d and tree.retrieve_indices.shape == (1, d + 1)
    cpu = [load_tree(n) for n in names if n.startswith("cpu_")]
    assert len(cpu) >= 2
    for tree in cpu:
        assert 4 <= tree.num_nodes - 1 <= 16, tree
    for name in names:
        doc = json.loads(tree_configs.path_of(name).read_text())
        assert {"name", "paths", "source"} <= set(doc), f"{name}.json lacks name/paths/source"


def test_one_node_tree():
    tree = build_tree([[0]])
    assert tree.num_nodes == 2 and tree.topk == (1,)
    np.testing.assert_array_equal(tree.attn_mask, [[True, False], [True, True]])
    np.testing.assert_array_equal(tree.retrieve_indices, [[0, 1]])


def test_path_order_does_not_matter():
    paths = json.loads(tree_configs.path_of("cpu_8").read_text())["paths"]
    a, b = build_tree(paths), build_tree(list(reversed(paths)))
    for field in ("attn_mask", "position_ids", "node_head", "node_rank", "parent"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert _rows(a.retrieve_indices, PAD) == _rows(b.retrieve_indices, PAD)


# ---------------------------------------------------------------------------- validation

BAD_TREES = [
    pytest.param([[0], [1, 0]], None, r"path \[1, 0\].*prefix \[1\] is missing", id="not-prefix-closed"),
    pytest.param([[0], [0, 0], [0, 1, 0, 0]], None, r"path \[0, 1, 0, 0\]", id="gap-in-depth"),
    pytest.param([[0], [0, -1]], None, r"path \[0, -1\] has a negative rank", id="negative-rank"),
    pytest.param([[0], [1], [0, 0], [1]], None, r"path \[1\] appears more than once", id="duplicate"),
    pytest.param([[0], [0.5]], None, r"path \[0\.5\].*not an integer", id="non-integer-float"),
    pytest.param([[0], ["1"]], None, r"path \['1'\].*not an integer", id="non-integer-str"),
    pytest.param([[0], [True]], None, r"path \[True\].*not an integer", id="non-integer-bool"),
    pytest.param([], None, r"non-empty list of paths", id="empty-tree"),
    pytest.param([[0], []], None, r"path \[\] is not a non-empty list", id="empty-path"),
    pytest.param([[0], 3], None, r"path 3 is not a non-empty list", id="path-not-a-list"),
    pytest.param(
        [[0], [0, 0], [0, 0, 0]], 2, r"path \[0, 0, 0\].*needs 3 Medusa heads.*has 2", id="too-deep-for-model"
    ),
]


@pytest.mark.parametrize("paths, num_heads, match", BAD_TREES)
def test_bad_tree_raises_tree_error(paths, num_heads, match):
    with pytest.raises(TreeError, match=match):
        build_tree(paths, num_heads=num_heads)
    with pytest.raises(TreeError, match=match):  # the same through load_tree
        load_tree(paths, num_heads=num_heads)


def test_gap_in_depth_names_the_path_and_the_gap():
    # A gap always leaves some path without its parent; the message names the gap too.
    with pytest.raises(TreeError, match=r"path \[0, 0, 0\].*depth 2"):
        validate_paths([[0], [0, 0, 0]])


def test_bad_tree_file_is_named(tmp_path):
    bad = tmp_path / "wide.json"
    bad.write_text(json.dumps({"name": "wide", "paths": [[0], [2, 0]], "source": "test"}))
    with pytest.raises(TreeError, match=r"wide: path \[2, 0\]"):
        load_tree(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TreeError, match=r"broken\.json is not valid JSON"):
        load_tree(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"name": "x"}))
    with pytest.raises(TreeError, match=r"wrong\.json must hold"):
        load_tree(wrong)
    with pytest.raises(TreeError, match=r"missing\.json does not exist"):
        load_tree(tmp_path / "missing.json")
    with pytest.raises(TreeError, match=r"unknown tree 'no_such_tree'.*cpu_8"):
        load_tree("no_such_tree")


def test_too_deep_for_model_through_every_entry_point():
    with pytest.raises(TreeError, match=r"needs 4 Medusa heads, but the model has 3"):
        load_tree("cpu_8", num_heads=3)
    with pytest.raises(TreeError, match=r"needs 5 Medusa heads, but the model has 4"):
        load_tree(load_tree("chain_5"), num_heads=4)
    assert load_tree("chain_5", num_heads=5).depth == 5


# ---------------------------------------------------------------------------- loading


def test_load_tree_by_name_file_and_list(tmp_path):
    paths = [[0], [1], [0, 0]]
    by_list = load_tree(paths)
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"name": "mine", "paths": paths, "source": "test"}))
    by_file = load_tree(f)
    by_str = load_tree(str(f))
    bare = tmp_path / "bare.json"  # a bare list of paths is accepted too
    bare.write_text(json.dumps(paths))
    by_bare = load_tree(bare)
    for t in (by_list, by_file, by_str, by_bare):
        assert isinstance(t, Tree) and t.paths == ((0,), (1,), (0, 0))
        np.testing.assert_array_equal(t.attn_mask, by_list.attn_mask)
    assert by_file.name == "mine" and by_bare.name == "bare"

    by_name = load_tree("mc_sim_7b_63")
    assert by_name.name == "mc_sim_7b_63" and by_name.num_nodes == 64
    assert load_tree(by_name) is by_name


def test_tree_configs_json_in_wheel(tmp_path, repo_root):
    """A plain (non-editable) install carries tree_configs/*.json: build the wheel and look."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (repo_root / name).is_file():
            shutil.copy(repo_root / name, src / name)
    for pkg in ("exporter", "runtime", "training", "tree_configs"):
        if (repo_root / pkg).is_dir():
            shutil.copytree(repo_root / pkg, src / pkg, ignore=ignore)
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("medusa_trt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"tree_configs/{p.name}" for p in (repo_root / "tree_configs").glob("*.json")}
    assert len(shipped) >= 18
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    assert {"runtime/tree.py", "runtime/decode.py", "exporter/heads.py", "tree_configs/__init__.py"} <= names

    # installed from the wheel (no checkout on the path), trees load by name
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (
        "import tree_configs, runtime.tree as t; "
        "print(tree_configs.__file__); print(len(tree_configs.available())); print(t.load_tree('cpu_8').num_nodes)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    where, count, nodes = proc.stdout.split()
    assert where.startswith(str(target)) and int(count) == len(shipped) and int(nodes) == 9
