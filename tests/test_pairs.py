"""Parquet pair shards: manifest checksums, corruption detection, shuffled streaming, resume."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from rectflow.io import atomic_write_json
from rectflow.pairs import ManifestError, PairStream, read_shard, verify_round, write_shard


def make_round(tmp_path, n_shards=3, rows=50, shape=(2,)):
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n_shards):
        z0 = rng.normal(size=(rows, *shape)).astype(np.float32)
        z1 = (z0 + 1000 * i + np.arange(rows).reshape(-1, *([1] * len(shape)))).astype(np.float32)
        entries.append(write_shard(tmp_path, i, z0, z1))
    atomic_write_json(tmp_path / "manifest.json", {"shape": list(shape), "shards": entries, "complete": True, "round": 1, "n_pairs": n_shards * rows})
    return entries


def test_manifest_checksum_is_the_file_sha256(tmp_path):
    entries = make_round(tmp_path)
    for e in entries:
        assert e["sha256"] == hashlib.sha256((tmp_path / e["name"]).read_bytes()).hexdigest()
    verify_round(tmp_path)


def test_flipped_byte_is_refused(tmp_path):
    entries = make_round(tmp_path)
    path = tmp_path / entries[1]["name"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="shard-00001.parquet: sha256"):
        read_shard(tmp_path, entries[1], (2,))
    with pytest.raises(ManifestError, match="shard-00001"):
        verify_round(tmp_path)


def test_round_trip_values_and_image_shapes(tmp_path):
    z0 = np.random.default_rng(1).normal(size=(7, 1, 4, 4)).astype(np.float32)
    e = write_shard(tmp_path, 0, z0, -z0)
    a, b = read_shard(tmp_path, e, (1, 4, 4))
    np.testing.assert_array_equal(a, z0)
    np.testing.assert_array_equal(b, -z0)


def test_stream_visits_every_pair_once_per_epoch_and_resumes_exactly(tmp_path):
    make_round(tmp_path, n_shards=4, rows=25)
    s = PairStream(tmp_path, seed=3, buffer_shards=2)
    seen = torch.cat([s.next_batch(20)[1] for _ in range(5)])  # 100 pairs = one epoch
    assert sorted(seen[:, 0].tolist()) == sorted(set(seen[:, 0].tolist()))
    assert len(seen) == 100
    state = s.state_dict()
    ahead = [s.next_batch(13) for _ in range(4)]
    s2 = PairStream(tmp_path, seed=3, buffer_shards=2)
    s2.load_state_dict(state)
    again = [s2.next_batch(13) for _ in range(4)]
    for (a0, a1), (b0, b1) in zip(ahead, again):
        torch.testing.assert_close(a0, b0)
        torch.testing.assert_close(a1, b1)
    # a new epoch reorders the pairs
    assert not torch.equal(seen, torch.cat([b[1] for b in again])[: len(seen)])


def test_incomplete_round_is_refused(tmp_path):
    make_round(tmp_path)
    atomic_write_json(tmp_path / "manifest.json", {"shape": [2], "shards": [], "complete": False})
    with pytest.raises(ManifestError, match="incomplete"):
        PairStream(tmp_path, seed=0)
