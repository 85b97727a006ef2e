"""The s3 upstream against moto's S3 server: which checksums it trusts, and configuration.

The shared behaviour (info, ranges, resets) is in ``test_upstream_contract.py``.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from collections.abc import AsyncIterator, Callable

import pytest

from imagecache.errors import ConfigurationError, UpstreamNotFound
from imagecache.settings import Settings
from imagecache.upstreams import Upstream, create_upstream
from peers.moto import S3Server

MiB = 1024 * 1024


@pytest.fixture
def s3_settings(s3_server: S3Server, make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region)


@pytest.fixture
async def bucket_root(
    s3_server: S3Server, s3_settings: Settings
) -> AsyncIterator[tuple[str, Upstream]]:
    """A fresh bucket and an upstream reading objects at its root (no prefix)."""
    bucket = s3_server.new_bucket()
    upstream = create_upstream(f"s3:{bucket}", s3_settings)
    yield bucket, upstream
    await upstream.close()


async def test_metadata_digests_are_the_promise(
    s3_server: S3Server, bucket_root: tuple[str, Upstream]
) -> None:
    bucket, upstream = bucket_root
    data = secrets.token_bytes(4096)
    s3_server.client.put_object(
        Bucket=bucket,
        Key="img",
        Body=data,
        Metadata={"sha256": hashlib.sha256(data).hexdigest(), "checksum": "0" * 32},
    )
    info = await upstream.info("img")
    assert (info.hash_algo, info.hash_value) == ("sha256", hashlib.sha256(data).hexdigest())
    # Explicit metadata wins over the ETag.
    assert info.checksum == "0" * 32


async def test_single_part_etag_is_the_md5(
    s3_server: S3Server, bucket_root: tuple[str, Upstream]
) -> None:
    bucket, upstream = bucket_root
    data = secrets.token_bytes(4096)
    s3_server.client.put_object(Bucket=bucket, Key="img", Body=data)
    info = await upstream.info("img")
    assert info.checksum == hashlib.md5(data).hexdigest()
    assert info.hash_algo is None


async def test_multipart_etag_is_not_taken_for_an_md5(
    s3_server: S3Server, bucket_root: tuple[str, Upstream]
) -> None:
    bucket, upstream = bucket_root
    parts = [secrets.token_bytes(5 * MiB), secrets.token_bytes(1000)]
    client = s3_server.client
    upload = client.create_multipart_upload(Bucket=bucket, Key="big")
    done = []
    for number, part in enumerate(parts, start=1):
        answer = client.upload_part(
            Bucket=bucket, Key="big", UploadId=upload["UploadId"], PartNumber=number, Body=part
        )
        done.append({"ETag": answer["ETag"], "PartNumber": number})
    client.complete_multipart_upload(
        Bucket=bucket, Key="big", UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )
    assert "-" in client.head_object(Bucket=bucket, Key="big")["ETag"]
    info = await upstream.info("big")
    assert info.size == sum(map(len, parts))
    assert info.checksum is None
    tail = b"".join([chunk async for chunk in upstream.stream("big", start=5 * MiB - 10)])
    assert tail == (parts[0] + parts[1])[5 * MiB - 10 :]


async def test_missing_bucket_is_not_found(s3_settings: Settings) -> None:
    upstream = create_upstream("s3:no-such-bucket-here/images", s3_settings)
    try:
        with pytest.raises(UpstreamNotFound):
            await upstream.info("img")
    finally:
        await upstream.close()


def test_target_needs_a_bucket(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigurationError, match="bucket"):
        create_upstream("s3:/prefix", make_settings())


def test_missing_boto3_is_a_clear_configuration_error(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes the import fail exactly as if boto3 were absent.
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConfigurationError, match=r"imagecache\[s3\]"):
        create_upstream("s3:bucket", make_settings())
