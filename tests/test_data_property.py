"""Property: whatever data file a user points ``data.target`` at (random Parquet / ``.npy`` / ``.npz``:
dtypes, shapes, empty, NaN/inf/huge values, object arrays, strings, nulls, damaged bytes),
``rectflow stage prepare`` either succeeds with valid outputs (finite float32 arrays whose sha256 and
shape ``meta.json`` records) or exits 2 with one line naming the file and leaves the workspace
byte-for-byte unchanged: never a traceback, never a hang.

A handful of examples run the real CLI (``python -m flows.cli stage prepare`` in a tiny workspace,
with a timeout); more run in-process through :func:`tasks.runner.run_stage` (the same code below
the CLI's argument parsing), with an alarm as the hang guard. About a minute on two CPU cores.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.test_bad_input import ENV, ROOT, cli, snapshot

NAME = "data"  # inputs/data.<ext>
HUGE = [0.0, -1.5, 3e19, 1e38, -3.4e38, 1e39, 1e300, float("nan"), float("inf"), float("-inf")]

# ---- files ----------------------------------------------------------------------------------------

# (Hypothesis leans towards 0 and the first choice; the weights below keep every kind of file common.)


def shapes(images: bool) -> st.SearchStrategy[tuple[int, ...]]:
    """Array shapes; with ``images``, (n, c, h, w) ones too (rare: each valid image set trains the FD
    feature network, tens of seconds on a busy CPU, so only the CLI examples draw them)."""
    kinds = ["any", "vectors", "vectors", "vectors", "high"] + (["images"] if images else [])
    return st.sampled_from(kinds).flatmap(lambda kind: {
        "any": st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),  # 0-D to 3-D, empty included
        "high": st.lists(st.integers(0, 3), min_size=5, max_size=6).map(tuple),  # 5-D, 6-D
        "vectors": st.tuples(st.integers(1, 40), st.integers(1, 4)),  # (n, d): the common case
        "images": st.tuples(st.integers(1, 12), st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)),  # tiny
    }[kind])


numeric_dtypes = st.sampled_from(["float64", "float32", "float16", "longdouble", "int8", "int64", "uint64", "bool",
                                  "float64"])
other_dtypes = st.sampled_from(["complex64", "U3", "datetime64[s]", "object", "V4"])


@st.composite
def arrays(draw, images: bool = True) -> np.ndarray:
    shape = draw(shapes(images))
    if draw(st.sampled_from(["numbers"] * 5 + ["other"])) == "other":  # not numbers
        dtype = draw(other_dtypes)
        if dtype == "object":
            return np.array([{"a": 1}] * max(1, int(np.prod(shape))), dtype=object)
        return np.zeros(shape, dtype=dtype)
    dtype = np.dtype(draw(numeric_dtypes))
    seed = draw(st.integers(0, 2**16))
    base = np.random.default_rng(seed).standard_normal(shape) * draw(st.sampled_from([1.0, 1e3, 1e20]))
    plant = draw(st.sampled_from(["nasty", "nasty", "clean", "constant"]))
    if plant == "nasty" and base.size:  # a NaN, an inf, or a value too large for float32, somewhere
        base.reshape(-1)[draw(st.integers(0, base.size - 1))] = draw(st.sampled_from(HUGE))
    elif plant == "constant":
        base = np.zeros(shape)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dtype.kind in "iub":
            return np.nan_to_num(base, posinf=0, neginf=0).astype(dtype)
        return base.astype(dtype)


def save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=arr.dtype == object)


@st.composite
def npz_bytes(draw, images: bool = True) -> bytes:
    keys = draw(st.sampled_from([["x"], ["other"], ["data", "x"], ["arr_0"], []]))
    buf = io.BytesIO()
    np.savez(buf, **{k: draw(arrays(images)) for k in keys})  # object arrays are pickled inside: refused on load
    return buf.getvalue()


@st.composite
def parquet_bytes(draw) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = draw(st.sampled_from([30, 0, 1, 2, 5, 30]))
    cols = {}
    for i in range(draw(st.sampled_from([2, 1, 3, 0]))):
        kind = draw(st.sampled_from(["huge", "float64", "float32", "int64", "int-with-nulls", "float-with-nulls",
                                     "string", "bool", "null", "huge"]))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        if kind in ("float64", "float32"):
            col = pa.array(rng.standard_normal(n).astype(kind))
        elif kind == "huge":
            vals = rng.standard_normal(n)
            if n:
                vals[draw(st.integers(0, n - 1))] = draw(st.sampled_from(HUGE))
            col = pa.array(vals)
        elif kind == "int64":
            col = pa.array(rng.integers(-5, 5, n))
        elif kind in ("int-with-nulls", "float-with-nulls"):
            vals = [None if draw(st.booleans()) else (1 if kind.startswith("int") else 1.5) for _ in range(n)]
            col = pa.array(vals, type=pa.int64() if kind.startswith("int") else pa.float64())
        elif kind == "string":
            col = pa.array([f"s{j}" for j in range(n)])
        elif kind == "bool":
            col = pa.array([bool(j % 2) for j in range(n)])
        else:
            col = pa.nulls(n)
        cols[f"c{i}"] = col
    buf = io.BytesIO()
    pq.write_table(pa.table(cols) if cols else pa.table({"c": pa.array([], pa.float64())}).slice(0, 0), buf)
    return buf.getvalue()


@st.composite
def data_files(draw, images: bool = True) -> tuple[str, bytes]:
    """(extension, file bytes): a valid-looking file, or a damaged copy of one."""
    ext = draw(st.sampled_from([".parquet", ".npz", ".npy", ".parquet", ".npy", ".npz"]))
    if ext == ".npy":
        buf = io.BytesIO()
        arr = draw(arrays(images))
        np.save(buf, arr, allow_pickle=arr.dtype == object)
        data = buf.getvalue()
    elif ext == ".npz":
        data = draw(npz_bytes(images))
    else:
        data = draw(parquet_bytes())
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "flip", "garbage", "empty"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "flip" and data:
        b = bytearray(data)
        b[draw(st.integers(0, len(b) - 1))] ^= 0xFF
        data = bytes(b)
    elif damage == "garbage":
        data = draw(st.binary(max_size=64))
    elif damage == "empty":
        data = b""
    return ext, data


# ---- one example ----------------------------------------------------------------------------------


def _workspace(tmp: Path, ext: str, data: bytes) -> tuple[Path, list[str]]:
    ws = tmp
    shutil.rmtree(ws, ignore_errors=True)
    (ws / "inputs").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    (ws / "inputs" / f"{NAME}{ext}").write_bytes(data)
    return ws, ["data.target=file", f"data.target_path=inputs/{NAME}{ext}", "data.test_fraction=0.25"]


def _check_outputs(ws: Path) -> None:
    """What exit 0 must leave: meta.json, and finite float32 arrays matching its shape and sha256."""
    import hashlib

    from rectflow.data import load_prepared, prepared_meta

    meta = prepared_meta(ws / "data" / "prepared")
    for split in ("train", "test"):
        dist = load_prepared(ws / "data" / "prepared", "target", split)  # verifies sha256 and shape
        assert dist.data is not None and dist.data.dtype.is_floating_point and len(dist.data) > 0
        assert bool(dist.data.isfinite().all())
        path = ws / meta["target"]["files"][split]["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["target"]["files"][split]["sha256"]
    if len(meta["target"]["shape"]) == 3:
        assert meta["features"] and (ws / meta["features"]["path"]).is_file()


def _judge(ws: Path, rc: int, stderr: str, before: dict[str, str], ext: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    if rc == 0:
        _check_outputs(ws)
        return
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, f"exit status {rc}:\n{stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("rectflow: error: "), stderr[-3000:]
    assert f"inputs/{NAME}{ext}" in lines[0], lines[0]
    assert snapshot(ws) == before, "the workspace changed on exit 2"


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Hang()


def _in_process(ws: Path, overrides: list[str]) -> tuple[int, str]:
    """``run_stage`` as the CLI calls it: (exit status, the error line the CLI would print)."""
    import os

    from rectflow.errors import RunFailedError
    from tasks.runner import run_stage, user_errors

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(120)
    cwd = os.getcwd()
    try:
        os.chdir(ws)
        run_stage("prepare", ws / "params.yaml", overrides, root=ws)
        return 0, ""
    except user_errors() as e:
        return 2, f"rectflow: error: {e}\n"
    except RunFailedError as e:
        return 1, f"rectflow: error: {e}\n"
    except _Hang:
        pytest.fail("prepare hung (no answer within 120 s)")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        os.chdir(cwd)


# ---- the properties -------------------------------------------------------------------------------

def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=arr.dtype == object)
    return buf.getvalue()


def _parquet_with_nulls() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"a": pa.array([1.0] * 17 + [None] * 3), "b": pa.array(list(range(20)))}), buf)
    return buf.getvalue()


_big = np.random.default_rng(0).standard_normal((50, 2))
_nan = _big.astype(np.float32)
_big[17, 1] = 1e300  # finite, but not in float32
_nan[17, 1] = np.nan
_images = np.random.default_rng(1).standard_normal((12, 1, 4, 4)).astype(np.float32)


@_settings(8)
@given(f=data_files())
@example(f=(".npy", _npy(_images)))  # valid images: prepare trains the FD feature network
@example(f=(".npy", _npy(_big)))
def test_random_data_files_through_the_cli(tmp_path_factory, f):
    ext, data = f
    ws, overrides = _workspace(tmp_path_factory.getbasetemp() / "prop-cli", ext, data)
    before = snapshot(ws)
    r = cli(ws, ["stage", "prepare", *[a for o in overrides for a in ("--set", o)]], env=ENV | {"RECTFLOW_THREADS": "1"},
            timeout=180)
    _judge(ws, r.returncode, r.stderr, before, ext)
    if r.returncode == 0:
        assert json.loads(r.stdout)["stage"] == "prepare"


@_settings(200)
@given(f=data_files(images=False))
@example(f=(".npy", _npy(_big)))
@example(f=(".npy", _npy(_nan)))
@example(f=(".npy", _npy(np.array([{"a": 1}, None], dtype=object))))
@example(f=(".npy", _npy(np.zeros((1, 2)))))
@example(f=(".npy", _npy(np.array([["a", "b"]] * 5))))
@example(f=(".parquet", _parquet_with_nulls()))
def test_random_data_files_in_process(tmp_path_factory, f):
    ext, data = f
    ws, overrides = _workspace(tmp_path_factory.getbasetemp() / "prop-inproc", ext, data)
    before = snapshot(ws)
    rc, err = _in_process(ws, overrides)
    _judge(ws, rc, err, before, ext)
