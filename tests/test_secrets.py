"""Secret settings: refused when empty, blank or short; never matched by a missing one.

The property tests discover the secret settings from the ``Settings`` model
(every ``SecretStr`` field), so a secret added later is covered without
editing this file. The socket tests start real ``imagecache serve`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from imagecache.cluster import CLUSTER_TOKEN_HEADER
from imagecache.errors import ConfigurationError
from imagecache.server.auth import decide_admin
from imagecache.server.cluster import PeerRequest, peer_request
from imagecache.settings import (
    MIN_SECRET_LENGTH,
    Settings,
    load_settings,
    secret_matches,
    secret_settings,
)
from server_helpers import image_bytes, put_image, start_serve

SECRETS = secret_settings()
ADMIN = "admin-token-for-the-socket-tests"
CLUSTER = "cluster-token-for-the-socket-tests"
BLANKS = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003", max_size=40)
# Any header value a client could send, the empty one included.
HEADER_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from(" \t"),
    max_size=64,
)


def test_the_secret_settings_are_discovered_from_the_model() -> None:
    assert set(SECRETS) >= {"admin_token", "cluster_token"}
    for name in SECRETS:
        assert Settings.model_fields[name].default is None  # unset unless configured


@pytest.mark.parametrize("name", SECRETS)
@given(value=BLANKS)
def test_every_secret_setting_refuses_an_empty_or_blank_value(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=name) as caught:
        load_settings(None, **{name: value})
    if value.strip():
        assert value not in str(caught.value)


@pytest.mark.parametrize("name", SECRETS)
@given(value=st.text(min_size=1, max_size=MIN_SECRET_LENGTH - 1).filter(str.strip))
def test_every_secret_setting_refuses_a_value_too_short_to_be_a_secret(
    name: str, value: str
) -> None:
    with pytest.raises(ConfigurationError, match=name) as caught:
        load_settings(None, **{name: value})
    assert f"(got {value!r})" not in str(caught.value)
    assert "<hidden>" in str(caught.value)


@pytest.mark.parametrize("name", SECRETS)
def test_a_blank_secret_from_the_environment_or_the_file_is_refused(
    name: str, tmp_path: Path
) -> None:
    # An unset shell variable expanded to nothing, and an empty TOML string.
    config = tmp_path / "imagecache.toml"
    config.write_text(f'{name} = ""\n')
    with pytest.raises(ConfigurationError, match=name):
        load_settings(config)
    assert load_settings(None, **{name: "x" * MIN_SECRET_LENGTH}) is not None


@given(header=HEADER_VALUES, remote=st.sampled_from(["10.0.0.5", "192.0.2.7", None]))
def test_no_header_value_matches_an_unset_secret(header: str, remote: str | None) -> None:
    assert not secret_matches(None, header)
    assert not secret_matches(SecretStr(""), header)  # even one that bypassed validation
    bare = load_settings(None)
    headers = {"X-Auth-Token": header, CLUSTER_TOKEN_HEADER: header}
    assert not decide_admin(bare, headers, remote).allowed
    assert peer_request(bare, headers) is not PeerRequest.SIBLING
    configured = load_settings(None, admin_token=ADMIN, cluster_token=CLUSTER)
    if header not in (ADMIN, CLUSTER):
        assert not decide_admin(configured, headers, remote).allowed
        assert peer_request(configured, headers) is PeerRequest.REFUSED


def test_an_empty_header_never_matches_even_a_configured_secret() -> None:
    configured = load_settings(None, admin_token=ADMIN, cluster_token=CLUSTER)
    assert not secret_matches(configured.admin_token, "")
    assert not secret_matches(configured.admin_token, None)
    assert secret_matches(configured.admin_token, ADMIN)
    assert peer_request(configured, {CLUSTER_TOKEN_HEADER: ""}) is PeerRequest.REFUSED


# --- real processes and sockets -----------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"), [("IMAGECACHE_ADMIN_TOKEN", ""), ("IMAGECACHE_CLUSTER_TOKEN", "   ")]
)
async def test_a_service_with_an_empty_token_does_not_start(
    variable: str, value: str, tmp_path: Path
) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from imagecache.cli import main; main()",
        "serve",
        "--port",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--upstream",
        f"directory:{origin}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**_environ(), variable: value},
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    text = output.decode()
    assert process.returncode == 1, text
    setting = variable.removeprefix("IMAGECACHE_").lower()
    assert setting in text
    assert "serving on" not in text


def _environ() -> dict[str, str]:
    return {**os.environ, "IMAGECACHE_LOG_LEVEL": "INFO"}


def _own_address() -> str | None:
    """A non-loopback address of this host (traffic to it stays on this host)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as probe:
        try:
            # A UDP connect sends nothing; it only picks the outgoing address.
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


@pytest.fixture
def own_address() -> str:
    address = _own_address()
    if address is None:
        pytest.skip("LOUD SKIP: this host has no non-loopback IPv4 address to call from")
    return address


async def test_no_or_empty_token_is_refused_and_an_empty_cluster_header_is_no_sibling(
    tmp_path: Path, own_address: str
) -> None:
    """From another address: management needs the admin token; an image needs no cluster one."""
    origin = tmp_path / "origin"
    put_image(origin, "img", image_bytes(10_000))
    cache = tmp_path / "cache"
    service = await start_serve(
        cache,
        f"directory:{origin}",
        args=("--host", "0.0.0.0"),  # every address: to be called at own_address
        env={"IMAGECACHE_ADMIN_TOKEN": ADMIN, "IMAGECACHE_CLUSTER_TOKEN": CLUSTER},
    )
    try:
        port = service.url.rsplit(":", 1)[1]
        url = f"http://{own_address}:{port}"
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"X-Auth-Token": ""}, {"X-Auth-Token": " "}):
                for method, path in (("GET", "/v2/cache"), ("DELETE", "/v2/cache")):
                    async with session.request(method, url + path, headers=headers) as response:
                        assert response.status == 403, (method, path, headers)
            async with session.get(url + "/v2/cache", headers={"X-Auth-Token": ADMIN}) as response:
                assert response.status == 200
            # A sibling skips the origin's access check: an empty header must not be one.
            for value in ("", " ", "wrong-but-long-enough-token"):
                async with session.get(
                    f"{url}/v2/images/img/file", headers={CLUSTER_TOKEN_HEADER: value}
                ) as response:
                    assert response.status == 403, repr(value)
            async with session.get(f"{url}/v2/images/img/file") as response:
                assert response.status == 200  # no header at all: an ordinary client
    finally:
        await service.stop()
    assert ADMIN not in service.log()
    assert CLUSTER not in service.log()
