"""Transparent huge pages for the weights a session loads (Linux).

Decoding on the CPU streams every weight once per step: SmolLM2-135M's fp32 graph reads ~550 MB a
token. In 4 KiB pages that is ~140,000 TLB entries a step; in 2 MiB huge pages, ~270. Most kernels
ship with transparent huge pages in ``madvise`` mode (``/sys/kernel/mm/transparent_hugepage/enabled``),
where memory gets huge pages only if the program asks, and ONNX Runtime does not ask. So after a
session is created, :func:`backing` asks for them on the anonymous memory that appeared while it
loaded (its weights, prepacked or not): ``madvise(MADV_HUGEPAGE)`` marks the ranges, and
``madvise(MADV_COLLAPSE)`` (Linux 6.1+) moves the pages already there into huge pages at once
instead of leaving it to ``khugepaged`` (which scans ~16 MB every 10 s), 256 MiB at a time, starting
no chunk after BUDGET_S seconds (a large model's remainder is left marked, for ``khugepaged``). The data and the
results do not change, only where the pages lie.

Measured on this project's 2-core machine (kernel 6.18, THP ``madvise``, SmolLM2-135M fp32 fused
graph, 2 threads, 2026-12-01; ``docs/results/huge_pages``): ``python -m scripts.bench_huge_pages``
(processes alternated, 3 each) plain decoding 1.057x, Medusa 1.026x, load 3.9 s instead of 1.5 s
(the collapse copies ~550 MB: 0.3 to 9 s in this VM, by how fast the host hands out fresh memory); the 16-prompt bench against onnxruntime-genai moved our plain decoding
from 0.92x its plain to 0.96-1.05x (three runs) (and 0.95x when the peer is given huge pages too, ``--peer-huge-pages``:
it gains as much). Resident memory after load and one generate: 660 MB either way. At the median the load cost pays back after about a minute of decoding, so a
short-lived process that generates one answer may prefer it off.

Off with ``MEDUSA_TRT_HUGE_PAGES=0``. Elsewhere (not Linux, THP ``never``, an older kernel without
MADV_COLLAPSE, memory that cannot be collapsed) it does what the kernel allows, at worst nothing, and
never fails a load: the outcome is logged at INFO (``medusa-run -v`` shows it), except when turned off.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("medusa_trt.runtime")

ENV = "MEDUSA_TRT_HUGE_PAGES"
HUGE_SIZE_FILE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"


def _huge_size() -> int:
    try:
        with open(HUGE_SIZE_FILE) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20  # x86-64, and arm64 with 4 KiB base pages


HUGE = _huge_size()  # the size of one transparent huge page (2 MiB on x86-64)
MIN_REGION = 8 * HUGE  # smaller regions are not worth a system call (tiny test graphs, buffers)
# collapsed a chunk at a time, so that the time budget can stop between chunks (each call also drains
# every CPU's page lists, so not too small)
CHUNK = 128 * HUGE
BUDGET_S = 10.0  # per session: no chunk starts after this; the rest stays marked for khugepaged
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


@dataclass
class Backed:
    """What :func:`backing` did: ``mb`` of memory marked for huge pages in ``regions`` ranges, of which
    ``collapsed_mb`` more of the process lies in huge pages once it is done (``AnonHugePages``),
    after ``seconds``;
    ``skipped``: why nothing was done; ``budget_hit``: BUDGET_S ran out before every chunk was
    collapsed (the rest is left to khugepaged)."""

    mb: int = 0
    collapsed_mb: int = 0
    regions: int = 0
    seconds: float = 0.0
    skipped: str | None = None
    budget_hit: bool = False
    collapse_error: str | None = None  # the last MADV_COLLAPSE failure (EINVAL: a kernel before 6.1)


# what backing() did for each file it wrapped, by path (the bench sums ours)
RECORDS: dict[str, Backed] = {}


def enabled() -> bool:
    """Whether huge pages are asked for: on unless ``MEDUSA_TRT_HUGE_PAGES`` is 0 / false / no / off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or None where
    the file is missing (not Linux, no THP)."""
    try:
        with open(THP_MODE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def anonymous_regions(maps_text: str) -> set[tuple[int, int]]:
    """(start, end) of the private, writable, anonymous mappings (and the ``[heap]``) in a
    ``/proc/<pid>/maps`` text: where malloc puts what a session allocates."""
    out = set()
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[1].startswith("rw") or parts[1][3:4] != "p":
            continue
        if len(parts) >= 6 and parts[5] != "[heap]":
            continue  # a file, the stack, vdso...
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.add((lo, hi))
    return out


def new_ranges(before: set[tuple[int, int]], after: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The huge-page-aligned parts of the regions in ``after`` that were not in ``before`` (a region
    that grew or moved counts as new), at least MIN_REGION long, in address order."""
    out = []
    for lo, hi in sorted(after - before):
        a, b = (lo + HUGE - 1) // HUGE * HUGE, hi // HUGE * HUGE
        if b - a >= MIN_REGION:
            out.append((a, b))
    return out


def _read_maps() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


def huge_mb() -> int:
    """MB of this process's anonymous memory in huge pages (``AnonHugePages`` of
    ``/proc/self/smaps_rollup``); 0 where the file is missing."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) >> 10
    except OSError:
        pass
    return 0


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on (glibc, musl)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@contextlib.contextmanager
def backing(what: str, on: bool | None = None, background: bool = False) -> Iterator[Backed]:
    """Around the creation of sessions: afterwards, the anonymous memory that appeared meanwhile
    is backed by huge pages (module docstring). ``on``: None follows ``MEDUSA_TRT_HUGE_PAGES``.
    ``background``: collapse on a daemon thread, for a session opened while others are serving
    (the caller goes on at once; the pages move while it runs). Yields the :class:`Backed` record,
    filled in when the work is done."""
    done = RECORDS[what] = Backed()
    before = None
    if not (enabled() if on is None else on):
        done.skipped = f"{ENV}=0" if on is None else "off"  # asked for: not logged
    else:
        mode = thp_mode() if sys.platform.startswith("linux") else None
        if mode not in ("madvise", "always"):
            _skip(
                what, done, "no transparent huge pages here" if mode is None else f"transparent huge pages are {mode!r}"
            )
        else:
            before = _regions(what, done)
    yield done
    if before is None:
        return
    after = _regions(what, done)
    if after is None:
        return
    ranges = new_ranges(before, after)
    if background:
        threading.Thread(target=_back, args=(what, ranges, done), name="medusa-huge-pages", daemon=True).start()
    else:
        _back(what, ranges, done)


def _skip(what: str, done: Backed, reason: str) -> None:
    done.skipped = reason
    log.info("huge pages for %s: none (%s)", what, reason)


def _regions(what: str, done: Backed) -> set[tuple[int, int]] | None:
    """:func:`anonymous_regions` of this process now; None (and ``done`` skipped) where unreadable."""
    try:
        return anonymous_regions(_read_maps())
    except OSError as e:
        _skip(what, done, f"cannot read /proc/self/maps ({e})")
        return None


def _back(what: str, ranges: list[tuple[int, int]], done: Backed) -> None:
    """Mark ``ranges`` for huge pages and collapse them, CHUNK at a time within BUDGET_S; fills ``done``."""
    t, huge_before = time.perf_counter(), huge_mb()
    try:
        madvise = _madvise()
        marked = []
        for a, b in ranges:
            if madvise(a, b - a, MADV_HUGEPAGE) == 0:
                marked.append((a, b))  # else: not a range the kernel gives huge pages to
        chunks = [(lo, min(b, lo + CHUNK)) for a, b in marked for lo in range(a, b, CHUNK)]
        for lo, hi in chunks:
            # EINVAL before Linux 6.1; EAGAIN (pages busy) is worth one retry; ENOMEM: no free huge pages
            for _ in range(2):
                if time.perf_counter() - t > BUDGET_S:
                    done.budget_hit = True
                    break
                if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
                    break
                err = ctypes.get_errno()
                done.collapse_error = errno.errorcode.get(err, str(err))
                if err != errno.EAGAIN:
                    break
            if done.budget_hit:
                break
        done.regions, done.mb = len(marked), sum(b - a for a, b in marked) >> 20
        # what the process gained: adjacent marked mappings merge, so per-mapping counts would
        # mix in earlier sessions' pages
        done.collapsed_mb = max(0, huge_mb() - huge_before) if marked else 0
    except (OSError, AttributeError) as e:  # no libc / no madvise: nothing more to do
        _skip(what, done, f"madvise unavailable ({e})")
    done.seconds = time.perf_counter() - t
    if done.mb:
        notes = []
        if done.budget_hit:
            notes.append(f"the {BUDGET_S:.0f} s budget ran out: khugepaged does the rest in the background")
        if done.collapse_error and done.collapsed_mb < done.mb:
            notes.append(f"the kernel refused some: {done.collapse_error}")
        log.info(
            "huge pages for %s: %d MB marked, %d MB of it in %d KiB pages after %.1f s%s (%s=0: off)",
            what, done.mb, done.collapsed_mb, HUGE >> 10, done.seconds,
            f" ({'; '.join(notes)})" if notes else "", ENV,
        )  # fmt: skip
