"""Paths: where medusa-trt keeps what it builds once per machine (converted models, peer graphs), and
the checks and atomic writes of the files its commands write."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MEDUSA_TRT_CACHE``, else ``~/.cache/medusa-trt``: the project's one cache root."""
    return Path(os.environ.get("MEDUSA_TRT_CACHE", Path.home() / ".cache" / "medusa-trt"))


def check_output_file(flag: str, path: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` as a file a command may write at its end, checked before the work starts: not a
    folder, its folder exists, and (``suffixes``) a name ending in one of them. A ConfigError
    (one line naming ``flag``) otherwise."""
    from runtime.errors import ConfigError

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder: give a file name")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {p}: the folder {p.parent} does not exist")
    if suffixes and p.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} {p}: the name must end in {' or '.join(suffixes)}")
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it, renamed over it
    (removed if the write fails)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
