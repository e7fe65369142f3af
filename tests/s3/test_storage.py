"""rectflow.storage against a real S3-compatible server (Swift + s3api on loopback), plus DVC and
MLflow talking to the same endpoint."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rectflow.config import StorageParams
from rectflow.storage import (
    CREDENTIALS_MESSAGE,
    LocalStore,
    ObjectNotFoundError,
    S3Store,
    StorageError,
    StorageSettings,
    Store,
    check,
    make_store,
    pyarrow_filesystem,
)
from tests.support.swift import SwiftS3Server, find_binaries

MiB = 1024 * 1024
# Distinctive fake credentials: any appearance in a message or repr is a leak.
FAKE_KEY_ID = "AKIARECTFLOWLEAKCHECK"
FAKE_SECRET = "rectflow-Secret-Must-Not-Leak-0123456789"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def _closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def closed_port() -> Iterator[int]:
    yield from _closed_port()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same contract for both implementations."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return check(S3Store(request.getfixturevalue("settings")))


# --- the Store contract ---------------------------------------------------------------------


def test_roundtrip_large_file_multipart(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(random.Random(0).randbytes(12 * MiB + 12345))
    key = "couplings/round-1/big.bin"

    assert not store.exists(key)
    store.put_file(src, key)
    assert store.exists(key)
    assert store.list("couplings/") == [key]
    assert store.list("couplings/round-1/b") == [key]
    assert store.list("couplings/round-2") == []
    assert store.sha256(key) == _sha256_file(src)

    out = tmp_path / "down" / "big.bin"
    store.get_file(key, out)
    assert _sha256_file(out) == _sha256_file(src)
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.bin"]  # no temporary left

    if isinstance(store, S3Store):
        assert store.url(key) == f"s3://{store.bucket}/runs/test/{key}"
        head = store.client.head_object(Bucket=store.bucket, Key=f"runs/test/{key}")
        assert head["ContentLength"] == src.stat().st_size
        assert head["ETag"].strip('"').endswith("-3"), "12 MiB with 5 MiB parts must upload in 3 parts"
    else:
        assert store.url(key) == str(tmp_path / "store" / key)


def test_small_objects_and_missing_keys(store: Store, tmp_path: Path) -> None:
    store.write_bytes("a/manifest.json", b'{"rows": 3}')
    store.write_bytes("a/b/c.txt", b"x")
    store.write_bytes("ab.txt", b"y")
    assert store.read_bytes("a/manifest.json") == b'{"rows": 3}'
    assert store.sha256("a/b/c.txt") == hashlib.sha256(b"x").hexdigest()
    assert store.list() == ["a/b/c.txt", "a/manifest.json", "ab.txt"]
    assert store.list("a/") == ["a/b/c.txt", "a/manifest.json"]
    assert store.list("a") == ["a/b/c.txt", "a/manifest.json", "ab.txt"]
    store.write_bytes("ab.txt", b"replaced")
    assert store.read_bytes("ab.txt") == b"replaced"

    assert not store.exists("nope.txt")
    with pytest.raises(ObjectNotFoundError, match=r"nope\.txt"):
        store.read_bytes("nope.txt")
    with pytest.raises(ObjectNotFoundError, match=r"nope\.txt"):
        store.get_file("nope.txt", tmp_path / "out" / "nope.txt")
    assert not (tmp_path / "out" / "nope.txt").exists()
    assert [p for p in (tmp_path / "out").glob("*")] == []  # failed download leaves nothing
    with pytest.raises(StorageError, match="local file not found"):
        store.put_file(tmp_path / "missing.bin", "x")
    for bad in ("/abs", "../up", "a//b", "a/./b", ""):
        with pytest.raises(StorageError, match="invalid object key"):
            store.write_bytes(bad, b"z")


def test_s3store_pickles_without_client(settings: StorageSettings) -> None:
    store = check(S3Store(settings))
    store.write_bytes("p.txt", b"pickled")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_bytes("p.txt") == b"pickled"


# --- Parquet through pyarrow's S3 filesystem --------------------------------------------------


def test_parquet_put_then_stream_with_pyarrow(settings: StorageSettings, tmp_path: Path) -> None:
    n, d = 20_000, 2
    rng = random.Random(1)
    z0 = pa.array([[rng.gauss(0, 1) for _ in range(d)] for _ in range(n)], type=pa.list_(pa.float32(), d))
    z1 = pa.array([[rng.gauss(0, 1) for _ in range(d)] for _ in range(n)], type=pa.list_(pa.float32(), d))
    table = pa.table({"z0": z0, "z1": z1})
    local = tmp_path / "shard-00000.parquet"
    pq.write_table(table, local, row_group_size=4096)

    store = check(S3Store(settings))
    key = "couplings/round-1/shard-00000.parquet"
    store.put_file(local, key)

    fs = pyarrow_filesystem(settings)
    assert pq.read_table(settings.arrow_path(key), filesystem=fs).equals(table)
    with fs.open_input_file(store.arrow_path(key)) as f:  # streamed, one row group at a time
        batches = list(pq.ParquetFile(f).iter_batches(batch_size=4096))
    assert sum(b.num_rows for b in batches) == n and len(batches) == 5
    assert pa.Table.from_batches(batches).equals(table)

    back = tmp_path / "back.parquet"
    store.get_file(key, back)
    assert _sha256_file(back) == _sha256_file(local) == store.sha256(key)


# --- errors: one line, the cause named, never a secret -------------------------------------


def _assert_clean(message: str) -> None:
    assert "\n" not in message
    for secret in (FAKE_SECRET, FAKE_KEY_ID, SwiftS3Server.secret_key):
        assert secret not in message


def test_missing_credentials(aws_isolated: None, s3_server: SwiftS3Server, bucket: str) -> None:
    settings = StorageSettings(endpoint_url=s3_server.endpoint_url, bucket=bucket)
    with pytest.raises(StorageError) as err:
        check(S3Store(settings))
    assert str(err.value) == CREDENTIALS_MESSAGE
    with pytest.raises(StorageError) as err:
        pyarrow_filesystem(settings)
    assert str(err.value) == CREDENTIALS_MESSAGE


def test_missing_profile(aws_isolated: None, monkeypatch: pytest.MonkeyPatch, bucket: str) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(StorageError, match="AWS profile 'no-such-profile' does not exist"):
        check(S3Store(StorageSettings(endpoint_url="http://127.0.0.1:1", bucket=bucket)))


def test_wrong_credentials(aws_isolated: None, monkeypatch: pytest.MonkeyPatch, s3_server: SwiftS3Server,
                           bucket: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test:tester")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    settings = StorageSettings(endpoint_url=s3_server.endpoint_url, bucket=bucket)
    store = S3Store(settings)
    with pytest.raises(StorageError, match=r"^S3 access denied \(HTTP 403\) while checking bucket") as err:
        check(store)
    _assert_clean(str(err.value))
    with pytest.raises(StorageError, match=r"^S3 access denied \(SignatureDoesNotMatch\) while writing") as err:
        store.write_bytes("k", b"v")
    _assert_clean(str(err.value))
    _assert_clean(repr(store))


def test_unreachable_endpoint_fails_fast(aws_isolated: None, monkeypatch: pytest.MonkeyPatch, closed_port: int,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    url = f"http://127.0.0.1:{closed_port}"
    store = S3Store(StorageSettings(endpoint_url=url, bucket="data"))
    src = tmp_path / "f.bin"
    src.write_bytes(b"payload")
    for attempt in (lambda: check(store), lambda: store.get_file("f.bin", tmp_path / "g.bin")):
        t0 = time.monotonic()
        with pytest.raises(StorageError) as err:
            attempt()
        elapsed = time.monotonic() - t0
        assert elapsed < 60, f"took {elapsed:.1f} s"
        message = str(err.value)
        assert message.startswith(f"S3 endpoint {url} unreachable after 3 attempts"), message
        _assert_clean(message)


def test_missing_bucket(s3_env: dict[str, str], s3_server: SwiftS3Server) -> None:
    store = S3Store(StorageSettings(endpoint_url=s3_server.endpoint_url, bucket="no-such-bucket-here"))
    with pytest.raises(StorageError) as err:
        check(store)
    assert str(err.value) == f"S3 bucket 'no-such-bucket-here' not found at {s3_server.endpoint_url}"
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' not found"):
        store.write_bytes("k", b"v")


# --- settings: params.yaml overlaid by the environment --------------------------------------


def test_settings_environment_wins_and_never_holds_secrets(aws_isolated: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    params = StorageParams(backend="s3", endpoint_url="http://params:9000", bucket="from-params", prefix="p")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("RECTFLOW_S3_BUCKET", "from-env")
    monkeypatch.setenv("RECTFLOW_S3_MULTIPART_THRESHOLD_MB", "8")
    s = StorageSettings.from_params(params)
    assert (s.endpoint_url, s.bucket, s.prefix, s.multipart_threshold_mb) == ("http://params:9000", "from-env", "p", 8)
    assert not any("secret" in name or "key" in name for name in StorageSettings.model_fields)
    for text in (repr(s), str(s), s.model_dump_json(), repr(S3Store(s))):
        _assert_clean(text)

    # a bucket in the environment never switches a local backend to S3: where data goes is a param
    assert isinstance(make_store(StorageParams(), Path("/tmp/unused")), LocalStore)
    store = make_store(StorageParams(backend="s3"), Path("/tmp/unused"))  # it fills in the S3 setting
    assert isinstance(store, S3Store) and store.bucket == "from-env"
    monkeypatch.delenv("RECTFLOW_S3_BUCKET")

    monkeypatch.setenv("RECTFLOW_S3_ENDPOINT_URL", f"http://{FAKE_KEY_ID}:{FAKE_SECRET}@host:1")
    with pytest.raises(StorageError, match=r"^storage setting endpoint_url \(or RECTFLOW_S3_ENDPOINT_URL\)") as err:
        StorageSettings.from_params(params)
    _assert_clean(str(err.value))
    monkeypatch.delenv("RECTFLOW_S3_ENDPOINT_URL")
    with pytest.raises(StorageError, match="S3 bucket not set"):
        make_store(StorageParams(backend="s3"), Path("/tmp/unused"))


# --- the launcher itself ------------------------------------------------------------------------


def test_missing_binaries_name_the_packages(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="apt-get install -y --no-install-recommends swift swift-proxy") as err:
        find_binaries(str(tmp_path))
    assert "swift-proxy-server" in str(err.value) and "memcached" in str(err.value)


@pytest.mark.usefixtures("swift_binaries")
def test_server_stop_leaves_no_process(tmp_path: Path) -> None:
    with SwiftS3Server() as server:
        pids = list(server.pids.values())
        directory = server.directory
        assert len(pids) == 5 and all(_alive(p) for p in pids)
        assert server.startup_seconds is not None and server.startup_seconds < 60
        server.create_bucket("check")
    assert not any(_alive(p) for p in pids)
    assert directory is not None and not directory.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) is not a leftover
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --- DVC and MLflow against the same endpoint -------------------------------------------------


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"


def test_dvc_push_pull(tmp_path: Path, s3_env: dict[str, str], s3_server: SwiftS3Server, bucket: str) -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(tmp_path / "dvc-system"),
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "rectflow-test",
        "GIT_AUTHOR_EMAIL": "test@rectflow.invalid",
        "GIT_COMMITTER_NAME": "rectflow-test",
        "GIT_COMMITTER_EMAIL": "test@rectflow.invalid",
    }
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    payload = random.Random(2).randbytes(256 * 1024)
    (src / "data.bin").write_bytes(payload)
    for cmd in (
        ["git", "init", "-q"],
        [dvc, "init", "-q"],
        [dvc, "remote", "add", "-d", "s3remote", f"s3://{bucket}/dvcstore"],
        [dvc, "remote", "modify", "s3remote", "endpointurl", s3_server.endpoint_url],
        [dvc, "add", "-q", "data.bin"],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "data"],
        [dvc, "push", "-q"],
    ):
        _run(cmd, src, env)
    stored = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert len(stored) == 1 and stored[0].startswith("dvcstore/files/md5/")

    _run(["git", "clone", "-q", str(src), str(dst)], tmp_path, env)
    assert not (dst / "data.bin").exists()
    _run([dvc, "pull", "-q"], dst, env)
    assert (dst / "data.bin").read_bytes() == payload


def test_mlflow_logs_artifact_to_bucket(tmp_path: Path, s3_env: dict[str, str], s3_server: SwiftS3Server,
                                        bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # set_tracking_uri is process-global: restore whatever was there after the test.
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    experiment = mlflow.create_experiment("s3-artifacts", artifact_location=f"s3://{bucket}/mlflow")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_text("one-step generator notes\n", "notes/hello.txt")

    key = f"mlflow/{run.info.run_id}/artifacts/notes/hello.txt"
    body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == b"one-step generator notes\n"
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/hello.txt") == "one-step generator notes\n"
