"""The repository scripts run as modules from the repository root (``python -m scripts.NAME``),
without editing ``sys.path``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py") if p.stem != "__init__")


def test_the_scripts_are_a_package_and_edit_no_sys_path():
    assert (ROOT / "scripts" / "__init__.py").is_file()
    assert len(SCRIPTS) >= 10
    edits = [name for name in SCRIPTS if "sys.path" in (ROOT / "scripts" / f"{name}.py").read_text()]
    assert edits == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_as_a_module(name):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", f"scripts.{name}", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_docs_use_the_module_form():
    """README, docs and shell scripts name the scripts as modules (Polygraphy's --data-loader-script
    takes the loader's file path: that is the one file path left)."""
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "scripts").glob("*.sh"),
             *(ROOT / "scripts").glob("*.py")]
    stale = [f"{p.name}: {line.strip()}" for p in texts for line in p.read_text().splitlines()
             if "python scripts/" in line or "python3 scripts/" in line]
    assert stale == []
