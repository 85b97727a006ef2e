"""The ``s3`` upstream: images are objects ``<prefix>/<image_id>`` in a bucket.

``s3:bucket/prefix`` (the prefix is optional). The endpoint and region come
from ``s3_endpoint_url`` / ``s3_region`` (for MinIO, Ceph RGW, moto);
credentials come from boto3's own chain (environment, ``~/.aws``, instance
role) and never pass through imagecache's settings or logs.

boto3 is blocking, so every call runs in a worker thread; the body is read in
chunks, one thread hop per chunk. boto3 is an optional extra
(``pip install 'imagecache[s3]'``), imported only when an s3 upstream is built.

Checksums: the object's ``ETag`` is its md5 only for a single-part upload
without SSE-KMS or SSE-C encryption, so it is used only then. User metadata
``x-amz-meta-sha512`` / ``-sha256`` (hex) give the multihash, and
``x-amz-meta-checksum`` / ``-md5`` an md5, for whoever uploads images with
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from imagecache.errors import (
    ConfigurationError,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
)
from imagecache.records import ImageInfo
from imagecache.upstreams.base import ANONYMOUS, BlockingSource, Caller, Upstream, describe_failure
from imagecache.upstreams.config import UpstreamConfig
from imagecache.upstreams.resume import (
    Reply,
    ResumePolicy,
    Validator,
    resumable_stream,
)
from imagecache.upstreams.resume_events import NO_RESUME_EVENTS, ResumeEvents
from imagecache.upstreams.resume_source import ResumingSource

CHUNK_SIZE = 1024 * 1024
_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
_HEX_LENGTHS = {"sha512": 128, "sha256": 64}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_FORBIDDEN = {"401", "403", "AccessDenied", "Forbidden", "InvalidAccessKeyId"}


class S3Upstream(Upstream):
    """Images from an S3 bucket (or anything speaking the S3 API)."""

    kind = "s3"

    def __init__(
        self, target: str, config: UpstreamConfig, resume_events: ResumeEvents = NO_RESUME_EVENTS
    ) -> None:
        bucket, _, prefix = target.partition("/")
        if not bucket:
            raise ConfigurationError(f"s3 upstream {target!r} must look like bucket[/prefix]")
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError as exc:
            raise ConfigurationError(
                "the s3 upstream needs boto3: pip install 'imagecache[s3]'"
            ) from exc
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._boto3 = boto3
        # Transport-level failures (connection, timeouts, short bodies) and
        # urllib3's own errors, which escape from a streaming body's read().
        self._failures: tuple[type[BaseException], ...] = (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
            OSError,
        )
        self._client_error = botocore.exceptions.ClientError
        self._config = botocore.config.Config(
            connect_timeout=config.upstream_timeout,
            read_timeout=config.upstream_timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=32,
        )
        self._resume = ResumePolicy.of(config, resume_events)
        self._endpoint_url = config.s3_endpoint_url
        self._region = config.s3_region
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    def key(self, image_id: str) -> str:
        return f"{self.prefix}/{image_id}" if self.prefix else image_id

    async def _s3(self) -> Any:
        # Building a client loads service models from disk (tens of ms): once,
        # in a thread. Clients are thread-safe; sessions are not, so each
        # upstream has its own session.
        async with self._client_lock:
            if self._client is None:
                self._client = await asyncio.to_thread(self._make_client)
        return self._client

    def _make_client(self) -> Any:
        session = self._boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=self._endpoint_url,
            region_name=self._region,
            config=self._config,
        )

    async def check_reachable(self) -> str:
        client = await self._s3()
        try:
            await asyncio.to_thread(client.head_bucket, Bucket=self.bucket)
        except self._failures as exc:
            raise UpstreamError(f"the s3 bucket {self.bucket!r} cannot be reached: {exc}") from exc
        return f"s3 bucket {self.bucket!r} answers"

    async def info(self, image_id: str, caller: Caller = ANONYMOUS) -> ImageInfo:
        client = await self._s3()
        try:
            head = await asyncio.to_thread(
                client.head_object, Bucket=self.bucket, Key=self.key(image_id)
            )
        except self._failures as exc:
            raise self._translate(image_id, exc) from exc
        metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        algo, value = None, None
        for name in ("sha512", "sha256"):
            digest = str(metadata.get(name, "")).lower()
            if len(digest) == _HEX_LENGTHS[name] and re.fullmatch("[0-9a-f]+", digest):
                algo, value = name, digest
                break
        return ImageInfo(
            image_id=image_id,
            size=head.get("ContentLength"),
            checksum=_md5_of(head, metadata),
            hash_algo=algo,
            hash_value=value,
        )

    async def stream(
        self,
        image_id: str,
        caller: Caller = ANONYMOUS,
        start: int = 0,
        end: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        if end is not None and end <= start:
            return
        client = await self._s3()

        @contextlib.asynccontextmanager
        async def open_part(offset: int, validator: Validator | None) -> AsyncIterator[Reply]:
            answer = await asyncio.to_thread(self._get, client, image_id, offset, end, validator)
            body = answer["Body"]
            try:
                status, headers = _status_headers(answer)
                yield Reply(status, headers, self._chunks(image_id, body))
            finally:
                body.close()

        chunks = resumable_stream(image_id, self._resume, open_part, start, end)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def _chunks(self, image_id: str, body: Any) -> AsyncGenerator[bytes, None]:
        received = 0
        while True:
            try:
                # StreamingBody.read checks Content-Length at the end and
                # raises IncompleteReadError on a short body.
                chunk = await asyncio.to_thread(body.read, CHUNK_SIZE)
            except self._failures as exc:
                raise UpstreamError(
                    f"image {image_id!r}: S3 body failed after {received} bytes: "
                    f"{describe_failure(exc)}"
                ) from exc
            if not chunk:
                return
            received += len(chunk)
            yield chunk

    async def open_source(self, image_id: str, caller: Caller = ANONYMOUS) -> BlockingSource:
        """The whole object, read by the fill pump in its thread (boto3 blocks anyway)."""
        client = await self._s3()
        answer = await asyncio.to_thread(self._get, client, image_id, 0, None, None)
        first = _BodySource(image_id, answer["Body"], self._failures)

        def reopen(offset: int, validator: Validator) -> tuple[int, Mapping[str, str], _BodySource]:
            again = self._get(client, image_id, offset, None, validator)
            source = _BodySource(image_id, again["Body"], self._failures)
            return (*_status_headers(again), source)

        status, headers = _status_headers(answer)
        return ResumingSource.wrap(image_id, self._resume, first, status, headers, reopen)

    def _get(
        self, client: Any, image_id: str, offset: int, end: int | None, validator: Validator | None
    ) -> Any:
        """GET (blocking) the object from ``offset``; a resume when ``validator`` is given.

        S3 takes ``IfMatch`` where HTTP origins take ``If-Range``: an object
        replaced since the first GET answers 412, which the validator refuses.
        """
        request = {"Bucket": self.bucket, "Key": self.key(image_id)}
        if validator is not None:
            request["Range"] = validator.range_value(offset)
            if validator.etag:
                request["IfMatch"] = validator.etag
        elif offset or end is not None:
            request["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
        try:
            return client.get_object(**request)
        except self._failures as exc:
            if validator is None or not isinstance(exc, self._client_error):
                raise self._translate(image_id, exc) from exc
            # An answer, not a failure to get one: the validator judges it
            # (412: the object changed; 5xx: worth another attempt).
            status, headers = _status_headers(exc.response)
            try:
                validator.check(status, headers, offset)
            except UpstreamError as judged:
                raise judged from exc
            raise self._translate(image_id, exc) from exc

    def _translate(self, image_id: str, exc: BaseException) -> UpstreamError:
        if isinstance(exc, self._client_error):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                return UpstreamNotFound(image_id)
            if code in _FORBIDDEN:
                return UpstreamForbidden(image_id, 403 if not code.isdigit() else int(code))
        return UpstreamError(f"image {image_id!r}: S3 request failed: {describe_failure(exc)}")

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None


class _BodySource:
    """A boto3 ``StreamingBody`` as a ``BlockingSource``."""

    def __init__(self, image_id: str, body: Any, failures: tuple[type[BaseException], ...]) -> None:
        self.image_id = image_id
        self.body = body
        self.failures = failures
        self.received = 0

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            # StreamingBody.read checks Content-Length at the end (IncompleteReadError).
            data = self.body.read(len(buffer))
        except self.failures as exc:
            raise UpstreamError(
                f"image {self.image_id!r}: S3 body failed after {self.received} bytes: "
                f"{describe_failure(exc)}"
            ) from exc
        count = len(data)
        buffer[:count] = data
        self.received += count
        return count

    def copy_into(self, fd: int, count: int, /) -> None:
        """No kernel copy from boto3's body: the bytes come through ``readinto``."""

    def interrupt(self) -> None:
        """Left to boto3's read timeout (the upstream timeout): its body offers no safe way
        to wake a read from another thread."""

    def close(self) -> None:
        self.body.close()


def _status_headers(answer: Any) -> tuple[int, Mapping[str, str]]:
    """The HTTP status and (lower-case) headers boto3 keeps of a response."""
    meta = answer.get("ResponseMetadata") or {}
    return int(meta.get("HTTPStatusCode") or 0), meta.get("HTTPHeaders") or {}


def _md5_of(head: dict[str, Any], metadata: dict[str, str]) -> str | None:
    for name in ("checksum", "md5"):
        given = str(metadata.get(name, "")).lower()
        if _MD5_HEX.match(given):
            return given
    etag = str(head.get("ETag", "")).strip('"').lower()
    encrypted = str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or head.get(
        "SSECustomerAlgorithm"
    )
    # A multipart ETag has a "-N" suffix and fails the pattern on its own.
    if _MD5_HEX.match(etag) and not encrypted:
        return etag
    return None
