"""Object storage: one small interface over a local folder and an S3-compatible bucket.

(One file of ~650 lines on purpose: the interface, both stores, their settings and the boto3 and
pyarrow plumbing are one unit that is read, tested and changed together.)

The pipeline writes coupling shards, manifests and other artifacts through a :class:`Store`:

* :class:`LocalStore` keeps objects as files under a root folder;
* :class:`S3Store` keeps them in ``s3://BUCKET/PREFIX/KEY`` on AWS S3 or any S3-compatible
  server (MinIO, Ceph, OpenStack Swift's ``s3api``...).

:func:`make_store` picks one from ``params.yaml``'s ``storage`` section and the environment.
Keys are relative, ``/``-separated names (``couplings/round-1/shard-00000.parquet``).

Configuration (:class:`StorageSettings`) comes from ``params.yaml`` overlaid by environment
variables named ``RECTFLOW_S3_<FIELD>`` (``RECTFLOW_S3_ENDPOINT_URL``, ``RECTFLOW_S3_BUCKET``...);
the environment wins. Credentials are never settings: boto3's default chain supplies them
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, shared files, instance roles),
so no ``repr``, log line or error message here can show one.

Every failure is a :class:`StorageError` whose ``str`` is one line naming what is wrong (missing
credentials, unreachable endpoint, missing bucket, missing object) and never a secret.

This module is part of the core library: it imports neither Prefect, MLflow nor DVC, and it
imports boto3 and pyarrow's S3 support only when an S3 store is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

from pydantic import Field, PositiveInt, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rectflow.config import StorageParams
from rectflow.errors import InputError

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = [
    "CREDENTIALS_MESSAGE",
    "LocalStore",
    "ObjectNotFoundError",
    "S3Store",
    "StorageError",
    "StorageSettings",
    "Store",
    "check",
    "make_store",
    "pyarrow_filesystem",
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_CHUNK = MiB  # streaming block size for hashing and copying
_TMP_SUFFIX = ".rectflow-tmp"  # partial files of LocalStore; never listed

CREDENTIALS_MESSAGE = "S3 credentials not found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


class StorageError(InputError, RuntimeError):
    """An object-store operation failed. ``str(err)`` is one line and never contains a secret."""


class ObjectNotFoundError(StorageError):
    """The key does not exist in the store (``str(err)`` names its URL)."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


class StorageSettings(BaseSettings):
    """Where S3 objects live and how to talk to the endpoint; never credentials.

    Construct with :meth:`from_params` to get ``params.yaml`` values overlaid by the environment
    (``RECTFLOW_S3_<FIELD>``, environment wins). Plain ``StorageSettings(**kwargs)`` follows
    pydantic-settings' order instead: keyword arguments win over the environment.
    """

    model_config = SettingsConfigDict(
        env_prefix="RECTFLOW_S3_",
        env_ignore_empty=True,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,  # a mistyped value might be a secret pasted in the wrong place
    )

    endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. http://127.0.0.1:9000; None: AWS (or AWS_ENDPOINT_URL)."
    )
    bucket: str | None = Field(None, description="Bucket name; required by S3Store.")
    prefix: str = Field("rectflow", description="Key prefix inside the bucket ('' for none).")
    region: str = Field("us-east-1", description="Signing region.")
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        "path", description="path: http://host/bucket/key (S3-compatible servers); virtual: bucket.host."
    )
    multipart_threshold_mb: PositiveInt = Field(64, description="Files from this size (MiB) upload in parts.")
    multipart_chunk_mb: int = Field(16, ge=5, description="Part size in MiB (S3 minimum: 5).")
    max_concurrency: PositiveInt = Field(4, description="Parallel part transfers per file.")
    # every wait bounded: finite timeouts (an hour at most) and attempts (#15 kind 8)
    max_attempts: int = Field(3, ge=1, le=100, description="Attempts per request (adaptive retry mode).")
    connect_timeout_s: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False,
                                     description="TCP connect timeout per attempt, seconds.")
    read_timeout_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False,
                                  description="Socket read timeout per attempt, seconds.")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v.strip())
        if "@" in parts.netloc:
            raise ValueError("must not contain credentials; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected http(s)://HOST[:PORT], got {v!r}")
        return v.strip().rstrip("/")

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        if not v or "/" in v or any(c.isspace() for c in v):
            raise ValueError(f"not a bucket name: {v!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip().strip("/")
        if v and any(part in ("", ".", "..") for part in v.split("/")):
            raise ValueError(f"not a valid key prefix: {v!r}")
        return v

    @classmethod
    def from_params(cls, params: StorageParams | None = None) -> StorageSettings:
        """``params`` (``params.yaml``'s ``storage`` section) overlaid by ``RECTFLOW_S3_*`` variables.

        Raises :class:`StorageError` naming the bad setting.
        """
        from pydantic import ValidationError

        base = (params or StorageParams()).model_dump(exclude={"backend"})
        try:
            env_only = cls()
            base.update({name: getattr(env_only, name) for name in env_only.model_fields_set})
            return cls(**base)
        except ValidationError as e:
            first = e.errors()[0]
            name = ".".join(str(p) for p in first["loc"])
            raise StorageError(f"storage setting {name} (or RECTFLOW_S3_{name.upper()}): {first['msg']}") from None

    def object_key(self, key: str) -> str:
        """The full object key: ``PREFIX/KEY`` (``KEY`` when the prefix is empty)."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        """``s3://BUCKET/PREFIX/KEY``."""
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def arrow_path(self, key: str) -> str:
        """``BUCKET/PREFIX/KEY``: the path form :func:`pyarrow_filesystem`'s filesystem expects."""
        return f"{self.bucket}/{self.object_key(key)}"

    def resolved_endpoint(self) -> str | None:
        """The endpoint boto3 will use: the setting, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Store(Protocol):
    """What the pipeline needs from an object store. Keys are relative ``/``-separated names."""

    def put_file(self, local: Path, key: str) -> None:
        """Upload the file ``local`` as ``key`` (replacing it)."""
        ...

    def get_file(self, key: str, local: Path) -> None:
        """Download ``key`` to ``local`` atomically (temporary name, then ``os.replace``)."""
        ...

    def exists(self, key: str) -> bool:
        """True if ``key`` exists."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with ``prefix`` (a string prefix, not only a folder)."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The whole content of ``key``."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` as ``key`` (replacing it)."""
        ...

    def url(self, key: str) -> str:
        """Where ``key`` lives: ``s3://bucket/prefix/key`` or an absolute local path."""
        ...

    def sha256(self, key: str) -> str:
        """Hex SHA-256 of ``key``'s content, streamed (never held whole in memory)."""
        ...

    def check(self) -> None:
        """Verify early that the store is usable; raise :class:`StorageError` naming the problem."""
        ...


def _check_key(key: str, *, allow_prefix: bool = False) -> str:
    """Validate a key (or, with ``allow_prefix``, a listing prefix, which may be '' or end in '/')."""
    if not isinstance(key, str):
        raise StorageError(f"object key must be a string, got {type(key).__name__}")
    if allow_prefix and key == "":
        return key
    body = key[:-1] if allow_prefix and key.endswith("/") else key
    if not body or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"invalid object key {key!r}: expected a relative name like 'a/b.parquet'")
    if any(part in ("", ".", "..") for part in body.split("/")):
        raise StorageError(f"invalid object key {key!r}: empty, '.' or '..' path segment")
    return key


def _sha256_stream(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _replace_atomically(dest: Path) -> Iterator[Path]:
    """Yield a new, empty temporary file next to ``dest``; on success move it onto ``dest``
    (``os.replace``: atomic, same folder), on any failure delete it.

    Created with ``0o666`` minus the umask, as a plain ``open`` would (``mkstemp``'s 0600 would
    carry over to the final file).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------------------------
# Local folder
# --------------------------------------------------------------------------------------------


class LocalStore:
    """Objects as files under ``root`` (``KEY`` is ``root/KEY``); writes are atomic."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file that holds ``key``."""
        return self.root / _check_key(key)

    def _existing(self, key: str) -> Path:
        p = self.path(key)
        if not p.is_file():
            raise ObjectNotFoundError(f"object not found: {p}")
        return p

    def put_file(self, local: Path, key: str) -> None:
        local, dest = Path(local), self.path(key)
        if not local.is_file():
            raise StorageError(f"{local}: local file not found")
        if dest.exists() and os.path.samefile(local, dest):
            return
        with _replace_atomically(dest) as tmp:
            shutil.copyfile(local, tmp)
        log.debug("put %s -> %s", local, dest)

    def get_file(self, key: str, local: Path) -> None:
        src, local = self._existing(key), Path(local)
        if local.exists() and os.path.samefile(src, local):
            return
        with _replace_atomically(local) as tmp:
            shutil.copyfile(src, tmp)
        log.debug("get %s -> %s", src, local)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _check_key(prefix, allow_prefix=True)
        # Walk only the deepest folder the prefix names.
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        if not start.is_dir():
            return []
        keys = []
        for folder, _dirs, files in os.walk(start):
            for name in files:
                if name.endswith(_TMP_SUFFIX):
                    continue
                key = Path(folder, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def read_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        dest = self.path(key)
        with _replace_atomically(dest) as tmp:
            tmp.write_bytes(data)

    def url(self, key: str) -> str:
        return str(self.path(key))

    def sha256(self, key: str) -> str:
        with self._existing(key).open("rb") as f:
            return _sha256_stream(iter(lambda: f.read(_CHUNK), b""))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{self.root}: cannot create the storage folder ({e.strerror})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"{self.root}: storage folder is not writable")


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------


def _scrub(text: str) -> str:
    """``text`` on one line with any credential value from the environment removed (the AWS
    variables, and every secret :func:`rectflow.secrets.redact_text` knows of)."""
    from rectflow.secrets import redact_text

    for var in _SECRET_ENV:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(redact_text(text).split())


def _boto_session() -> Any:
    """A boto3 session on the default credential chain; a missing AWS_PROFILE is a StorageError."""
    import boto3
    from botocore.exceptions import ProfileNotFound

    try:
        return boto3.session.Session()
    except ProfileNotFound as e:
        raise StorageError(
            f"S3 credentials not found: AWS profile {e.kwargs.get('profile')!r} does not exist"
        ) from None


def _resolve_credentials() -> Any:
    """Frozen credentials from boto3's default chain, or :class:`StorageError`."""
    from botocore.exceptions import BotoCoreError

    try:
        creds = _boto_session().get_credentials()
    except BotoCoreError as e:  # broken profile, failed credential_process, SSO expired...
        raise StorageError(f"S3 credentials could not be loaded: {type(e).__name__}") from None
    if creds is None:
        raise StorageError(CREDENTIALS_MESSAGE)
    return creds.get_frozen_credentials()


class S3Store:
    """Objects in ``s3://BUCKET/PREFIX/KEY``; boto3 with bounded adaptive retries.

    The client is made on first use (so construction never touches the network) and the store
    pickles by its settings alone, which lets worker processes rebuild their own client.
    """

    def __init__(self, settings: StorageSettings) -> None:
        if not settings.bucket:
            raise StorageError("S3 bucket not set: set storage.bucket in params.yaml or RECTFLOW_S3_BUCKET")
        self.settings = settings
        self.bucket: str = settings.bucket
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.settings.url('')!r}, endpoint={self.endpoint!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]

    @property
    def endpoint(self) -> str:
        """The endpoint URL requests go to (for messages: any credentials in it blanked)."""
        from rectflow.secrets import redact_url

        if self._client is not None:
            return redact_url(str(self._client.meta.endpoint_url))
        return redact_url(self.settings.resolved_endpoint() or f"https://s3.{self.settings.region}.amazonaws.com")

    @property
    def client(self) -> Any:
        """The boto3 S3 client (made once, thread-safe)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        from botocore.config import Config

        s = self.settings
        options: dict[str, Any] = {
            "region_name": s.region,
            "retries": {"mode": "adaptive", "max_attempts": s.max_attempts},
            "connect_timeout": s.connect_timeout_s,
            "read_timeout": s.read_timeout_s,
            "s3": {"addressing_style": s.addressing_style},
            "max_pool_connections": max(10, s.max_concurrency * 2),
        }
        # S3-compatible servers often reject the aws-chunked uploads newer SDKs use for default
        # checksums (Swift's s3api does). Off AWS, send checksums only where the API requires
        # them, unless the standard AWS_* variables choose otherwise.
        if s.resolved_endpoint():
            if "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ:
                options["request_checksum_calculation"] = "when_required"
            if "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ:
                options["response_checksum_validation"] = "when_required"
        return _boto_session().client("s3", endpoint_url=s.endpoint_url, config=Config(**options))

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(
            multipart_threshold=s.multipart_threshold_mb * MiB,
            multipart_chunksize=s.multipart_chunk_mb * MiB,
            max_concurrency=s.max_concurrency,
            use_threads=True,
        )

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn boto3/botocore exceptions into one-line :class:`StorageError`s without secrets."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            yield
        except StorageError:
            raise
        except (NoCredentialsError, PartialCredentialsError):
            raise StorageError(CREDENTIALS_MESSAGE) from None
        except (BotoConnectionError, HTTPClientError, RetriesExceededError) as e:
            what = self.settings.url(key) if key is not None else f"s3://{self.bucket}"
            raise StorageError(
                f"S3 endpoint {self.endpoint} unreachable after {self.settings.max_attempts} attempts "
                f"while {action} {what} ({type(e).__name__})"
            ) from None
        except (ClientError, S3UploadFailedError) as e:
            if isinstance(e, S3UploadFailedError) and not isinstance(e.__context__, ClientError):
                raise StorageError(f"S3 {action} failed at {self.endpoint}: {_scrub(str(e))}") from None
            err = e if isinstance(e, ClientError) else e.__context__
            assert isinstance(err, ClientError)
            raise self._client_error(err, action, key) from None
        except BotoCoreError as e:
            raise StorageError(f"S3 {action} failed at {self.endpoint}: {_scrub(str(e))}") from None

    def _client_error(self, err: Any, action: str, key: str | None) -> StorageError:
        info = err.response.get("Error", {})
        code = str(info.get("Code", "")) or "?"
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        what = self.settings.url(key) if key is not None else f"s3://{self.bucket}"
        if code == "NoSuchBucket" or (key is None and (code == "404" or status == 404)):
            return StorageError(f"S3 bucket {self.bucket!r} not found at {self.endpoint}")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return ObjectNotFoundError(f"object not found: {what}")
        denied = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden")
        if code in denied or status == 403:
            reason = f"HTTP {code}" if code.isdigit() else code
            return StorageError(
                f"S3 access denied ({reason}) while {action} {what} at {self.endpoint}: check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's permissions"
            )
        return StorageError(f"S3 {action} {what} failed at {self.endpoint}: {code} (HTTP {status})")

    def url(self, key: str) -> str:
        return self.settings.url(_check_key(key)) if key else self.settings.url("")

    def _key(self, key: str) -> str:
        return self.settings.object_key(_check_key(key))

    def put_file(self, local: Path, key: str) -> None:
        local = Path(local)
        if not local.is_file():
            raise StorageError(f"{local}: local file not found")
        with self._errors("uploading", key):
            self.client.upload_file(str(local), self.bucket, self._key(key), Config=self._transfer_config())
        log.debug("put %s -> %s", local, self.url(key))

    def get_file(self, key: str, local: Path) -> None:
        local = Path(local)
        with self._errors("downloading", key), _replace_atomically(local) as tmp:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self._transfer_config())
        log.debug("get %s -> %s", self.url(key), local)

    def exists(self, key: str) -> bool:
        """True if ``key`` exists; a missing bucket also reads False (:meth:`check` tells them apart)."""
        try:
            with self._errors("checking", key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        _check_key(prefix, allow_prefix=True)
        base = self.settings.object_key("")  # "PREFIX/" or ""
        keys: list[str] = []
        with self._errors("listing", prefix or None):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix)
            for page in pages:
                keys.extend(obj["Key"][len(base):] for obj in page.get("Contents", []))
        return sorted(keys)

    def read_bytes(self, key: str) -> bytes:
        with self._errors("reading", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("writing", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(data))

    def sha256(self, key: str) -> str:
        with self._errors("hashing", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                return _sha256_stream(body.iter_chunks(chunk_size=_CHUNK))
            finally:
                body.close()

    def check(self) -> None:
        """``head_bucket``: credentials present and accepted, endpoint reachable, bucket exists."""
        with self._errors("checking bucket"):
            self.client.head_bucket(Bucket=self.bucket)

    def arrow_path(self, key: str) -> str:
        """``BUCKET/PREFIX/KEY`` for the filesystem of :func:`pyarrow_filesystem`."""
        return self.settings.arrow_path(_check_key(key))


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def make_store(storage_params: StorageParams | None, root: Path | str) -> Store:
    """The store for this run.

    :class:`LocalStore` under ``root`` when ``storage.backend`` is ``local``, whatever the
    environment says (where data goes is a param, which DVC versions, never a machine setting);
    :class:`S3Store` on :meth:`StorageSettings.from_params` when it is ``s3``. Touches no network:
    call :func:`check` for that.
    """
    params = storage_params or StorageParams()
    if params.backend == "local":
        return LocalStore(root)
    return S3Store(StorageSettings.from_params(params))


StoreT = TypeVar("StoreT", bound=Store)


def check(store: StoreT) -> StoreT:
    """Verify access early (S3: ``head_bucket``; local: folder writable); return ``store``.

    Raises :class:`StorageError` with one line: missing credentials, unreachable endpoint (after
    the bounded retries), missing bucket, or access denied.
    """
    store.check()
    return store


def pyarrow_filesystem(settings: StorageSettings) -> pyarrow.fs.S3FileSystem:
    """A ``pyarrow.fs.S3FileSystem`` for streaming Parquet reads from the same bucket.

    pyarrow ignores ``AWS_ENDPOINT_URL``, so the endpoint (the setting, else the standard AWS
    variables) goes in ``endpoint_override`` with its scheme. Credentials come from boto3's
    default chain, resolved once here (:class:`StorageError` if there are none). Paths have the
    form ``BUCKET/PREFIX/KEY`` (:meth:`StorageSettings.arrow_path`)::

        fs = pyarrow_filesystem(settings)
        table = pyarrow.parquet.read_table(settings.arrow_path("pairs/shard-0.parquet"), filesystem=fs)
    """
    from pyarrow import fs

    creds = _resolve_credentials()
    kwargs: dict[str, Any] = {
        "access_key": creds.access_key,
        "secret_key": creds.secret_key,
        "session_token": creds.token,
        "region": settings.region,
        "connect_timeout": settings.connect_timeout_s,
        "request_timeout": settings.read_timeout_s,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        "force_virtual_addressing": settings.addressing_style == "virtual",
    }
    endpoint = settings.resolved_endpoint()
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        kwargs["scheme"] = parts.scheme or "https"
    return fs.S3FileSystem(**kwargs)


# ---- a user's data under an S3 prefix -------------------------------------------------------------


def is_s3_url(path: str | Path) -> bool:
    return str(path).startswith("s3://")


def s3_data_objects(url: str, params: StorageParams | None = None) -> tuple[S3Store, list[dict[str, Any]]]:
    """The Parquet objects a data URL names: ``s3://BUCKET/KEY.parquet`` (one object) or
    ``s3://BUCKET/PREFIX`` (every ``.parquet``/``.pq`` object under ``PREFIX/``, sorted by key), each
    ``{"key", "size", "etag"}``; the endpoint and its settings are the storage settings'
    (``storage.*``, ``RECTFLOW_S3_*``), the bucket is the URL's. StorageError when there is none
    (a prefix that does not exist) or the bucket cannot be listed."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{url}: expected s3://BUCKET/PREFIX")
    settings = StorageSettings.from_params(params).model_copy(update={"bucket": bucket, "prefix": ""})
    store = S3Store(settings)
    single = key.lower().endswith((".parquet", ".pq"))
    prefix = key if single or not key or key.endswith("/") else key + "/"
    found: list[dict[str, Any]] = []
    with store._errors("listing", prefix or None):
        for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if (k == key if single else k.lower().endswith((".parquet", ".pq"))):
                    found.append({"key": k, "size": int(obj["Size"]), "etag": str(obj.get("ETag", "")).strip('"')})
    if not found:
        raise StorageError(f"{url}: no Parquet object{' there' if single else 's under this prefix'} (does it exist?)")
    return store, sorted(found, key=lambda o: o["key"])


def mirror_s3_data(url: str, dest: Path, params: StorageParams | None = None) -> Path:
    """Bring the Parquet objects of data URL ``url`` into the folder ``dest`` (one file per object,
    named by its key below the prefix with ``/`` as ``__``), downloading only objects that are new or
    changed (size or ETag) since the last mirror and removing those no longer listed; returns
    ``dest`` (a prefix) or the one file (an object URL). Each file is written under a temporary name
    and renamed, so the folder never holds a partial file."""
    import json

    store, objects = s3_data_objects(url, params)
    _, _, key = url[len("s3://"):].partition("/")
    single = key.lower().endswith((".parquet", ".pq"))
    base = "" if single or not key else (key if key.endswith("/") else key + "/")
    dest.mkdir(parents=True, exist_ok=True)
    index_path = dest / ".index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    wanted = {}
    for obj in objects:
        name = (obj["key"].rsplit("/", 1)[-1] if single else obj["key"][len(base):]).replace("/", "__")
        wanted[name] = obj
        if index.get(name) != {"size": obj["size"], "etag": obj["etag"]} or not (dest / name).is_file():
            with store._errors("downloading", obj["key"]), _replace_atomically(dest / name) as tmp:
                store.client.download_file(store.bucket, obj["key"], str(tmp), Config=store._transfer_config())
    for stale in dest.iterdir():
        if not stale.name.startswith(".") and stale.name not in wanted:
            stale.unlink()
    from rectflow.io import atomic_write_json

    atomic_write_json(index_path, {n: {"size": o["size"], "etag": o["etag"]} for n, o in wanted.items()})
    return dest / next(iter(wanted)) if single else dest
