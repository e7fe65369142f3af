"""Coupling rounds in a real S3-compatible bucket (Swift + s3api on loopback): ``couple`` uploads
every shard and then the manifest to ``PREFIX/couplings/round-K/``; ``reflow`` streams the pairs
from the bucket when there is no local copy, verifying each shard's sha256."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tasks.runner import run_stage
from rectflow.pairs import ManifestError
from tests.support.swift import SwiftS3Server
from tests.tinyws import OVERRIDES, copy_workspace, trained_workspace


def test_couple_uploads_round_and_reflow_streams_it_from_the_bucket(
    s3_env: dict[str, str], s3_server: SwiftS3Server, bucket: str, tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    ws = copy_workspace(trained_workspace(tmp_path_factory), tmp_path / "ws")
    over = [*OVERRIDES, "storage.backend=s3", f"storage.bucket={bucket}", "storage.prefix=runs/t",
            "reflow.steps=30", "reflow.checkpoint_every=20"]
    client = s3_server.client()

    def objects(round_k: int) -> dict[str, bytes]:
        prefix = f"runs/t/couplings/round-{round_k}/"
        listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"][len(prefix):]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}

    rec = run_stage("couple", ws / "params.yaml", over, root=ws)
    local = ws / "data/couplings/round-1"
    man = json.loads((local / "manifest.json").read_text())
    remote = objects(1)
    assert sorted(remote) == sorted([e["name"] for e in man["shards"]] + ["manifest.json"])
    assert len(man["shards"]) == 3
    for e in man["shards"]:  # the bucket holds exactly the local shards (DVC keeps tracking those)
        assert hashlib.sha256(remote[e["name"]]).hexdigest() == e["sha256"] == rec["sha256"][e["name"]]
        assert (local / e["name"]).read_bytes() == remote[e["name"]]
    assert remote["manifest.json"] == (local / "manifest.json").read_bytes()

    # No local copy: reflow reads round 1 from the bucket (and uploads the round 2 it couples).
    shutil.rmtree(local)
    capfd.readouterr()
    rec = run_stage("reflow", ws / "params.yaml", over, root=ws)
    err = capfd.readouterr().err
    assert f"streaming from s3://{bucket}/runs/t/couplings/round-1" in err
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in err and s3_env["AWS_ACCESS_KEY_ID"] not in err
    assert not local.exists(), "the pairs were streamed, not downloaded into the workspace"
    assert rec["rounds"][0]["train"]["steps_run"] == 30
    card = json.loads((ws / "models/rf2.json").read_text())
    assert card["meta"]["pairs"] == 1200
    assert card["meta"]["inputs"]["round-1"] == man["fingerprint"]
    round2 = objects(2)
    man2 = json.loads(round2["manifest.json"])
    assert man2["complete"] and round2["manifest.json"] == (ws / "data/couplings/round-2/manifest.json").read_bytes()
    assert all(hashlib.sha256(round2[e["name"]]).hexdigest() == e["sha256"] for e in man2["shards"])

    # A damaged object is refused by its sha256, named by its URL, before a step is taken.
    client.put_object(Bucket=bucket, Key="runs/t/couplings/round-1/shard-00001.parquet", Body=b"not a shard")
    with pytest.raises(ManifestError, match=rf"s3://{bucket}/runs/t/couplings/round-1/shard-00001\.parquet: sha256"):
        run_stage("reflow", ws / "params.yaml", over, root=ws)
