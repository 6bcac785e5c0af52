"""runtime.hugepages: which memory it asks huge pages for, its switch, and that it never fails a load."""

import mmap
import sys

import numpy as np
import pytest

from runtime import hugepages
from runtime.hugepages import HUGE, MIN_REGION, anonymous_regions, backing, new_ranges

MAPS = """\
55d0c0000000-55d0c0021000 r-xp 00000000 08:01 123 /usr/bin/python3
55d0c1000000-55d0c9000000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
7f0004000000-7f0004100000 rw-p 00000000 00:00 0
7f0010000000-7f0018000000 rw-s 00000000 00:05 77 /dev/shm/x
7f0020000000-7f0028000000 r--p 00000000 08:01 99 /work/model.onnx.data
7f0030000000-7f0038000000 rw-p 00000000 08:01 98 /work/cache.bin
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
"""


def _small_pages(n: int, fill: bytes) -> mmap.mmap:
    """``n`` bytes of new private anonymous memory, what malloc maps for a large allocation (an mmap
    of its own: a bytearray may reuse memory malloc already holds, which is then no new region, and
    numpy would ask for huge pages itself), ``fill`` written one byte a 4 KiB page: every page
    exists, in small pages."""
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[::4096] = fill
    return buf


def test_only_private_writable_anonymous_memory_and_the_heap_are_candidates():
    regions = anonymous_regions(MAPS)
    assert regions == {
        (0x55D0C1000000, 0x55D0C9000000),  # [heap]
        (0x7F0000000000, 0x7F0004000000),  # anonymous, 64 MiB
        (0x7F0004000000, 0x7F0004100000),  # anonymous, 1 MiB
    }  # not: code, shared memory, file mappings (the .data file), the stack


def test_new_ranges_are_the_aligned_parts_of_regions_that_appeared():
    before = {(0x7F0000000000, 0x7F0004000000)}
    grown_heap = (0x55D0C1000000, 0x55D0C9000000)
    unaligned = (0x7F1000000000 + 4096, 0x7F1000000000 + 4096 + 20 * HUGE)
    small = (0x7F2000000000, 0x7F2000000000 + MIN_REGION - HUGE)
    after = before | {grown_heap, unaligned, small}
    got = new_ranges(before, after)
    assert got == [
        grown_heap,  # already aligned
        (0x7F1000000000 + HUGE, 0x7F1000000000 + 20 * HUGE),  # the partial huge pages at both ends left out
    ]  # the region that existed before and the one below MIN_REGION are left alone
    assert all(a % HUGE == 0 and b % HUGE == 0 for a, b in got)


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("FALSE", False), ("1", True), ("", True)])
def test_the_environment_switch(monkeypatch, value, on):
    monkeypatch.setenv(hugepages.ENV, value)
    assert hugepages.enabled() is on
    with backing("x") as done:
        pass
    assert (done.skipped == f"{hugepages.ENV}=0") is (not on)


def test_nothing_is_done_where_the_kernel_has_no_huge_pages(monkeypatch):
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "never")
    with backing("x", on=True) as done:
        pass
    assert done.skipped == "transparent huge pages are 'never'" and done.mb == 0


def test_a_failing_madvise_never_fails_the_load(monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("backing reads /proc/self/maps: Linux only")
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")  # whatever this host's THP mode

    def broken():
        raise OSError("no libc here")

    monkeypatch.setattr(hugepages, "_madvise", broken)
    with backing("x", on=True) as done:
        keep = np.ones(40 * HUGE // 8)  # noqa: F841  (a new region while the block runs)
    assert done.skipped.startswith("madvise unavailable") and done.mb == 0


def test_memory_allocated_inside_the_block_is_backed_by_huge_pages():
    """On this Linux machine (THP in madvise mode): 80 MiB mapped inside the block is marked, and the
    kernel moves it into huge pages; its contents are unchanged."""
    if hugepages.thp_mode() != "madvise":
        pytest.skip("transparent huge pages are not in madvise mode on this machine")
    n = 40 * HUGE
    tries = []  # under load (the other test worker) the kernel may find the pages busy: up to 3 fresh buffers
    for _ in range(3):
        with backing("test buffer", on=True) as done:
            buf = _small_pages(n, bytes(range(256)) * (n // 4096 // 256))
        assert done.skipped is None and done.regions >= 1 and done.mb >= 64
        if done.collapse_error == "EINVAL" and done.collapsed_mb == 0:
            pytest.skip("this kernel cannot collapse (EINVAL: before Linux 6.1)")
        tries.append((done.collapsed_mb, done.collapse_error, round(done.seconds, 2)))
        if done.collapsed_mb >= 32:  # what AnonHugePages gained, not what was asked
            break
    if all(mb == 0 and err == "ENOMEM" for mb, err, _ in tries):
        pytest.skip("no free huge pages on this machine now (ENOMEM)")
    assert done.collapsed_mb >= 32, f"(MB collapsed, error, seconds) per try: {tries}"
    assert hugepages.RECORDS["test buffer"] is done
    assert buf[4096 * 7] == 7 and buf[4096 * 7 + 1] == 0 and buf[-4096] == (n // 4096 - 1) % 256


def test_the_time_budget_stops_collapsing_and_leaves_the_rest_marked(monkeypatch):
    if hugepages.thp_mode() != "madvise":
        pytest.skip("transparent huge pages are not in madvise mode on this machine")
    calls = []
    real = hugepages._madvise()

    def counting(addr, length, advice):
        calls.append((advice, length))
        return real(addr, length, advice)

    monkeypatch.setattr(hugepages, "_madvise", lambda: counting)
    monkeypatch.setattr(hugepages, "BUDGET_S", 0.0)  # out of time before the first chunk
    n = 40 * HUGE
    with backing("budget", on=True) as done:
        buf = _small_pages(n, b"\x01" * (n // 4096))
    assert done.budget_hit and done.mb >= 64
    assert [a for a, _ in calls] == [hugepages.MADV_HUGEPAGE] * done.regions  # marked, never collapsed
    monkeypatch.setattr(hugepages, "BUDGET_S", 60.0)
    monkeypatch.setattr(hugepages, "CHUNK", 8 * HUGE)
    calls.clear()
    with backing("in chunks", on=True) as done:
        buf2 = _small_pages(n, b"\x02" * (n // 4096))
    collapses = [length for a, length in calls if a == hugepages.MADV_COLLAPSE]
    assert not done.budget_hit and len(collapses) >= 2 and max(collapses) <= hugepages.CHUNK
    assert buf[4096] == 1 and buf2[-4096] == 2


def test_a_background_collapse_fills_the_record_later():
    if hugepages.thp_mode() != "madvise":
        pytest.skip("transparent huge pages are not in madvise mode on this machine")
    import time

    n = 40 * HUGE
    with backing("background", on=True, background=True) as done:
        buf = _small_pages(n, b"\x03" * (n // 4096))
    deadline = time.time() + 30
    while done.seconds == 0.0 and time.time() < deadline:  # the thread sets seconds last
        time.sleep(0.01)
    assert done.mb >= 64 and done.seconds > 0
    assert buf[4096 * 5] == 3


def test_the_utf8_error_names_the_line_and_byte_after_a_byte_order_mark(tmp_path):
    from runtime.errors import ConfigError
    from runtime.paths import utf8

    with pytest.raises(ConfigError, match=r"f.jsonl: line 2 is not UTF-8 text \(byte 0xff\)"):
        utf8(b"\xef\xbb\xbfab\n\xffc", "f.jsonl")
    assert utf8(b"\xef\xbb\xbfab", "f") == "ab"
