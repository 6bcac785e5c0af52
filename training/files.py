"""What medusa-train reads and writes, checked before any work: text files must be UTF-8 (a
bad byte is one line naming the file and the line, not a UnicodeDecodeError traceback), and an
output path must be usable as the kind of thing written there (a file where a folder is wanted,
or a place nothing can be written, is named before minutes of training, not after)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from runtime import paths
from runtime.errors import ConfigError


def text_lines(path: Path):
    """(line number, text) of each line of a UTF-8 file, decoded one line at a time."""
    path = Path(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            yield n, paths.utf8(raw, path, n)


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def output_folder(path: Path, flag: str) -> Path:
    """``path`` where a folder is written (made if missing): refused when it, or the nearest
    existing folder above it, is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder: give a folder to write into (or remove the file)")
    _check_ancestors(path, flag)
    return path


def output_file(path: Path, flag: str, what: str = "a file") -> Path:
    """``path`` where a file is written: refused when it is a folder, or when the nearest existing
    path above it is a file (no folder can be made there)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: give the path of {what} to write")
    _check_ancestors(path, flag)
    return path


def _check_ancestors(path: Path, flag: str) -> None:
    above = _existing_ancestor(path) if not path.exists() else path.parent
    if above.exists() and not above.is_dir():
        raise ConfigError(f"{flag} {path}: {above} is a file, so no folder can be made there")
    _check_writable(path if path.is_dir() else above, path, flag)


def _check_writable(folder: Path, path: Path, flag: str) -> None:
    """A file can be made in ``folder`` (the output folder, or the nearest existing one above the
    output): else one line now, not an OSError traceback after the work."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".medusa-train-probe-", dir=folder)
    except OSError as e:
        raise ConfigError(f"cannot write {flag} {path}: {e.strerror or e} ({folder})") from None
    os.close(fd)
    os.unlink(probe)


def torch_device(name: str, flag: str = "--device"):
    """``name`` as a torch.device that this torch can use: ``cpu``, ``cuda`` or ``cuda:N`` where
    CUDA sees that GPU, ``mps`` where Metal does; anything else is one line naming the flag."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{flag} {name!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{flag} {name}: this torch ({torch.__version__}) sees no CUDA GPU: use --device cpu, or a CUDA build "
                "of torch on a machine with a GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ..)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {name}: this torch sees no Metal (MPS) device: use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{flag} {name}: medusa-train runs on cpu, cuda or mps, not {device.type}")
    return device
