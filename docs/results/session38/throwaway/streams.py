"""The client threads both of session 38's in-process stream probes drive (streams_stats.py, streams_screen_ab.py;
session 37's streams_in_process.py, kept as it ran, has the same loop)."""

import threading
import time


def run_streams(gen, chats, clients: int, count: int, first: int = 0, medusa: bool = True):
    """``clients`` threads each take the next of ``count`` requests (request i: ``chats[i % len(chats)]``, i from
    ``first``) until none is left, and stream its 128-token answer from ``gen``. Returns ``[(chat index, tokens)]`` in
    the order they finished, and the wall seconds."""
    done: list[tuple[int, list[int]]] = []
    nxt, lock = [first], threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = nxt[0]
                if i >= first + count:
                    return
                nxt[0] += 1
            got = [t for ev in gen.stream(chats[i % len(chats)], max_new_tokens=128, medusa=medusa) for t in ev.tokens]
            with lock:
                done.append((i % len(chats), got))

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return done, time.perf_counter() - t
