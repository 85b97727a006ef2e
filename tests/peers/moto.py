"""``s3_server``: moto's S3 server as a subprocess on a free loopback port.

Session-scoped. moto is a real HTTP server speaking the S3 API (the closest
thing to S3 that runs offline); boto3 talks to it over a socket exactly as it
would to AWS. Dummy credentials are put in the environment for the whole
session, and the AWS config files are pointed away so nothing of the machine's
own AWS setup leaks in.

API (``s3 = s3_server``)::

    s3.endpoint_url            # "http://127.0.0.1:PORT" -> Settings(s3_endpoint_url=...)
    s3.region                  # "us-east-1"
    s3.client                  # a boto3 S3 client for arranging test data
    s3.new_bucket() -> name    # a fresh bucket per test keeps tests independent
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from peers import free_port

REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint_url: str
    region: str
    client: Any

    def new_bucket(self) -> str:
        name = f"test-{secrets.token_hex(6)}"
        self.client.create_bucket(Bucket=name)
        return name


def _wait_listening(port: int, process: subprocess.Popen[bytes], within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a condition with a deadline
    raise RuntimeError(f"moto_server not listening on port {port} after {within}s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        import boto3
        import moto.server  # noqa: F401  - only to know the server is installed
    except ImportError as exc:
        pytest.skip(f"S3 PEER UNAVAILABLE: install the dev extra (moto[server], boto3): {exc}")
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        env.setenv("AWS_DEFAULT_REGION", REGION)
        env.setenv("AWS_CONFIG_FILE", str(home / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_listening(port, process, within=30)
            endpoint = f"http://127.0.0.1:{port}"
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=REGION)
            yield S3Server(endpoint_url=endpoint, region=REGION, client=client)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
