"""An S3 bucket (or an S3-compatible store) as a backup destination.

An artifact is sent as a multipart upload fed straight from the stream: parts of ``part_size``
bytes, one being uploaded while the next fills, so memory stays near two parts whatever the
artifact's size. The object appears only when the upload is completed; on any failure or
cancellation the upload is aborted. An artifact smaller than one part is sent with one
``put_object``. boto3 is blocking, so every call runs in a small executor of this destination's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import boto3  # type: ignore[import-untyped]  # boto3 and botocore ship no type information
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    EndpointResolutionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from services.backup.base import CHUNK, BackupError, Partial, Stored, manifest_key
from services.backup.codec import close_stream
from services.backup.directory import check_key
from services.clients import ThreadedClient, aws_error_code, public_endpoint
from services.failures import network_problem

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 << 20  # S3 refuses smaller parts, except the last
_MANIFEST_SUFFIX = manifest_key("")
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}
_T = TypeVar("_T")


class S3Destination:
    """Backups as objects under ``s3://bucket/prefix/``."""

    kind = "s3"

    def __init__(
        self,
        name: str,
        bucket: str,
        *,
        prefix: str = "",
        region: str | None = None,
        endpoint_url: str | None = None,
        part_size: int = 8 << 20,
        timeout: float = 30.0,
        client: Any = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's smallest part)")
        self.name = name
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self._region = region
        self._endpoint_url = endpoint_url
        self._endpoint = public_endpoint(endpoint_url)
        self._timeout = timeout
        # One part uploading, a listing or a read, and an abort must never wait behind each other.
        self._boto = ThreadedClient(self._make_client, threads=4, name=f"s3-{name}", client=client)

    # -- plumbing ---------------------------------------------------------------------------

    def _object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def location(self, key: str) -> str:
        """``s3://bucket/prefix/key``."""
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def _make_client(self) -> Any:
        options: dict[str, Any] = {
            "connect_timeout": self._timeout,
            "read_timeout": self._timeout,
            "retries": {"max_attempts": 3, "mode": "standard"},
        }
        if self._endpoint_url:
            # S3-compatible stores (MinIO, Ceph, R2...) want path-style URLs and often reject the
            # newer default checksum headers.
            options["s3"] = {"addressing_style": "path"}
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        # A session of its own: boto3's default session is not safe to share between threads.
        session = boto3.session.Session()
        return session.client("s3", region_name=self._region, endpoint_url=self._endpoint_url, config=Config(**options))

    async def _get_client(self) -> Any:
        try:
            return await self._boto.get()
        except ValueError:
            raise BackupError(f"The S3 endpoint of destination {self.name} is not a valid URL.") from None
        except BotoCoreError as exc:
            raise self._failure(exc, f"Connecting to destination {self.name}") from exc

    async def _run(self, action: str, func: Callable[[], _T]) -> _T:
        """Run one blocking boto3 call in the executor; botocore errors become a BackupError."""
        try:
            return await self._boto.call(func)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure(exc, action) from exc

    def _failure(self, exc: BaseException, action: str) -> BackupError:
        return BackupError(f"{action} failed: {self._reason(exc)}.")

    def _reason(self, exc: BaseException) -> str:
        """A plain phrase for a botocore error; never its raw text (which may hold URLs)."""
        where = self._endpoint or "S3"
        if isinstance(exc, ClientError):
            code = aws_error_code(exc)
            if code == "NoSuchBucket":
                return f"the bucket {self.bucket} does not exist"
            if code == "NoSuchUpload":
                return "the multipart upload was aborted or expired"
            if code in _MISSING:
                return "there is no such object"
            if code in _DENIED:
                return f"access denied (check the bot's permissions on bucket {self.bucket})"
            if code in _BAD_CREDENTIALS:
                return f"the AWS credentials were rejected ({code})"
            return f"S3 answered {code or 'an unknown error'}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return "no usable AWS credentials were found (environment, profile or instance role)"
        if isinstance(exc, ConnectTimeoutError):
            return f"connecting to {where} timed out after {self._timeout:g} s"
        if isinstance(exc, ReadTimeoutError):
            return f"{where} did not answer within {self._timeout:g} s"
        if isinstance(exc, EndpointResolutionError):
            return f"the endpoint URL {where} is not usable (a plain scheme://host:port is expected)"
        if isinstance(exc, EndpointConnectionError):
            problem = network_problem(exc)
            return f"could not connect to {where}" + (f" ({problem})" if problem else "")
        problem = network_problem(exc)
        return f"{problem} talking to {where}" if problem else f"{type(exc).__name__} talking to {where}"

    # -- the Destination protocol -----------------------------------------------------------------

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> Stored:
        """Upload the chunks (see the module docstring); the sha256 goes into the object's metadata
        for a single-request upload and into its ``sha256`` tag for a multipart one (S3 cannot add
        metadata to a completed multipart upload without copying the whole object)."""
        object_key = self._object_key(key)
        action = f"Writing {self.location(key)}"
        digest = hashlib.sha256()
        buffer = bytearray()
        size = 0
        upload: _MultipartUpload | None = None
        try:
            client = await self._get_client()
            async for chunk in chunks:
                buffer += chunk
                size += len(chunk)
                while len(buffer) >= self.part_size:
                    with memoryview(buffer) as view:
                        part = bytes(view[: self.part_size])
                    del buffer[: self.part_size]
                    if upload is None:
                        upload = _MultipartUpload(self, client, object_key, action, digest)
                        await upload.start()
                    await upload.send(part)
            if upload is None:
                body = bytes(buffer)
                buffer.clear()
                digest.update(body)
                metadata = {"sha256": digest.hexdigest()}
                await self._run(
                    action,
                    lambda: client.put_object(Bucket=self.bucket, Key=object_key, Body=body, Metadata=metadata),
                )
            else:
                if buffer:
                    await upload.send(bytes(buffer))
                    buffer.clear()
                await upload.complete()
                upload = None  # complete: nothing to abort any more
        except BaseException:
            if upload is not None:
                await upload.abort()
            await close_stream(chunks)
            raise
        return Stored(key=key, size=size, sha256=digest.hexdigest())

    async def put_manifest(self, key: str, data: bytes) -> None:
        """One ``put_object``: atomic by nature."""
        object_key = self._object_key(manifest_key(key))
        client = await self._get_client()
        await self._run(
            f"Writing the manifest of {self.location(key)}",
            lambda: client.put_object(Bucket=self.bucket, Key=object_key, Body=data, ContentType="application/json"),
        )

    async def read(self, key: str) -> AsyncIterator[bytes]:
        """The object streamed in chunks of CHUNK; BackupError if it does not exist."""
        object_key = self._object_key(key)
        action = f"Reading {self.location(key)}"
        client = await self._get_client()
        response = await self._run(action, lambda: client.get_object(Bucket=self.bucket, Key=object_key))
        body = response["Body"]
        loop = asyncio.get_running_loop()
        pending: concurrent.futures.Future[bytes] | None = None
        try:
            while True:
                pending = self._boto.executor.submit(body.read, CHUNK)
                try:
                    chunk = await asyncio.wrap_future(pending, loop=loop)
                except (ClientError, BotoCoreError) as exc:
                    raise self._failure(exc, action) from exc
                if not chunk:
                    break
                yield chunk
        finally:
            # Close the body only once no thread is reading it (a cancelled read may still run).
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _: body.close())
            else:
                body.close()

    async def read_manifest(self, key: str) -> bytes | None:
        """The manifest of ``key``, or None if there is none."""
        object_key = self._object_key(manifest_key(key))
        client = await self._get_client()

        def fetch() -> bytes | None:
            try:
                response = client.get_object(Bucket=self.bucket, Key=object_key)
            except ClientError as exc:
                if aws_error_code(exc) in _MISSING:
                    return None
                raise
            with contextlib.closing(response["Body"]) as body:
                return bytes(body.read())

        return await self._run(f"Reading the manifest of {self.location(key)}", fetch)

    async def delete(self, key: str) -> None:
        """Delete the object and its manifest in one request; missing ones are fine."""
        keys = [self._object_key(key), self._object_key(manifest_key(key))]
        action = f"Deleting {self.location(key)}"
        client = await self._get_client()
        response = await self._run(
            action,
            lambda: client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            ),
        )
        errors = [e for e in response.get("Errors", []) if e.get("Code") not in _MISSING]
        if errors:
            raise BackupError(f"{action} failed: S3 answered {errors[0].get('Code', 'an error')}.")

    async def keys(self, prefix: str) -> list[str]:
        """Complete objects whose key starts with ``prefix``, sorted; manifests left out (S3 never
        lists an unfinished multipart upload as an object)."""
        check_key(prefix, prefix=True)
        base = f"{self.prefix}/" if self.prefix else ""
        client = await self._get_client()

        def listing() -> list[str]:
            found: list[str] = []
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for item in page.get("Contents", []):
                    name = str(item["Key"])
                    if not name.endswith(_MANIFEST_SUFFIX):
                        found.append(name[len(base) :])
            return sorted(found)

        return await self._run(f"Listing s3://{self.bucket}/{base}{prefix}", listing)

    async def partials(self, prefix: str) -> list[Partial]:
        """Multipart uploads in progress under ``prefix``; their time is when the newest part
        arrived (or the upload began, before its first part)."""
        check_key(prefix, prefix=True)
        base = f"{self.prefix}/" if self.prefix else ""
        client = await self._get_client()

        def last_activity(name: str, upload_id: str, initiated: datetime) -> datetime | None:
            newest = initiated
            try:
                for page in client.get_paginator("list_parts").paginate(
                    Bucket=self.bucket, Key=name, UploadId=upload_id
                ):
                    for part in page.get("Parts", []):
                        newest = max(newest, part["LastModified"])
            except ClientError as exc:
                if aws_error_code(exc) == "NoSuchUpload":  # completed or aborted just now
                    return None
                raise
            return newest.astimezone(UTC)

        def listing() -> list[Partial]:
            found: list[Partial] = []
            paginator = client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for upload in page.get("Uploads", []):
                    name, upload_id = str(upload["Key"]), str(upload["UploadId"])
                    modified = last_activity(name, upload_id, upload["Initiated"])
                    if modified is not None:
                        where = f"multipart upload {upload_id[:16]}… of s3://{self.bucket}/{name}"
                        found.append(Partial(name[len(base) :], upload_id, where, modified))
            return sorted(found, key=lambda p: (p.key, p.ref))

        return await self._run(f"Listing the uploads in progress in s3://{self.bucket}/{base}{prefix}", listing)

    async def remove_partial(self, partial: Partial) -> None:
        """Abort one multipart upload, so its parts stop costing money."""
        object_key = self._object_key(partial.key)
        client = await self._get_client()

        def abort() -> None:
            try:
                client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=partial.ref)
            except ClientError as exc:
                if aws_error_code(exc) != "NoSuchUpload":
                    raise

        await self._run(f"Aborting the {partial.location}", abort)

    async def close(self) -> None:
        """Close the client we made (its connection pool) and stop the executor."""
        await self._boto.close()


class _MultipartUpload:
    """One multipart upload in progress: at most one part in flight while the caller fills the next.

    Every boto3 call runs in the destination's executor as a concurrent future kept here, so
    ``abort`` can wait for whatever a cancelled caller left running before it cleans up.
    """

    def __init__(self, dest: S3Destination, client: Any, object_key: str, action: str, digest: Any) -> None:
        self._dest = dest
        self._client = client
        self._bucket = dest.bucket
        self._key = object_key
        self._action = action
        self._digest = digest
        self._id: str | None = None
        self._created: concurrent.futures.Future[str] | None = None
        self._parts: list[dict[str, Any]] = []
        self._in_flight: concurrent.futures.Future[dict[str, Any]] | None = None
        self._completion: concurrent.futures.Future[None] | None = None

    async def _wait(self, future: concurrent.futures.Future[_T]) -> _T:
        try:
            return await asyncio.wrap_future(future)
        except (ClientError, BotoCoreError) as exc:
            raise self._dest._failure(exc, self._action) from exc

    async def start(self) -> None:
        client, bucket, key = self._client, self._bucket, self._key

        def create() -> str:
            return str(client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])

        self._created = self._dest._boto.executor.submit(create)
        self._id = await self._wait(self._created)

    async def send(self, data: bytes) -> None:
        """Wait for the part in flight, then start uploading this one. Parts are hashed in the
        executor, in order, since each starts only after the one before has finished."""
        await self._settle()
        number = len(self._parts) + 1
        client, bucket, key, upload_id, digest = self._client, self._bucket, self._key, self._id, self._digest

        def upload_part() -> dict[str, Any]:
            digest.update(data)
            response = client.upload_part(Bucket=bucket, Key=key, PartNumber=number, UploadId=upload_id, Body=data)
            return {"PartNumber": number, "ETag": response["ETag"]}

        self._in_flight = self._dest._boto.executor.submit(upload_part)

    async def _settle(self) -> None:
        if self._in_flight is not None:
            self._parts.append(await self._wait(self._in_flight))
            self._in_flight = None

    async def complete(self) -> None:
        """Complete the upload (the object appears), then tag it with its sha256."""
        await self._settle()
        client, bucket, key, upload_id = self._client, self._bucket, self._key, self._id
        parts = list(self._parts)
        tagging = {"TagSet": [{"Key": "sha256", "Value": self._digest.hexdigest()}]}

        def finish() -> None:
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            # Best effort: some S3-compatible stores lack tagging, and the manifest has the digest.
            try:
                client.put_object_tagging(Bucket=bucket, Key=key, Tagging=tagging)
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not tag s3://%s/%s with its sha256: %s", bucket, key, self._dest._reason(exc))

        self._completion = self._dest._boto.executor.submit(finish)
        await self._wait(self._completion)

    async def abort(self) -> None:
        """Leave nothing behind: abort the upload so no parts linger (and cost money), or delete the
        object if the caller was cancelled while its completion went through anyway.

        Runs to its end in the executor even if the caller is cancelled again, and first waits for
        whatever is still running there: S3 may keep a part that finishes after the abort.
        """
        created, in_flight, completion = self._created, self._in_flight, self._completion
        client, bucket, key = self._client, self._bucket, self._key
        for future in (created, in_flight, completion):
            # A call still queued never runs; only running ones are waited for below, so aborts
            # blocking workers can't wait on calls stuck in the queue behind them.
            if future is not None:
                future.cancel()

        def clean_up() -> None:
            if created is None:
                return
            try:
                upload_id = created.result()
            except BaseException:  # never created: nothing to abort
                return
            if in_flight is not None:
                concurrent.futures.wait([in_flight])
            if completion is not None:
                concurrent.futures.wait([completion])
                if not completion.cancelled() and completion.exception() is None:
                    client.delete_object(Bucket=bucket, Key=key)
                    return
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

        loop = asyncio.get_running_loop()
        try:
            await asyncio.shield(loop.run_in_executor(self._dest._boto.executor, clean_up))
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not abort the upload of s3://%s/%s: %s", bucket, key, self._dest._reason(exc))
