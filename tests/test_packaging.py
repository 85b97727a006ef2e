"""The release artefacts: a wheel and an sdist that install and run outside the checkout."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import aiohttp
import pytest

from imagecache import __version__
from server_helpers import image_bytes, put_image, start_serve

ROOT = Path(__file__).resolve().parent.parent


# pip's words for "the package index cannot be reached" (build and install both need it).
_OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")


def _run(*argv: str | Path, timeout: float = 300) -> str:
    done = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0 and any(word in done.stderr for word in _OFFLINE):
        pytest.skip(f"SKIPPED LOUDLY: the package index is unreachable for {argv[:3]}")
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_version_is_declared_once() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert "\nversion =" not in pyproject
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = [line for line in changelog.splitlines() if line.startswith("## ")]
    assert headings[0] == "## [Unreleased]"
    assert any(line.startswith(f"## [{__version__}] - ") for line in headings), (
        f"CHANGELOG.md has no release heading for {__version__}"
    )


@pytest.mark.timeout(600)
async def test_the_wheel_installs_into_a_fresh_venv_and_serves(tmp_path: Path) -> None:
    """Build with the project's own backend, install the wheel alone, serve one image.

    The fresh venv gets its dependencies from the package index, as an operator's
    would. About 45 s here after `make install`, which leaves every dependency in
    pip's cache; about 65 s with a cold cache.
    """
    dist = tmp_path / "dist"
    await asyncio.to_thread(_run, sys.executable, "-m", "build", "--outdir", dist, ROOT)
    [wheel] = dist.glob("imagecache-*.whl")
    [sdist] = dist.glob("imagecache-*.tar.gz")
    assert wheel.name == f"imagecache-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "imagecache/py.typed" in names
    assert f"imagecache-{__version__}.dist-info/licenses/LICENSE" in names
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    assert {"LICENSE", "CHANGELOG.md", "docs/settings.md", "etc/imagecache.toml"} <= members

    venv = tmp_path / "venv"
    await asyncio.to_thread(_run, sys.executable, "-m", "venv", venv)
    await asyncio.to_thread(_run, venv / "bin" / "pip", "install", "-q", wheel)
    imagecache = venv / "bin" / "imagecache"
    assert (await asyncio.to_thread(_run, imagecache, "--version")).strip() == (
        f"imagecache, version {__version__}"
    )
    # The installed package, not this checkout's.
    where = await asyncio.to_thread(
        _run, venv / "bin" / "python", "-c", "import imagecache; print(imagecache.__file__)"
    )
    assert where.startswith(os.fspath(venv))

    origin = tmp_path / "origin"
    origin.mkdir()
    data = image_bytes(300_000)
    put_image(origin, "cirros.img", data)
    server = await start_serve(
        tmp_path / "cache", f"directory:{origin}", command=[os.fspath(imagecache)]
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # a miss that fills, then a hit
                async with session.get(f"{server.url}/v2/images/cirros.img/file") as response:
                    assert response.status == 200
                    body = await response.read()
                assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    finally:
        assert await server.stop() == 0, server.log()
    assert (tmp_path / "cache" / "cirros.img").read_bytes() == data
