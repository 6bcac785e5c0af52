"""What an export was made from, so that ``medusa-export --if-changed`` can keep an artifact that is
still what the same command would write (``scripts/main.sh`` exports that way: after an update of
medusa-trt, the model, the heads or the datastore, the main job re-exports instead of measuring a
stale artifact).

The recipe (recorded as ``provenance["recipe"]``) holds: a sha256 of medusa-trt's own code that
shapes an artifact (the ``exporter``, ``runtime`` and ``tree_configs`` packages' sources), the
export options, the input files (name, size and modification time of each file of the model
folder, the heads and the datastore: a copy or an edit changes them, and hashing gigabytes of
weights on every run would cost more than it saves), and the versions of the tools that write and
validate the graphs. Two recipes are equal when their ``sha256`` is.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

# options that change how an export runs, not what it writes
RUN_ONLY_OPTIONS = ("force", "validation_threads", "source_model_path")
# environment variables that change what an export writes (exporter/quantize.py: int8/int4 graphs)
ENVIRONMENT = ("MEDUSA_TRT_ACCURACY_LEVEL",)
CODE_PACKAGES = ("exporter", "runtime", "tree_configs")
CODE_SUFFIXES = (".py", ".json", ".jinja")


def code_digest() -> str:
    """sha256 over the source files of medusa-trt's packages that shape an artifact (relative
    path and bytes of each, in sorted order). Shipped heads and datastores are inputs, not code."""
    import importlib

    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        root = Path(importlib.import_module(package).__file__ or "").parent
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in CODE_SUFFIXES
                       and "__pycache__" not in p.parts and "shipped_" not in p.relative_to(root).parts[0])  # fmt: skip
        for p in files:
            h.update(f"{package}/{p.relative_to(root).as_posix()}\0".encode())
            h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def file_stamps(path: str | Path | None) -> list[list[Any]] | None:
    """``[name, bytes, mtime_ns]`` of ``path`` (a file, with the files beside it that share its stem:
    heads saved as ``medusa_heads.safetensors`` keep their settings in ``medusa_heads.json``) or of
    every file under it (a folder; hidden files and folders left out), sorted; None for no path."""
    if path is None:
        return None
    p = Path(path).expanduser().absolute()
    if p.is_file():
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.parent.glob(f"{p.stem}.*"))
                if f.is_file()]  # fmt: skip
    out = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            st = f.stat()
            out.append([rel.as_posix(), st.st_size, st.st_mtime_ns])
    return out


def export_recipe(options, model_folder: str | Path, heads: str | Path | None, extra: dict | None = None) -> dict:
    """The recipe of an export of ``model_folder`` (resolved) with ``heads`` (a file or folder;
    None: fresh heads, described in ``extra``) and ``options`` (ExportOptions, trees resolved)."""
    from exporter.export import _versions

    opts = {k: v for k, v in asdict(options).items() if k not in RUN_ONLY_OPTIONS}
    recipe = {
        "code": code_digest(),
        "options": opts,
        "arguments": extra or {},
        "inputs": {
            "model": str(Path(model_folder).expanduser().resolve()),
            "model_files": file_stamps(model_folder),
            "heads": None if heads is None else str(Path(heads).expanduser().resolve()),
            "heads_files": file_stamps(heads),
            "datastore_files": file_stamps(options.datastore),
            # a tree given as a JSON file: its contents (the option holds only its path)
            "tree_files": {k: _tree_file(getattr(options, k)) for k in ("tree", "sampling_tree")},
        },
        "environment": {k: os.environ.get(k) for k in ENVIRONMENT},
        "versions": _versions(),
    }
    recipe = json.loads(json.dumps(recipe, default=str))  # what the config's JSON will hold (tuples as lists)
    recipe["sha256"] = recipe_digest(recipe)
    return recipe


def _tree_file(tree) -> str | None:
    """The text of the JSON file a tree option names (a shipped tree's name, inline paths: None)."""
    if not isinstance(tree, str) or tree.lstrip().startswith("["):
        return None
    p = Path(tree).expanduser()
    return p.read_text(errors="replace") if p.is_file() else None


def recipe_digest(recipe: dict) -> str:
    body = {k: v for k, v in recipe.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


WHAT = {
    "code": "medusa-trt's code",
    "options": "the export options",
    "arguments": "the heads arguments",
    "environment": "the environment (MEDUSA_TRT_ACCURACY_LEVEL)",
    "versions": "the tool versions",
}
INPUTS = {
    "model": "the model folder",
    "model_files": "the model's files",
    "heads": "the heads",
    "heads_files": "the heads' files",
    "datastore_files": "the datastore",
    "tree_files": "a tree file",
}


def changes(old: dict | None, new: dict) -> list[str]:
    """What differs between an artifact's recorded recipe ``old`` and ``new``, a phrase each
    (empty: the same recipe)."""
    if not isinstance(old, dict) or "sha256" not in old:
        return ["it records no recipe (exported by an older medusa-export, or by export_artifact without one)"]
    if old.get("sha256") == new["sha256"] and recipe_digest(old) == old.get("sha256"):
        return []
    out = [words for key, words in WHAT.items() if old.get(key) != new.get(key)]
    recorded = old.get("inputs")
    old_inputs: dict = recorded if isinstance(recorded, dict) else {}
    out += [words for key, words in INPUTS.items() if old_inputs.get(key) != new["inputs"].get(key)]
    return [f"{words} changed" for words in out] or ["its recorded recipe does not match its digest"]


def why_not_current(out_dir: Path, recipe: dict) -> list[str]:
    """Empty when ``out_dir`` holds an artifact the runtime accepts, its files the sizes recorded,
    made from ``recipe``; else the reasons, in words."""
    from runtime.artifact import CONFIG_FILE, read_artifact
    from runtime.errors import MedusaError

    if not (out_dir / CONFIG_FILE).is_file():
        return [f"it has no {CONFIG_FILE}"]
    try:
        config = read_artifact(out_dir)  # every file there, of the size the export recorded
    except MedusaError as e:
        return [f"the runtime refuses it ({str(e).splitlines()[0]})"]
    return changes(config.provenance.get("recipe"), recipe)
