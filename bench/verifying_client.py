"""A client that downloads one URL and checks its sha512: the bench's verifying pass-through.

    .venv/bin/python bench/verifying_client.py URL SIZE SHA512

Prints ``<http status> <bytes> <ok|bad>`` and exits 0 only when the body has
SIZE bytes and the expected digest. bench/run.py points it at the plain
pass-through of an origin, in the same rounds as imagecache's miss of that
origin: the least a verifying consumer of a pass-through must do, measured on
the machine as it is at that moment rather than computed from an idle hash
rate.

Built to be the strongest such client we could write in Python, so the
comparison is not flattered: 1 MiB reads into reused buffers (no per-chunk
allocation), and the hash in a thread of its own, up to four buffers behind
the socket, so reading and hashing overlap on the two cores as a fill's do.
(``curl | openssl dgst -sha512`` was measured first and is slower: curl hands
the pipe 16 KiB at a time.)
"""

from __future__ import annotations

import hashlib
import http.client
import queue
import sys
import threading
import urllib.parse

CHUNK = 1 << 20
BUFFERS = 4


def download(url: str) -> tuple[int, int, str]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    conn.request("GET", path)
    resp = conn.getresponse()
    digest = hashlib.sha512()
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(BUFFERS):
        free.put(bytearray(CHUNK))
    full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()

    def hash_thread() -> None:
        while (item := full.get()) is not None:
            buffer, count = item
            digest.update(memoryview(buffer)[:count])
            free.put(buffer)

    hasher = threading.Thread(target=hash_thread)
    hasher.start()
    total = 0
    try:
        while True:
            buffer = free.get()
            count = resp.readinto(memoryview(buffer))
            if not count:
                break
            total += count
            full.put((buffer, count))
    finally:
        full.put(None)
        hasher.join()
        conn.close()
    return resp.status, total, digest.hexdigest()


def main(argv: list[str]) -> int:
    url, size, expected = argv[0], int(argv[1]), argv[2].lower()
    status, total, actual = download(url)
    ok = status == 200 and total == size and actual == expected
    print(f"{status} {total} {'ok' if ok else 'bad'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
