"""A user's data under an S3 prefix (#19) on the real Swift + s3api server: ``rectflow run`` mirrors
the prefix's Parquet objects, DVC hashes the prefix as an external dependency of prepare, a new
object reruns the chain, nothing new runs nothing, and a prefix with no objects is one line, exit 2."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.support.swift import SwiftS3Server
from tests.workspace import clone_workspace, dvc, rectflow

pytestmark = pytest.mark.slow


def _put_day(client, bucket: str, key: str, x: np.ndarray) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1]}), buf)
    client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def _prepare_dep(ws: Path, url: str) -> dict:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    return next(d for d in lock["stages"]["prepare"]["deps"] if d["path"] == url)


def test_data_under_an_s3_prefix_is_versioned_and_retrained_on(
    s3_env: dict[str, str], s3_server: SwiftS3Server, bucket: str, tmp_path: Path,
) -> None:
    from tests.conftest import TINY

    url = f"s3://{bucket}/incoming/days"
    ws = clone_workspace(tmp_path / "ws", [*TINY, "data.target=file", f"data.target_path={url}"])
    client = s3_server.client()
    rng = np.random.default_rng(0)
    _put_day(client, bucket, "incoming/days/2026-11-30.parquet", rng.normal(size=(3_000, 2)))
    client.put_object(Bucket=bucket, Key="incoming/days/README.txt", Body=b"not data")  # not Parquet: not read

    def run() -> tuple[dict, str]:
        r = rectflow("run", cwd=ws, timeout=900, RECTFLOW_THREADS="1", **s3_env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert s3_env["AWS_SECRET_ACCESS_KEY"] not in r.stdout + r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr

    first, _ = run()
    assert "prepare" in first["executed"]
    dep1 = _prepare_dep(ws, url)
    meta = json.loads((ws / "data/prepared/meta.json").read_text())
    assert meta["target"]["version"]["files"] == 1 and meta["target"]["n_train"] + meta["target"]["n_test"] == 3_000
    _put_day(client, bucket, "incoming/days/2026-12-01.parquet", rng.normal(size=(1_000, 2)) + 1.0)
    second, err = run()
    assert second["executed"][:2] == ["prepare", "pretrain"], second
    assert second["data"].startswith("data.target: new data, version ") and "(2 file(s))" in second["data"]
    assert _prepare_dep(ws, url) != dep1  # DVC's own hash of the prefix moved with it
    meta = json.loads((ws / "data/prepared/meta.json").read_text())
    assert meta["target"]["n_train"] + meta["target"]["n_test"] == 4_000
    third, _ = run()
    assert third["executed"] == [] and third["data"].startswith("data.target: no new data since version ")
    st = dvc("status", cwd=ws)
    assert "Data and pipelines are up to date" in st.stdout, st.stdout + st.stderr


def test_an_s3_prefix_without_parquet_objects_is_one_line(
    s3_env: dict[str, str], bucket: str, tmp_path: Path,
) -> None:
    url = f"s3://{bucket}/nothing/here"
    ws = clone_workspace(tmp_path / "ws")
    r = rectflow("run", "--set", "data.target=file", "--set", f"data.target_path={url}", cwd=ws, timeout=300,
                 **s3_env)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert url in lines[0] and "no Parquet objects under this prefix" in lines[0], lines[0]
