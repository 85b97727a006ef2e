"""Management calls per second with a cold and a warm Keystone validation cache.

    .venv/bin/python bench/keystone_validation.py            # 200 calls each way
    .venv/bin/python bench/keystone_validation.py --calls 500

Starts a real Keystone (``../shared/peers/keystone-peer.sh``, its own data
directory and port) and ``imagecache serve`` with a ``[keystone]`` table in
front of a directory origin, then times ``GET /v2/cache`` as the operator:

- cold: every call with a token the cache has not seen (issued beforehand, so
  issuing is not timed): one Keystone round trip per call;
- warm: the same token every time: one round trip per ``token_cache_ttl``.

It counts the validations Keystone served (``GET /v3/auth/tokens`` lines in its
access log) next to the calls. Loopback only; bounded by ``--calls``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO.parent / "shared" / "peers" / "keystone-peer.sh"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def request(
    port: int, method: str, path: str, headers: dict[str, str], body: object = None
) -> tuple[int, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    payload = None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=payload, headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, response


def token(ks_port: int, values: dict[str, str]) -> str:
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "id": values["KEYSTONE_PEER_USER_OPERATOR_ID"],
                        "password": values["KEYSTONE_PEER_USER_OPERATOR_PASSWORD"],
                    }
                },
            },
            "scope": {"project": {"id": values["KEYSTONE_PEER_PROJECT_ADMIN_ID"]}},
        }
    }
    status, response = request(
        ks_port, "POST", "/v3/auth/tokens", {"Content-Type": "application/json"}, body
    )
    assert status == 201, status
    return str(response.getheader("X-Subject-Token"))


def validations(data: Path) -> int:
    log = data / "log" / "access.log"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if "GET /v3/auth/tokens" in line)


def timed(port: int, tokens: list[str]) -> float:
    started = time.perf_counter()
    for value in tokens:
        status, _ = request(port, "GET", "/v2/cache", {"X-Auth-Token": value})
        assert status == 200, status
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagecache-ks-bench-"))
    ks_port, port = free_port(), free_port()
    env = {
        **os.environ,
        "KEYSTONE_PEER_PORT": str(ks_port),
        "KEYSTONE_PEER_DATA": str(work / "keystone"),
    }
    for step in ("install", "start"):
        done = subprocess.run(
            [str(SCRIPT), step], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(f"keystone-peer.sh {step} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
    server = None
    try:
        demo = subprocess.run(
            [str(SCRIPT), "setup-demo"], env=env, capture_output=True, text=True, check=True
        )
        values = dict(line.split("=", 1) for line in demo.stdout.split() if "=" in line)
        (work / "origin").mkdir()
        serve_env = {
            **os.environ,
            "IMAGECACHE_LOG_LEVEL": "WARNING",
            "IMAGECACHE_KEYSTONE__AUTH_URL": f"http://127.0.0.1:{ks_port}/v3",
            "IMAGECACHE_KEYSTONE__USERNAME": "imagecache",
            "IMAGECACHE_KEYSTONE__PASSWORD": values["KEYSTONE_PEER_USER_IMAGECACHE_PASSWORD"],
            "IMAGECACHE_KEYSTONE__PROJECT_NAME": "service",
            "IMAGECACHE_KEYSTONE__USER_DOMAIN_ID": "default",
            "IMAGECACHE_KEYSTONE__PROJECT_DOMAIN_ID": "default",
        }
        server = subprocess.Popen(
            [
                str(REPO / ".venv" / "bin" / "imagecache"),
                "serve",
                "--port",
                str(port),
                "--cache-dir",
                str(work / "cache"),
                "--upstream",
                f"directory:{work / 'origin'}",
            ],
            env=serve_env,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(port, "GET", "/healthcheck", {})[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "imagecache did not start"
            time.sleep(0.1)
        cold_tokens = [token(ks_port, values) for _ in range(args.calls)]
        warm = token(ks_port, values)
        timed(port, [warm])  # the cache's own token, and this one, validated once
        before = validations(work / "keystone")
        cold = timed(port, cold_tokens)
        middle = validations(work / "keystone")
        hot = timed(port, [warm] * args.calls)
        after = validations(work / "keystone")
        print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("| validation cache | calls | calls/s | Keystone validations |")
        print("| --- | ---: | ---: | ---: |")
        cold_rate = args.calls / cold
        print(
            f"| cold (new token per call) | {args.calls} | {cold_rate:,.0f} | {middle - before} |"
        )
        print(f"| warm (one token) | {args.calls} | {args.calls / hot:,.0f} | {after - middle} |")
        print(f"warm / cold: {cold / hot:.1f}x")
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
