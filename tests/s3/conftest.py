"""Fixtures for tests against a real S3-compatible server (OpenStack Swift + s3api on loopback).

The server is started once per session by :class:`tests.support.swift.SwiftS3Server`. Without its
binaries (the Debian packages that ``scripts/install-test-services.sh`` installs, as ``make test``
does when it can) every test that needs the server skips, all with one reason that names the
packages. With them, a server that does not start fails those tests with the reason.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from rectflow.storage import StorageSettings
from tests.support.swift import SwiftS3Server, find_binaries

# Variables that would send credentials or requests elsewhere than the test server.
_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@functools.cache
def _swift_missing() -> str | None:
    """Why the Swift S3 server cannot run on this machine (binaries and Debian packages), or None."""
    try:
        find_binaries()
    except RuntimeError as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def swift_binaries() -> dict[str, str]:
    """The Swift and memcached binaries by name; skips the test when any is missing."""
    reason = _swift_missing()
    if reason is not None:
        pytest.skip(reason)
    return find_binaries()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Report every skip for missing Swift binaries at one place, so that ``-ra`` prints its reason
    once (pytest would otherwise give each test its own line with the same long reason)."""
    report = yield
    reason = _swift_missing()
    if (reason is not None and report.skipped and isinstance(report.longrepr, tuple)
            and str(report.longrepr[2]).endswith(reason)):
        report.longrepr = (__file__, _swift_missing.__wrapped__.__code__.co_firstlineno, report.longrepr[2])
    return report


@pytest.fixture(scope="session")
def s3_server(swift_binaries: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftS3Server]:
    """One Swift S3 server for the session; stopped (every process) at the end, even on failure."""
    server = SwiftS3Server(startup_timeout=60)
    try:
        server.start(tmp_path_factory.mktemp("swift"))
    except RuntimeError as e:
        pytest.fail(f"could not start the Swift S3 test server: {e}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS credentials or endpoints from the developer's environment or ~/.aws."""
    for var in (*_AWS_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("RECTFLOW_S3_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_env(aws_isolated: None, s3_server: SwiftS3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment pointed at the test server; returns the variables set."""
    env = s3_server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def bucket(s3_server: SwiftS3Server) -> str:
    """A new, empty bucket for one test."""
    return s3_server.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def settings(s3_env: dict[str, str], s3_server: SwiftS3Server, bucket: str) -> StorageSettings:
    """Settings for ``bucket`` on the test server (a 5 MiB multipart threshold)."""
    return StorageSettings(
        endpoint_url=s3_server.endpoint_url,
        bucket=bucket,
        prefix="runs/test",
        region=s3_server.region,
        multipart_threshold_mb=5,
        multipart_chunk_mb=5,
    )
