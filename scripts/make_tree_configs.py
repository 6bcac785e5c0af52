"""Write the tree files of tree_configs/: the 9 official trees, chains and small CPU trees.

    python -m scripts.make_tree_configs [--official ../shared/data/medusa_official_trees.json] [--out-dir DIR]

They go to --out-dir (default runs/tree_configs, git-ignored: compare with `diff -r runs/tree_configs
tree_configs`); existing files are replaced only with --force (`--out-dir tree_configs --force` rewrites
the repository's own).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scripts.common import fail

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_SOURCE = (
    "FasterDecoding/Medusa medusa/model/medusa_choices.py (commit e2a5d20), via shared/data/medusa_official_trees.json"
)

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
        [
            [0],
            [1],
            [2],
            [3],
            [0, 0],
            [1, 0],
            [2, 0],
            [0, 1],
            [0, 2],
            [1, 1],
            [0, 0, 0],
            [1, 0, 0],
            [0, 1, 0],
            [0, 0, 1],
            [0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        "16 nodes: top-4 of head 1, depth 5",
    ),
}


def write(out_dir: Path, name: str, paths, source: str, description: str = "") -> None:
    doc = {"name": name, "paths": paths, "source": source}
    if description:
        doc["description"] = description
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", default=str(ROOT.parent / "shared" / "data" / "medusa_official_trees.json"))
    ap.add_argument("--out-dir", default="runs/tree_configs", help="where the tree files go (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="replace tree files that exist in --out-dir")
    args = ap.parse_args()
    official = json.loads(Path(args.official).read_text())
    names = [*official, *(f"chain_{d}" for d in range(1, 6)), *CPU_TREES]
    out = Path(args.out_dir)
    existing = [n for n in names if (out / f"{n}.json").exists()]
    if existing and not args.force:
        shown = ", ".join(f"{n}.json" for n in existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        fail("make_tree_configs", f"{out} already holds {shown}: pass --force to replace them, or another --out-dir")
    out.mkdir(parents=True, exist_ok=True)
    for name, paths in official.items():
        write(out, name, paths, OFFICIAL_SOURCE, "official Medusa tree, 63 nodes plus the root")
    for d in range(1, 6):
        write(out, f"chain_{d}", [[0] * k for k in range(1, d + 1)], "medusa-trt", f"top-1 chain of depth {d}")
    for name, (paths, desc) in CPU_TREES.items():
        write(out, name, paths, "medusa-trt (hand-made for CPUs)", desc)
    print(f"wrote {len(names)} tree files to {out}")


if __name__ == "__main__":
    main()
