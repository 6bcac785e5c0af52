"""Write tree_configs/*.json: the 9 official trees, chains and small CPU trees.

    python -m scripts.make_tree_configs [--official ../shared/data/medusa_official_trees.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_SOURCE = "FasterDecoding/Medusa medusa/model/medusa_choices.py (commit e2a5d20), via shared/data/medusa_official_trees.json"

# Small trees for CPUs, where every verified node costs: top-1 chains widened at depth 1
# (head 1 is the most accurate head, so its rank 1-3 pay off first).
CPU_TREES = {
    "cpu_4": ([[0], [1], [0, 0], [0, 0, 0]], "4 nodes: two candidates for head 1, a depth-3 chain"),
    "cpu_8": (
        [[0], [1], [2], [0, 0], [1, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]],
        "8 nodes: top-3 of head 1, top-2 of head 2 under rank 0, chain to depth 4",
    ),
    "cpu_12": (
        [[0], [1], [2], [3], [0, 0], [1, 0], [2, 0], [0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0, 0]],
        "12 nodes: top-4 of head 1, depth 4",
    ),
    "cpu_16": (
        [[0], [1], [2], [3], [0, 0], [1, 0], [2, 0], [0, 1], [0, 2], [1, 1], [0, 0, 0], [1, 0, 0],
         [0, 1, 0], [0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0, 0]],
        "16 nodes: top-4 of head 1, depth 5",
    ),
}


def write(name: str, paths, source: str, description: str = "") -> None:
    doc = {"name": name, "paths": paths, "source": source}
    if description:
        doc["description"] = description
    (ROOT / "tree_configs" / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", default=str(ROOT.parent / "shared" / "data" / "medusa_official_trees.json"))
    args = ap.parse_args()
    for name, paths in json.loads(Path(args.official).read_text()).items():
        write(name, paths, OFFICIAL_SOURCE, "official Medusa tree, 63 nodes plus the root")
    for d in range(1, 6):
        write(f"chain_{d}", [[0] * k for k in range(1, d + 1)], "medusa-trt", f"top-1 chain of depth {d}")
    for name, (paths, desc) in CPU_TREES.items():
        write(name, paths, "medusa-trt (hand-made for CPUs)", desc)


if __name__ == "__main__":
    main()
