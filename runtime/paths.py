"""Where medusa-trt keeps what it builds once per machine (converted models, peer graphs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MEDUSA_TRT_CACHE``, else ``~/.cache/medusa-trt``: the project's one cache root."""
    return Path(os.environ.get("MEDUSA_TRT_CACHE", Path.home() / ".cache" / "medusa-trt"))
