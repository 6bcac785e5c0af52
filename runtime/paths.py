"""Paths: where medusa-trt keeps what it builds once per machine (converted models, peer graphs), the
reading of the text files its commands are given (UTF-8, or one line naming the file, the line and the
byte), and the checks and atomic writes of the files its commands write."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def cache_dir() -> Path:
    """``$MEDUSA_TRT_CACHE``, else ``~/.cache/medusa-trt``: the project's one cache root."""
    return Path(os.environ.get("MEDUSA_TRT_CACHE", Path.home() / ".cache" / "medusa-trt"))


def utf8(raw: bytes, path: str | os.PathLike, line: int | None = None, error: type[Exception] | None = None) -> str:
    """``raw`` (a whole file, or its line ``line``) decoded as UTF-8 (a leading UTF-8 byte-order
    mark is dropped); ``error`` (a ConfigError by default) naming the file, the line and the byte
    otherwise, instead of a UnicodeDecodeError traceback."""
    sig = line in (None, 1)
    try:
        return raw.decode("utf-8-sig" if sig else "utf-8")
    except UnicodeDecodeError as e:
        from runtime.errors import ConfigError

        # utf-8-sig counts from after the byte-order mark it dropped
        start = e.start + (3 if sig and raw.startswith(b"\xef\xbb\xbf") else 0)
        at = line if line is not None else raw.count(b"\n", 0, start) + 1
        bom = sig and raw.startswith((b"\xff\xfe", b"\xfe\xff"))
        hint = " (it starts with a UTF-16 byte-order mark)" if bom else ""
        raise (error or ConfigError)(
            f"{path}: line {at} is not UTF-8 text (byte {raw[start]:#04x}){hint}: save the file as UTF-8"
        ) from None


def read_text(path: str | os.PathLike, error: type[Exception] | None = None) -> str:
    """A whole text file as UTF-8 (:func:`utf8`); with ``error``, a file that cannot be read (no
    permission, a name too long) is that error too."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        if error is None:
            raise
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    return utf8(data, path, error=error)


def read_json_object(path: str | os.PathLike, error: type[Exception], hint: str = "") -> dict:
    """The JSON object a file holds; ``error`` naming the file (and ``hint``, what to do) where it is
    not valid UTF-8 JSON or holds another JSON value."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}{hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, found a {type(data).__name__}{hint}")
    return data


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # what a matplotlib figure saves as (save_figure)


def not_a_file(path: str | os.PathLike, missing: str = "does not exist") -> str:
    """Why ``path``, which is not a file, cannot be read: a folder, or ``missing``."""
    return "is a folder, not a file" if os.path.isdir(Path(path).expanduser()) else missing


def check_output_file(flag: str, path: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` as a file a command may write at its end, checked before the work starts: not a
    folder, its folder exists and takes a new file (what :func:`atomic_file` writes first), and
    (``suffixes``) a name ending in one of them. A ConfigError (one line naming ``flag``) otherwise,
    not a traceback after the work."""
    from runtime.errors import ConfigError

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder: give a file name")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {p}: the folder {p.parent} does not exist")
    if suffixes and p.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} {p}: the name must end in {' or '.join(suffixes)}")
    try:
        fd, probe = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".probe")
    except OSError as e:
        raise ConfigError(f"{flag} {p}: cannot write in {p.parent} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (a unique name) for a writer that takes a path (safetensors,
    a savefig): renamed over ``path`` when the block ends, so its content appears whole or not at
    all, removed if the block fails. The file keeps the mode of the one it replaces (a new one: the
    umask's default). A failure of the file itself (a folder that takes no file, a full disk) is
    one MedusaError line, not a traceback at the end of the work."""
    from runtime.errors import MedusaError

    path = Path(path)
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise MedusaError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # the file's own failures (a full disk: no file name; the rename: the temporary's), not another file's
        if isinstance(e, OSError) and e.filename in (None, tmp, str(path), path):
            raise MedusaError(f"cannot write {path}: {e.strerror or e}") from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """A file object whose content appears at ``path`` whole or not at all (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
        yield f


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure saved whole or not at all (:func:`atomic_file`), in the format its
    suffix names (:data:`PLOT_SUFFIXES`)."""
    path = Path(path)
    with atomic_file(path, binary=True) as f:
        fig.savefig(f, dpi=dpi, format=path.suffix.lstrip(".").lower())
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)
