"""Tree configurations shipped with medusa-trt: one JSON file per tree.

Each file holds ``name``, ``paths`` (official ``medusa_choices`` meaning: ``[i, j]`` is
rank i of head 1, then rank j of head 2), ``source`` and optionally ``description`` and
``predicted_accepted_length``. Load one with ``runtime.tree.load_tree(name)``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def available() -> list[str]:
    """Names of all shipped trees."""
    return sorted(p.stem for p in _folder().glob("*.json"))


def path_of(name: str) -> Path:
    return _folder() / f"{name}.json"
