"""The WAN rig's own throughput: does a shaped, delayed link deliver its rate?

    .venv/bin/python bench/wan_rig.py --size-mib 32 --delay-ms 20 --mbit 20,100,0

Runs as root. A ``python -m http.server`` in an origin namespace
(tests/peers/wan.py), the delay relay in front of it (tests/peers/relay.py),
one GET of ``--size-mib`` per rate (0: unshaped) through both, and prints the
time and the rate reached against the rate asked. This is also the way for a
benchmark to use the rig: put tests/ on sys.path and import ``peers.wan`` and
``peers.relay``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from peers.relay import RelayProcess
from peers.wan import WanRig, unavailable_reason

PORT = 8000


def get(port: int) -> int:
    received = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(b"GET /img HTTP/1.0\r\nHost: origin\r\n\r\n")
        while chunk := sock.recv(1024 * 1024):
            received += len(chunk)
    return received


def wait_listening(address: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, PORT), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"http.server did not listen on {address}:{PORT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one way")
    parser.add_argument("--mbit", default="20,100,0", help="rates to try, 0 for unshaped")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"WAN RIG UNAVAILABLE: {reason}")
    with tempfile.TemporaryDirectory(prefix="wan-bench-") as root, WanRig() as rig:
        Path(root, "img").write_bytes(os.urandom(args.size_mib * 1024 * 1024))
        host = rig.add_host("o")
        argv = [sys.executable, "-m", "http.server", "--bind", host.address]
        argv += ["--directory", root, str(PORT)]
        origin = host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(host.address)
            delay = args.delay_ms / 1000
            print(f"{args.size_mib} MiB, one-way delay {args.delay_ms} ms")
            for mbit in (float(word) for word in args.mbit.split(",")):
                host.shape(mbit or None)
                with RelayProcess((host.address, PORT), delay=delay) as relay:
                    started = time.monotonic()
                    size = get(relay.port)
                    elapsed = time.monotonic() - started
                asked = f"{mbit:g} Mbit/s" if mbit else "unshaped"
                print(f"{asked:>14}: {elapsed:6.2f} s, {size * 8 / elapsed / 1e6:8.1f} Mbit/s")
        finally:
            origin.terminate()
            origin.wait(timeout=10)


if __name__ == "__main__":
    main()
