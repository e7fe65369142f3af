"""(Over 400 lines: one table of cases and the few helpers it needs.)

Bad input, table-driven, through the real CLI: every case runs ``rectflow stage …`` as a
subprocess and must exit with status 2, print one line on stderr naming the culprit, and leave the
workspace byte-for-byte as it was (every file's sha256, every directory). Plus: a flipped byte in a
shard is refused by the next stage and repaired by ``couple``; a NaN/inf loss stops training with
status 1, the step named and the last good checkpoint intact."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RECTFLOW_THREADS="1")
for var in ("RECTFLOW_LOCK_HELD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
    ENV.pop(var, None)
ENV["AWS_SHARED_CREDENTIALS_FILE"] = ENV["AWS_CONFIG_FILE"] = "/nonexistent"
ENV["AWS_EC2_METADATA_DISABLED"] = "true"


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def cli(ws: Path, args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ws, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(ws: Path) -> dict[str, str]:
    """Every path under ``ws`` (hidden ones too) -> sha256 of its bytes, 'dir' or 'link -> …'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(ws):
        for d in dirnames:
            p = Path(dirpath) / d
            out[str(p.relative_to(ws))] = "dir"
        for f in filenames:
            p = Path(dirpath) / f
            rel = str(p.relative_to(ws))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif not stat.S_ISREG(p.stat().st_mode):  # a FIFO of a test case: never opened (it would block)
                out[rel] = f"special {stat.S_IFMT(p.stat().st_mode):o}"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fifo(ws: Path, rel: str) -> None:
    """Put a named pipe with no writer at ``rel`` (replacing what is there): opening it blocks."""
    p = ws / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_file():
        p.unlink()
    os.mkfifo(p)


def device_link(ws: Path, rel: str, device: str = "/dev/zero") -> None:
    """A symlink at ``rel`` to a character device that never ends."""
    p = ws / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.symlink_to(device)


# ---- workspaces -----------------------------------------------------------------------------------

_BASES: dict[str, Path] = {}


def base(kind: str, factory, tiny: list[str]) -> Path:
    """'fresh': params.yaml only; 'coupled': prepare, pretrain and couple done (TINY), built once
    per session (under the session's base temp, shared with test_resume.py). Copy before use."""
    if kind not in _BASES:
        ws = factory.getbasetemp() / f"shared-base-{kind}"
        if not (ws / ".complete").is_file():
            shutil.rmtree(ws, ignore_errors=True)
            ws.mkdir()
            shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
            if kind == "coupled":
                for stage in ("prepare", "pretrain", "couple"):
                    r = cli(ws, ["stage", stage, *sets(tiny)])
                    assert r.returncode == 0, r.stderr
            (ws / ".complete").touch()
        _BASES[kind] = ws
    return _BASES[kind]


def copy_base(kind: str, factory, tiny: list[str], dst: Path) -> Path:
    shutil.copytree(base(kind, factory, tiny), dst, ignore=shutil.ignore_patterns(".complete"))
    return dst


def save_npy(ws: Path, name: str, arr) -> None:
    (ws / "inputs").mkdir(exist_ok=True)
    np.save(ws / "inputs" / name, np.asarray(arr))


def write(ws: Path, rel: str, data: bytes | str) -> None:
    p = ws / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)


def edit_yaml(ws: Path, fn: Callable[[dict], None]) -> None:
    doc = yaml.safe_load((ws / "params.yaml").read_text())
    fn(doc)
    (ws / "params.yaml").write_text(yaml.safe_dump(doc))


def edit_json(ws: Path, rel: str, fn: Callable[[dict], None]) -> None:
    doc = json.loads((ws / rel).read_text())
    fn(doc)
    (ws / rel).write_text(json.dumps(doc))


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def rng_rows(n: int, d: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)


def with_nan(a: np.ndarray, value: float) -> np.ndarray:
    a = a.copy()
    a[17, 1] = value
    return a


def parquet(ws: Path, name: str, arr: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (ws / "inputs").mkdir(exist_ok=True)
    pq.write_table(pa.table({f"x{i}": arr[:, i] for i in range(arr.shape[1])}), ws / "inputs" / name)


def parquet_days(ws: Path, *files: tuple[str, dict]) -> None:
    """A folder of Parquet files ``inputs/days``: (name, columns) each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (ws / "inputs" / "days").mkdir(parents=True, exist_ok=True)
    for name, cols in files:
        if name.endswith((".parquet", ".pq")):
            pq.write_table(pa.table(cols), ws / "inputs" / "days" / name)
        else:
            (ws / "inputs" / "days" / name).write_text("x0,x1\n1,2\n")


def _day(n: int, **extra) -> dict:
    x = rng_rows(n, 2)
    return {"x0": x[:, 0], "x1": x[:, 1]} | extra


def parquet_nulls(ws: Path, name: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (ws / "inputs").mkdir(exist_ok=True)
    x = rng_rows(100, 2)
    col = pa.array([None if i == 17 else float(v) for i, v in enumerate(x[:, 1])], type=pa.float64())
    pq.write_table(pa.table({"x0": x[:, 0], "x1": col}), ws / "inputs" / name)


def fake_pickle_weights(ws: Path) -> None:
    """A pickle where the weights should be, card updated to match it: must be refused, unread."""

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    data = pickle.dumps({"net.0.weight": Boom()})
    write(ws, "models/rf1.safetensors", data)
    edit_json(ws, "models/rf1.json", lambda c: c["meta"].update(sha256=hashlib.sha256(data).hexdigest()))


def storage_wired() -> bool:
    """The S3 cases apply once some stage writes through rectflow.storage."""
    if not (ROOT / "rectflow" / "storage.py").is_file():
        return False
    return any("storage" in p.read_text() and "make_store" in p.read_text() for p in (ROOT / "tasks").glob("*.py"))


def nonfinite_weights(value: float, name: str = "rf1") -> Callable[[Path], None]:
    """A NaN/inf planted in the first tensor of models/NAME, the card's sha256 updated to match
    (so only the values are wrong: the file is intact, readable safetensors)."""

    def setup(ws: Path) -> None:
        from safetensors.numpy import load_file, save_file

        path = ws / "models" / f"{name}.safetensors"
        state = load_file(path)
        key = sorted(state)[0]
        state[key] = state[key].copy()
        state[key].reshape(-1)[3] = value
        save_file(state, path)
        edit_json(ws, f"models/{name}.json",
                  lambda c: c["meta"].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest()))

    return setup


def edit_manifest(fn: Callable[[dict], None], k: int = 1) -> Callable[[Path], None]:
    return lambda ws: edit_json(ws, f"data/couplings/round-{k}/manifest.json", fn)


def _unwritable(path: Path, on: bool) -> None:
    """Make a folder unwritable (root ignores permissions, not the immutable attribute), or undo it."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True)
    else:
        path.chmod(0o555 if on else 0o755)


def _can_make_unwritable() -> bool:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        try:
            _unwritable(Path(d), True)
        except (OSError, subprocess.CalledProcessError):
            return False
        try:
            (Path(d) / "probe").touch()
            ok = False
        except OSError:
            ok = True
        _unwritable(Path(d), False)
        return ok


UNWRITABLE = () if _can_make_unwritable() else (pytest.mark.skip(reason="cannot make a folder unwritable here"),)


def unwritable(rel: str, remove: tuple[str, ...] = ()) -> tuple[Callable[[Path], None], Callable[[Path], None]]:
    """(setup, teardown): ``remove`` those paths, then make folder ``rel`` unwritable; undo it after."""

    def setup(ws: Path) -> None:
        for r in remove:
            p = ws / r
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        (ws / rel).mkdir(parents=True, exist_ok=True)
        _unwritable(ws / rel, True)

    return setup, lambda ws: _unwritable(ws / rel, False)


@dataclass
class Case:
    id: str
    args: list[str]
    culprit: str | list[str]  # every string must appear in the error line
    base: str = "fresh"
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    marks: tuple = ()
    teardown: Callable[[Path], None] | None = None  # after the run and the snapshot (undo chattr +i)


FILE = ["data.target=file", "data.target_path=inputs/x.npy"]


def target(name: str) -> list[str]:
    return ["data.target=file", f"data.target_path=inputs/{name}"]


S3 = ["storage.backend=s3", "storage.bucket=b", "storage.endpoint_url=http://127.0.0.1:1"]

CASES = [
    # -- params: keys, types, ranges ---------------------------------------------------------------
    Case("unknown-key", ["stage", "pretrain", "--set", "pretrain.stpes=5"], ["pretrain.stpes", "unknown key"]),
    Case("misspelled-section", ["stage", "pretrain", "--set", "pretrian.steps=5"], ["pretrian", "unknown key"]),
    Case("unknown-key-in-file", ["stage", "pretrain"], ["params.yaml", "pretrain.stpes"],
         setup=lambda ws: edit_yaml(ws, lambda d: d.setdefault("pretrain", {}).update(stpes=5))),
    Case("wrong-type", ["stage", "pretrain", "--set", "pretrain.lr=fast"], "pretrain.lr"),
    Case("wrong-type-section", ["stage", "pretrain", "--set", "pretrain=5"], "pretrain"),
    Case("negative-steps", ["stage", "pretrain", "--set", "pretrain.steps=-5"], ["pretrain.steps", "greater than 0"]),
    Case("zero-batch", ["stage", "pretrain", "--set", "pretrain.batch_size=0"], "pretrain.batch_size"),
    Case("nfe-zero-couple", ["stage", "couple", "--set", "couple.steps=0"], "couple.steps"),
    Case("nfe-zero-evaluate", ["stage", "evaluate", "--set", "evaluate.grid=[{models: flows, solver: euler, steps: [0]}]"],
         "evaluate.grid.0.steps.0"),
    Case("unknown-solver", ["stage", "couple", "--set", "couple.solver=rk99"], ["couple.solver", "rk99"]),
    Case("out-of-range-fraction", ["stage", "prepare", "--set", "data.test_fraction=1.5"], "data.test_fraction"),
    Case("out-of-range-ema", ["stage", "pretrain", "--set", "pretrain.ema=2"], "pretrain.ema"),
    Case("unknown-lr-schedule", ["stage", "reflow", "--set", "reflow.lr_schedule=linear"], ["reflow.lr_schedule", "linear"]),
    # images: checks on the values the images profile brings stop every stage, not only the one that would hit them
    Case("images-profile-beyond-boss-grid", ["stage", "prepare", "--set", "data.target=digits", "--set",
                                            "distill.pairs_round=null", "--set", "bellman.grid_points=10"],
         ["couple.reflowed", "images profile"]),
    Case("inception-file-missing", ["stage", "prepare", "--set", "data.target=digits", "--set",
                                    "evaluate.inception=inputs/inception-2015-12-05.pt"],
         ["evaluate.inception", "inputs/inception-2015-12-05.pt does not exist"]),
    Case("inception-file-missing-run", ["run", "--set", "data.target=digits", "--set",
                                        "evaluate.inception=inputs/inception-2015-12-05.pt"], "evaluate.inception"),
    Case("nan-value", ["stage", "pretrain", "--set", "pretrain.lr=.nan"], ["pretrain.lr", "finite"]),
    Case("inf-value-in-file", ["stage", "pretrain"], "pretrain.lr",
         setup=lambda ws: edit_yaml(ws, lambda d: d.setdefault("pretrain", {}).update(lr=float("inf")))),
    Case("odd-time-embed", ["stage", "pretrain", "--set", "model.time_embed=33"], ["model.time_embed", "even"]),
    Case("set-without-value", ["stage", "pretrain", "--set", "pretrain.steps"], "pretrain.steps"),
    Case("unknown-stage", ["stage", "pretrian"], "pretrian"),
    Case("missing-params-file", ["stage", "prepare", "--params", "nope.yaml"], ["nope.yaml", "not found"]),
    Case("params-not-yaml", ["stage", "prepare"], ["params.yaml", "not valid YAML"],
         setup=lambda ws: write(ws, "params.yaml", "pretrain: [\n  steps: 5\n")),
    Case("params-not-a-mapping", ["stage", "prepare"], ["params.yaml", "mapping"],
         setup=lambda ws: write(ws, "params.yaml", "- 1\n- 2\n")),
    Case("params-not-utf8", ["stage", "prepare"], ["params.yaml", "UTF-8"],
         setup=lambda ws: write(ws, "params.yaml", b"\xff\xfe\x00seed: 1\n")),
    # types are never coerced (#15 kind 3): a boolean is not a number, 0.5 is not an integer
    Case("bool-as-count", ["stage", "pretrain", "--set", "pretrain.steps=true"], ["pretrain.steps", "valid integer"],
         base="coupled"),
    Case("yes-as-width", ["stage", "pretrain", "--set", "model.hidden=yes"], ["model.hidden", "valid integer"],
         base="coupled"),
    Case("fraction-as-count", ["stage", "pretrain", "--set", "pretrain.steps=0.5"], ["pretrain.steps", "valid integer"]),
    Case("number-as-flag", ["stage", "pretrain", "--set", "model.attention=1"], ["model.attention", "valid boolean"]),
    # one YAML reader for every entry point (#15 kind 4): a duplicate key is one line naming it and its line
    Case("duplicate-key-stage", ["stage", "prepare"], ["params.yaml", "duplicate key 'pretrain' at line 3"],
         setup=lambda ws: write(ws, "params.yaml", "pretrain:\n  steps: 5\npretrain:\n  steps: 6\n")),
    Case("duplicate-key-run", ["run"], ["params.yaml", "duplicate key 'pretrain' at line 3"],
         setup=lambda ws: write(ws, "params.yaml", "pretrain:\n  steps: 5\npretrain:\n  steps: 6\n")),
    Case("duplicate-nested-key", ["stage", "prepare"], ["params.yaml", "duplicate key 'steps' at line 3"],
         setup=lambda ws: write(ws, "params.yaml", "pretrain:\n  steps: 5\n  steps: 6\n")),
    Case("file-target-without-path", ["stage", "prepare", "--set", "data.target=file"], "data.target_path"),
    # -- data files ---------------------------------------------------------------------------------
    Case("data-file-missing", ["stage", "prepare", *sets(target("missing.npy"))], ["missing.npy", "not found"]),
    Case("data-file-empty-array", ["stage", "prepare", *sets(target("empty.npy"))], ["empty.npy", "empty"],
         setup=lambda ws: save_npy(ws, "empty.npy", np.zeros((0, 2), np.float32))),
    Case("data-file-zero-bytes", ["stage", "prepare", *sets(target("zero.npy"))], "zero.npy",
         setup=lambda ws: write(ws, "inputs/zero.npy", b"")),
    Case("data-file-nan", ["stage", "prepare", *sets(target("nan.npy"))], ["nan.npy", "NaN", "row 17"],
         setup=lambda ws: save_npy(ws, "nan.npy", with_nan(rng_rows(500, 2), np.nan))),
    Case("data-file-inf-parquet", ["stage", "prepare", *sets(target("inf.parquet"))], ["inf.parquet", "infinite"],
         setup=lambda ws: parquet(ws, "inf.parquet", with_nan(rng_rows(500, 2), np.inf))),
    Case("data-file-1d", ["stage", "prepare", *sets(target("flat.npy"))], ["flat.npy", "shape"],
         setup=lambda ws: save_npy(ws, "flat.npy", np.arange(100, dtype=np.float32))),
    Case("data-file-3d", ["stage", "prepare", *sets(target("cube.npy"))], ["cube.npy", "shape"],
         setup=lambda ws: save_npy(ws, "cube.npy", np.zeros((100, 2, 3), np.float32))),
    Case("data-file-garbage", ["stage", "prepare", *sets(target("garbage.npy"))], ["garbage.npy", "cannot be read", "never loaded"],
         setup=lambda ws: write(ws, "inputs/garbage.npy", "this is not an array\n" * 20)),
    Case("data-file-pickled-npy", ["stage", "prepare", *sets(target("obj.npy"))], ["obj.npy", "never loaded"],
         setup=lambda ws: save_npy(ws, "obj.npy", np.array([{"a": 1}, {"b": 2}], dtype=object))),
    Case("data-file-float64-too-large", ["stage", "prepare", *sets(target("big.npy"))],
         ["big.npy", "too large for float32", "row 17"],
         setup=lambda ws: save_npy(ws, "big.npy", with_nan(rng_rows(500, 2).astype(np.float64), 1e300))),
    Case("data-file-npz-float64-too-large", ["stage", "prepare", *sets(target("big.npz"))],
         ["big.npz", "too large for float32"],
         setup=lambda ws: (ws / "inputs").mkdir() or np.savez(ws / "inputs" / "big.npz",
                                                             x=with_nan(rng_rows(50, 3).astype(np.float64), -1e39))),
    # -- a folder of Parquet files is one data set (#19) -------------------------------------------------
    Case("data-folder-columns-differ", ["stage", "prepare", *sets(target("days"))],
         ["inputs/days/d2.parquet", "columns", "differ", "d1.parquet"],
         setup=lambda ws: parquet_days(ws, ("d1.parquet", _day(100)), ("d2.parquet", {"x0": rng_rows(50, 1)[:, 0]}))),
    Case("data-folder-column-types-differ", ["stage", "prepare", *sets(target("days"))],
         ["inputs/days/d2.parquet", "x1:int64", "x1:float"],
         setup=lambda ws: parquet_days(ws, ("d1.parquet", _day(100)),
                                       ("d2.parquet", {"x0": rng_rows(50, 1)[:, 0], "x1": np.arange(50)}))),
    Case("data-folder-empty-new-file", ["stage", "prepare", *sets(target("days"))],
         ["inputs/days/d2.parquet", "no rows"],
         setup=lambda ws: parquet_days(ws, ("d1.parquet", _day(100)), ("d2.parquet", _day(0)))),
    Case("data-folder-not-only-parquet", ["stage", "prepare", *sets(target("days"))],
         ["inputs/days/d2.csv", "not Parquet"],
         setup=lambda ws: parquet_days(ws, ("d1.parquet", _day(100)), ("d2.csv", {}))),
    Case("data-folder-null-in-a-later-file", ["stage", "prepare", *sets(target("days"))],
         ["inputs/days/d2.parquet", "null", "row 3"],
         setup=lambda ws: parquet_days(ws, ("d1.parquet", _day(100)), ("d2.parquet", {
             "x0": [0.5, 1.0, 2.0, None, 1.0], "x1": [1.0, 2.0, 3.0, 4.0, 5.0]}))),
    Case("data-id-column-missing", ["stage", "prepare", *sets([*target("days"), "data.id_column=uid"])],
         ["inputs/days/d1.parquet", "'uid'", "data.id_column"],
         setup=lambda ws: parquet_days(ws, ("d1.parquet", _day(100)))),
    Case("data-id-column-null", ["stage", "prepare", *sets([*target("days"), "data.id_column=uid"])],
         ["inputs/days/d1.parquet", "id column 'uid'", "null"],
         setup=lambda ws: parquet_days(ws, ("d1.parquet", _day(3, uid=["a", None, "c"])))),
    Case("data-id-column-not-parquet", ["stage", "prepare", *sets([*target("x.npy"), "data.id_column=uid"])],
         ["data.id_column", "not Parquet"], setup=lambda ws: save_npy(ws, "x.npy", rng_rows(100, 2))),
    Case("data-removed-run", ["run", *sets(target("days"))], ["data.target_path", "inputs/days", "removed"]),
    Case("data-file-parquet-null", ["stage", "prepare", *sets(target("null.parquet"))], ["null.parquet", "null", "row 17"],
         setup=lambda ws: parquet_nulls(ws, "null.parquet")),
    Case("data-file-one-row", ["stage", "prepare", *sets(target("one.npy"))], ["one.npy", "too few"],
         setup=lambda ws: save_npy(ws, "one.npy", rng_rows(1, 2))),
    Case("data-file-images-all-identical", ["stage", "prepare", *sets(target("same.npy"))], ["same.npy", "distinct"],
         setup=lambda ws: save_npy(ws, "same.npy", np.ones((40, 1, 4, 4), np.float32))),
    # special files: refused by what they are, never opened (a FIFO with no writer, a device never ends)
    Case("data-file-fifo", ["stage", "prepare", *sets(target("pipe.npy"))], ["inputs/pipe.npy", "named pipe (FIFO)"],
         setup=lambda ws: fifo(ws, "inputs/pipe.npy")),
    Case("data-file-fifo-npz", ["stage", "prepare", *sets(target("pipe.npz"))], ["inputs/pipe.npz", "named pipe"],
         setup=lambda ws: fifo(ws, "inputs/pipe.npz")),
    Case("data-file-fifo-parquet", ["stage", "prepare", *sets(target("pipe.parquet"))], ["pipe.parquet", "named pipe"],
         setup=lambda ws: fifo(ws, "inputs/pipe.parquet")),
    Case("data-file-dev-zero", ["stage", "prepare", *sets(target("zeros.npy"))], ["inputs/zeros.npy", "character device"],
         setup=lambda ws: device_link(ws, "inputs/zeros.npy")),
    Case("data-folder-fifo-image", ["stage", "prepare", *sets(target("imgs"))], ["inputs/imgs/3.png", "named pipe"],
         setup=lambda ws: fifo(ws, "inputs/imgs/3.png")),
    Case("params-fifo", ["stage", "prepare", "--params", "pipe.yaml"], ["pipe.yaml", "named pipe"],
         setup=lambda ws: fifo(ws, "pipe.yaml")),
    Case("data-noise-overflow", ["stage", "prepare", "--set", "data.noise=1e39"], ["data.noise", "overflow float32"]),
    Case("data-noise-overflow-circles", ["stage", "prepare", "--set", "data.target=circles", "--set", "data.noise=1e300"],
         ["data.noise", "circles", "overflow float32"]),
    Case("source-target-dimension-differ", ["stage", "prepare", "--set", "data.source=file",
                                            "--set", "data.source_path=inputs/three.npy"], ["data.source", "dimension"],
         setup=lambda ws: save_npy(ws, "three.npy", rng_rows(500, 3))),
    Case("prepared-data-missing", ["stage", "pretrain"], ["data/prepared/meta.json", "prepare"]),
    Case("prepared-data-damaged", ["stage", "pretrain"], ["target-train.npy", "sha256"], base="coupled",
         setup=lambda ws: flip_byte(ws / "data/prepared/target-train.npy", -5)),
    Case("prepared-meta-garbage", ["stage", "pretrain"], ["data/prepared/meta.json", "prepare"], base="coupled",
         setup=lambda ws: write(ws, "data/prepared/meta.json", "{")),
    # -- pipeline files: models, shards, manifests --------------------------------------------------
    Case("model-weights-fifo", ["stage", "couple"], ["models/rf1.safetensors", "named pipe"], base="coupled",
         setup=lambda ws: fifo(ws, "models/rf1.safetensors")),
    Case("prepared-meta-fifo", ["stage", "pretrain"], ["data/prepared/meta.json", "named pipe"], base="coupled",
         setup=lambda ws: fifo(ws, "data/prepared/meta.json")),
    Case("shard-fifo", ["stage", "reflow"], ["round-1/shard-00001.parquet", "named pipe"], base="coupled",
         setup=lambda ws: fifo(ws, "data/couplings/round-1/shard-00001.parquet")),
    Case("manifest-fifo", ["stage", "reflow"], ["round-1/manifest.json", "named pipe"], base="coupled",
         setup=lambda ws: fifo(ws, "data/couplings/round-1/manifest.json")),
    Case("sample-model-fifo", ["sample", "--model", "models/rf1", "--out", "s.parquet"], ["models/rf1.json", "named pipe"],
         base="coupled", setup=lambda ws: fifo(ws, "models/rf1.json")),
    Case("dvc-lock-fifo", ["run"], ["dvc.lock", "named pipe"], setup=lambda ws: fifo(ws, "dvc.lock")),
    Case("model-arch-mismatch", ["stage", "couple"], ["rf1.safetensors", "do not match the architecture"], base="coupled",
         setup=lambda ws: edit_json(ws, "models/rf1.json", lambda c: c["arch"].update(hidden=32))),
    Case("model-arch-mismatch-reflow", ["stage", "reflow"], ["rf1.safetensors", "do not match the architecture"],
         base="coupled", setup=lambda ws: edit_json(ws, "models/rf1.json", lambda c: c["arch"].update(depth=3))),
    Case("model-arch-incomplete", ["stage", "couple"], ["rf1.json", "architecture"], base="coupled",
         setup=lambda ws: edit_json(ws, "models/rf1.json", lambda c: c["arch"].pop("hidden"))),
    Case("model-weights-changed", ["stage", "couple"], ["rf1.safetensors", "sha256"], base="coupled",
         setup=lambda ws: flip_byte(ws / "models" / "rf1.safetensors", -3)),
    Case("model-weights-are-a-pickle", ["stage", "couple"], ["rf1.safetensors", "not readable safetensors"],
         base="coupled", setup=fake_pickle_weights),
    Case("shard-byte-flipped", ["stage", "reflow"], ["shard-00001.parquet", "sha256", "corrupt"], base="coupled",
         setup=lambda ws: flip_byte(ws / "data/couplings/round-1/shard-00001.parquet")),
    Case("shard-deleted", ["stage", "reflow"], ["shard-00002.parquet", "missing"], base="coupled",
         setup=lambda ws: (ws / "data/couplings/round-1/shard-00002.parquet").unlink()),
    Case("manifest-garbage", ["stage", "reflow"], ["round-1/manifest.json", "not a valid manifest"], base="coupled",
         setup=lambda ws: write(ws, "data/couplings/round-1/manifest.json", "{not json")),
    Case("manifest-missing", ["stage", "reflow"], ["round-1/manifest.json", "missing", "couple"], base="coupled",
         setup=lambda ws: (ws / "data/couplings/round-1/manifest.json").unlink()),
    Case("manifest-fewer-shards", ["stage", "reflow"], ["round-1/manifest.json", "n_pairs is 1200"], base="coupled",
         setup=edit_manifest(lambda m: m.update(shards=m["shards"][:1]))),
    Case("manifest-n-pairs-edited", ["stage", "reflow"], ["round-1/manifest.json", "n_pairs is 5000"], base="coupled",
         setup=edit_manifest(lambda m: m.update(n_pairs=5000))),
    Case("manifest-shape-disagrees-with-shards", ["stage", "reflow"], ["shard-00000.parquet", "dimension 2", "[3]"],
         base="coupled", setup=edit_manifest(lambda m: m.update(shape=[3], dim=3))),
    Case("manifest-shape-not-the-models", ["stage", "reflow"], ["round-1/manifest.json", "[1, 2]", "models/rf1"],
         base="coupled", setup=edit_manifest(lambda m: m.update(shape=[1, 2]))),
    Case("manifest-dim-disagrees", ["stage", "reflow"], ["round-1/manifest.json", "dim"], base="coupled",
         setup=edit_manifest(lambda m: m.update(dim=5))),
    Case("manifest-rows-edited", ["stage", "reflow"], ["round-1/manifest.json", "400-row shards"], base="coupled",
         setup=edit_manifest(lambda m: (m["shards"][0].update(rows=500), m.update(n_pairs=1300)))),
    Case("model-weights-nan", ["stage", "couple"], ["rf1.safetensors", "NaN or infinite"], base="coupled",
         setup=nonfinite_weights(float("nan"))),
    Case("model-weights-inf-reflow", ["stage", "reflow"], ["rf1.safetensors", "NaN or infinite"], base="coupled",
         setup=nonfinite_weights(float("inf"))),
    Case("sample-model-weights-nan", ["sample", "--model", "models/rf1", "--out", "s.parquet"],
         ["rf1.safetensors", "NaN or infinite"], base="coupled", setup=nonfinite_weights(float("-inf"))),
    # -- sizes that pass the schema but cannot be allocated, and counts beyond int64 ----------------
    Case("oversized-batch", ["stage", "pretrain", "--set", "pretrain.batch_size=100000000000"],
         ["pretrain.batch_size", "memory"], base="coupled"),
    Case("oversized-couple-batch", ["stage", "couple", "--set", "couple.batch_size=100000000000", "--set",
                                    "couple.shard_size=100000000000", "--set", "couple.n_pairs=100000000000"],
         ["couple.", "memory"], base="coupled"),
    Case("oversized-network", ["stage", "pretrain", "--set", "model.hidden=3000000"], ["model.hidden", "memory"],
         base="coupled"),
    Case("oversized-evaluation", ["stage", "evaluate", "--set", "evaluate.n_samples=100000000"],
         ["evaluate.n_samples", "memory"], base="coupled"),
    Case("oversized-boss-grid", ["stage", "pretrain", "--set", "bellman.grid_points=100000000"],
         ["bellman.grid_points", "memory"], base="coupled"),
    Case("oversized-generated-set", ["stage", "prepare", "--set", "data.n_train=1000000000000"],
         ["data.n_train", "memory"]),
    Case("count-beyond-int64", ["stage", "couple", "--set", "couple.steps=99999999999999999999"],
         ["couple.steps", "less than or equal to 9223372036854775807"]),
    # -- the workspace: outputs that cannot be written are found before anything is computed -------
    Case("workspace-unwritable-round", ["stage", "couple"], ["data/couplings", "not writable", "round-1"],
         base="coupled", marks=UNWRITABLE,
         **dict(zip(("setup", "teardown"), unwritable("data/couplings", ("data/couplings/round-1", "metrics/couple.json"))))),
    Case("workspace-unwritable-models", ["stage", "pretrain"], ["models", "not writable", "rf1.safetensors"],
         base="coupled", marks=UNWRITABLE, **dict(zip(("setup", "teardown"), unwritable("models")))),
    Case("workspace-unwritable-checkpoints", ["stage", "reflow"], [".rectflow/checkpoints", "not writable"],
         base="coupled", marks=UNWRITABLE, **dict(zip(("setup", "teardown"), unwritable(".rectflow/checkpoints")))),
    Case("workspace-unwritable-lock", ["stage", "prepare"], [".rectflow", "workspace lock"],
         marks=UNWRITABLE, **dict(zip(("setup", "teardown"), unwritable(".")))),
    Case("run-workspace-unwritable", ["run"], ["models", "not writable", "rectflow run"], marks=UNWRITABLE,
         **dict(zip(("setup", "teardown"), unwritable("models")))),
    Case("workspace-file-in-the-way", ["stage", "prepare"], ["data", "is a file"],
         setup=lambda ws: write(ws, "data", "not a folder\n")),
    # -- rectflow run: a dvc.lock DVC could not read is refused before Prefect starts ------------------
    Case("dvc-lock-not-yaml", ["run"], ["dvc.lock", "not valid YAML at line 4"],
         setup=lambda ws: write(ws, "dvc.lock", 'schema: "2.0"\nstages:\n  prepare: [\n')),
    Case("dvc-lock-not-utf8", ["run"], ["dvc.lock", "UTF-8"], setup=lambda ws: write(ws, "dvc.lock", b"\xff\xfe\x00x")),
    Case("dvc-lock-wrong-schema", ["run"], ["dvc.lock", "stages.prepare.outs"],
         setup=lambda ws: write(ws, "dvc.lock", 'schema: "2.0"\nstages:\n  prepare:\n    cmd: x\n    outs: 7\n')),
    # -- rectflow sample: --out and the numbers are checked before anything is computed ----------------
    Case("sample-out-is-a-folder", ["sample", "--model", "models/rf1", "--out", "out.parquet"], ["--out", "folder"],
         base="coupled", setup=lambda ws: (ws / "out.parquet").mkdir()),
    Case("sample-out-under-a-file", ["sample", "--model", "models/rf1", "--out", "models/rf1.json/s.parquet"],
         ["--out", "models/rf1.json", "is a file"], base="coupled"),
    Case("sample-out-unwritable", ["sample", "--model", "models/rf1", "--out", "plots/s.parquet"],
         ["--out", "plots", "not writable"], base="coupled", marks=UNWRITABLE,
         **dict(zip(("setup", "teardown"), unwritable("plots")))),
    Case("sample-seed-beyond-range", ["sample", "--model", "models/rf1", "--out", "s.parquet", "--seed",
                                      "99999999999999999999"], "--seed", base="coupled"),
    Case("sample-n-beyond-int64", ["sample", "--model", "models/rf1", "--out", "s.parquet", "--n",
                                   "99999999999999999999"], "--n", base="coupled"),
    Case("sample-n-beyond-memory", ["sample", "--model", "models/rf1", "--out", "s.parquet", "--n", "10000000000000"],
         ["--n", "memory"], base="coupled"),
    Case("sample-steps-beyond-memory", ["sample", "--model", "models/rf1", "--out", "s.parquet", "--steps",
                                        "100000000000000"], ["--steps", "memory"], base="coupled"),
    # -- object storage (only once a stage writes through rectflow.storage) -------------------------
    Case("s3-no-credentials", ["stage", "couple", *sets(S3)], "credentials", base="coupled",
         marks=() if storage_wired() else (pytest.mark.skip(reason="no stage uses rectflow.storage yet"),)),
    Case("s3-unreachable", ["stage", "couple", *sets(S3)], "127.0.0.1:1", base="coupled",
         env={"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-logged"},
         marks=() if storage_wired() else (pytest.mark.skip(reason="no stage uses rectflow.storage yet"),)),
]
assert len({c.id for c in CASES}) == len(CASES)


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


_RESULTS: dict[str, Outcome] = {}


def _run_case(case: Case, ws: Path) -> Outcome:
    try:
        if case.setup:
            case.setup(ws)
        before = snapshot(ws)
        r = cli(ws, case.args, env=ENV | case.env)
        return Outcome(r.returncode, r.stdout, r.stderr, before, snapshot(ws))
    finally:
        if case.teardown:
            case.teardown(ws)


@pytest.fixture
def outcomes(tmp_path_factory, tiny_overrides) -> dict[str, Outcome]:
    """All cases, run once, three at a time (each is a fresh copy of its base workspace)."""
    if not _RESULTS:
        todo = [c for c in CASES if not any(m.name == "skip" for m in c.marks)]
        jobs = []
        for c in todo:
            ws = tmp_path_factory.mktemp(c.id)
            shutil.rmtree(ws)
            jobs.append((c, copy_base(c.base, tmp_path_factory, tiny_overrides, ws)))
        with ThreadPoolExecutor(max_workers=3) as pool:
            for c, out in zip(todo, pool.map(lambda job: _run_case(*job), jobs)):
                _RESULTS[c.id] = out
    return _RESULTS


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_exits_2_names_it_and_writes_nothing(case: Case, outcomes):
    out = outcomes[case.id]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.rc == 2, f"exit status {out.rc}, stderr:\n{out.stderr[-3000:]}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{out.stderr[-3000:]}"
    assert lines[0].startswith("rectflow: error: ")
    for word in [case.culprit] if isinstance(case.culprit, str) else case.culprit:
        assert word in lines[0], f"{word!r} not named in: {lines[0]}"
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert out.after == out.before, f"the workspace changed: {set(out.after.items()) ^ set(out.before.items())}"
    assert "s3cr3t" not in out.stderr + out.stdout


def test_a_pickle_for_weights_is_never_unpickled(outcomes, tmp_path_factory):
    out = outcomes["model-weights-are-a-pickle"]
    assert "PWNED" not in out.after and out.rc == 2


# ---- a flipped byte: refused downstream, repaired by couple -------------------------------------


def test_flipped_byte_in_a_shard_is_refused_then_repaired(tmp_path_factory, tiny_overrides, tmp_path):
    ws = copy_base("coupled", tmp_path_factory, tiny_overrides, tmp_path / "ws")
    round1 = ws / "data" / "couplings" / "round-1"
    good = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in round1.iterdir()}
    flip_byte(round1 / "shard-00001.parquet")
    before = snapshot(ws)

    r = cli(ws, ["stage", "reflow", *sets(tiny_overrides)])  # the next stage refuses it
    assert r.returncode == 2, r.stderr
    assert "shard-00001.parquet" in r.stderr and "sha256" in r.stderr
    assert snapshot(ws) == before

    r = cli(ws, ["stage", "couple", *sets(tiny_overrides)])  # remakes that shard only
    assert r.returncode == 0, r.stderr
    rec = json.loads((ws / "metrics" / "couple.json").read_text())
    assert rec["shards_made"] == 1 and rec["shards_reused"] == 2, rec
    assert "shard-00001.parquet fails its sha256 check; remaking it" in r.stderr
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in round1.iterdir()} == good
    from rectflow.pairs import PairStream

    PairStream(round1, seed=0)  # what reflow opens first: the repaired round verifies


# ---- NaN / inf loss ------------------------------------------------------------------------------


def test_nan_loss_from_a_huge_learning_rate_stops_with_the_step_named(tmp_path_factory, tiny_overrides, tmp_path):
    ws = copy_base("coupled", tmp_path_factory, tiny_overrides, tmp_path / "ws")
    for f in ("models/rf1.safetensors", "models/rf1.json", "models/rf1.schedule.json", "metrics/pretrain.json",
              "plots/train/rf1.csv"):
        (ws / f).unlink()
    before = snapshot(ws)
    r = cli(ws, ["stage", "pretrain", *sets(tiny_overrides + ["pretrain.lr=1e30"])])
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("rectflow: error:")]
    assert len(lines) == 1 and "loss became NaN or infinite at step" in lines[0], r.stderr
    assert "no checkpoint had been written yet" in lines[0]
    assert snapshot(ws) == before  # no model, no metrics, no plot, no checkpoint


def test_nan_loss_mid_run_keeps_the_last_good_checkpoint(tmp_path):
    """A data file with one extreme (finite) row overflows the float32 loss the first time a batch
    draws it. Which step that is follows from the seed: find it with the library's own sampler,
    plant the row there (after the first checkpoint), and check the stage stops at exactly that
    step, leaving the checkpoint of step 50 untouched; a rerun resumes from it and stops again."""
    import torch

    from rectflow.data import Distribution
    from rectflow.sources import IndependentPairs
    from rectflow.tables import held_out, row_hashes

    n, seed, batch = 20_000, 0, 256

    def train_order(a: np.ndarray) -> np.ndarray:  # a file's training rows, as the split orders them
        order = np.argsort(row_hashes(a, seed), kind="stable")
        return order[~held_out(a, 0.1, seed)[order]]

    x = rng_rows(n, 2)
    n_train = len(train_order(x))
    # The same draws as the stage's sampler, on a stand-in target whose rows are their own positions.
    index_rows = torch.arange(n_train, dtype=torch.float32)[:, None].repeat(1, 2)
    pairs = IndependentPairs(Distribution((2,)), Distribution((2,), index_rows), seed)
    first: dict[int, int] = {}
    for step in range(100):
        _, x1 = pairs.next_batch(batch)
        for i in x1[:, 0].long().tolist():
            first.setdefault(i, step)
    # Plant the extreme row (finite in float32; its square is not) in a row of the file whose
    # position in the training split, with its new hash, is first drawn between steps 56 and 96.
    for j in np.random.default_rng(1).permutation(n):
        planted = x.copy()
        planted[j] = 3e19
        order = train_order(planted)
        if len(order) == n_train and j in order and 55 <= first.get(int(np.flatnonzero(order == j)[0]), -1) <= 95:
            break
    x, bad_step = planted, first[int(np.flatnonzero(order == j)[0])] + 1  # 1-based, as the stage counts
    ws = tmp_path
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    (ws / "inputs").mkdir()
    np.save(ws / "inputs" / "x.npy", x)
    over = [*FILE, "model.hidden=64", "model.depth=2", "pretrain.steps=150", "pretrain.batch_size=256",
            "pretrain.checkpoint_every=50", "pretrain.log_every=25"]
    assert cli(ws, ["stage", "prepare", *sets(over)]).returncode == 0
    ckpt = ws / ".rectflow" / "checkpoints" / "rf1" / "last.pt"

    for attempt in range(2):
        r = cli(ws, ["stage", "pretrain", *sets(over)])
        assert r.returncode == 1, r.stderr
        err = [line for line in r.stderr.splitlines() if line.startswith("rectflow: error:")]
        assert len(err) == 1, r.stderr
        assert f"loss became NaN or infinite at step {bad_step}/150" in err[0]
        assert f"last good checkpoint ({ckpt.relative_to(ws)}, step 50) is left intact" in err[0]
        state = torch.load(ckpt, weights_only=True)
        assert state["step"] == 50
        assert all(torch.isfinite(t).all() for t in state["model"].values())
        if attempt == 0:
            kept = hashlib.sha256(ckpt.read_bytes()).hexdigest()
        else:
            assert "[rf1] resuming from checkpoint at step 50" in r.stderr
            assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == kept
        assert not (ws / "models").exists() and not (ws / "metrics" / "pretrain.json").exists()
        assert not list(ckpt.parent.glob(".*.tmp"))


def test_a_diverging_flow_never_writes_non_finite_pairs(tmp_path_factory, tiny_overrides, tmp_path):
    """Finite weights that blow up under the ODE (rf1's scaled by 1e15): couple stops at the first
    shard with exit 1 and one line naming the flow, the shard and the solver; no NaN pair is ever
    on disk and round 1 is not published (what is generated is checked as strictly as what is loaded).
    ``rectflow sample`` writes no NaN sample either (Euler: the samples are checked; RK45: its step
    size underflows, one line too), and evaluate writes no NaN row: exit 1 naming the model."""
    from safetensors.numpy import load_file, save_file

    ws = copy_base("coupled", tmp_path_factory, tiny_overrides, tmp_path / "ws")
    for stage in ("reflow", "distill", "quantize"):  # every model evaluate needs
        assert cli(ws, ["stage", stage, *sets(tiny_overrides)]).returncode == 0
    path = ws / "models" / "rf1.safetensors"
    save_file({k: v * 1e15 for k, v in load_file(path).items()}, path)
    edit_json(ws, "models/rf1.json", lambda c: c["meta"].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    r = cli(ws, ["stage", "evaluate", *sets(tiny_overrides)])
    lines = [line for line in r.stderr.splitlines() if line.startswith("rectflow: error:")]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "evaluate: rf1 with euler, 1 steps made 300 of 300 samples NaN or infinite" in lines[0]
    assert not (ws / "metrics" / "eval.json").exists()

    shutil.rmtree(ws / "data" / "couplings" / "round-1")
    r = cli(ws, ["stage", "couple", *sets(tiny_overrides)])
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("rectflow: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "shard-00000.parquet" in lines[0] and "NaN or infinite" in lines[0] and "couple.solver euler" in lines[0]
    assert not (ws / "data" / "couplings" / "round-1").exists()
    assert not list((ws / ".rectflow" / "staging").rglob("*.parquet"))
    for solver, words in (("euler", "came out NaN or infinite"), ("rk45", "step size underflowed")):
        r = cli(ws, ["sample", "--model", "models/rf1", "--out", "s.parquet", "--solver", solver])
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1 and words in lines[0], r.stderr
        assert not (ws / "s.parquet").exists()


# ---- usage errors caught by the argument parser ---------------------------------------------------

@pytest.mark.parametrize("args,culprit", [
    (["stage", "pretrain", "--bogus"], "--bogus"),
    (["sample", "--model", "models/rf1", "--out", "s.parquet", "--steps", "0"], "--steps"),
    (["sample", "--model", "models/rf1", "--out", "s.parquet", "--solver", "rk99"], "rk99"),
], ids=["unknown-option", "sample-nfe-zero", "sample-unknown-solver"])
def test_usage_errors_exit_2(tmp_path, args, culprit):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = snapshot(tmp_path)
    r = cli(tmp_path, args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and culprit in lines[0], r.stderr
    assert snapshot(tmp_path) == before


# ---- a manifest that does not add up: refused downstream, repaired by couple ----------------------


def test_truncated_manifest_is_refused_then_repaired(tmp_path_factory, tiny_overrides, tmp_path):
    """A complete-looking manifest that lists one shard of three (400 of its own n_pairs 1200) is
    never trained on, and couple does not reuse it: it remakes the two missing shards, byte-identical."""
    ws = copy_base("coupled", tmp_path_factory, tiny_overrides, tmp_path / "ws")
    round1 = ws / "data" / "couplings" / "round-1"
    good = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in round1.iterdir()}
    edit_manifest(lambda m: m.update(shards=m["shards"][:1]))(ws)
    before = snapshot(ws)

    r = cli(ws, ["stage", "reflow", *sets(tiny_overrides)])
    assert r.returncode == 2 and "n_pairs is 1200" in r.stderr, r.stderr
    assert snapshot(ws) == before

    r = cli(ws, ["stage", "couple", *sets(tiny_overrides)])
    assert r.returncode == 0, r.stderr
    assert "fails verification" in r.stderr and "n_pairs is 1200" in r.stderr
    rec = json.loads((ws / "metrics" / "couple.json").read_text())
    assert rec["shards_made"] == 2 and rec["shards_reused"] == 1 and rec["n_pairs"] == 1200, rec
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in round1.iterdir()} == good


# ---- what the machine refuses mid-run: one line, exit 2 if nothing was written, else 1 ------------


def test_an_allocation_failure_mid_stage_is_one_line_naming_the_sizes(tmp_path_factory, tiny_overrides, tmp_path):
    """Sizes within the preflight's lower bounds may still not fit: the allocator's own failure (a
    real one: 32 TB asked of the CPU allocator) becomes one line naming the stage's size keys,
    exit 2 when the stage had written nothing, exit 1 (RunFailedError) once it had."""
    import torch

    from rectflow.errors import RunFailedError
    from rectflow.config import ParamsError
    from rectflow.layout import Layout
    from rectflow.params import load_params
    from tasks.runner import _run_module

    ws = copy_base("coupled", tmp_path_factory, tiny_overrides, tmp_path / "ws")
    p = load_params(ws / "params.yaml", tiny_overrides)
    layout = Layout(ws)

    class Greedy:
        writes_first = False

        def run(self, p, layout):  # noqa: ARG002
            if self.writes_first:
                (ws / "models" / "rf2.json").write_text("{}")
            torch.empty(2**42)  # 32 TB: refused at once (beyond RAM + swap)
            return {}

    try:
        torch.empty(2**42)
        pytest.skip("this machine's allocator does not refuse 32 TB (overcommit always)")
    except RuntimeError:
        pass
    with pytest.raises(ParamsError) as e:
        _run_module(Greedy(), "reflow", p, layout, {})
    line = str(e.value)
    assert "\n" not in line and "ran out of memory" in line and "reflow.batch_size=256" in line
    assert "nothing was written" in line
    greedy = Greedy()
    greedy.writes_first = True
    with pytest.raises(RunFailedError) as e:
        _run_module(greedy, "reflow", p, layout, {})
    assert "ran out of memory" in str(e.value) and "kept" in str(e.value)


def test_a_write_refused_mid_stage_is_one_line_naming_the_file(tmp_path_factory, tiny_overrides, tmp_path):
    """A folder that turns unwritable after the preflight (or a disk that fills up): the OSError
    becomes one line naming the file (exit 2: nothing was written)."""
    if UNWRITABLE:
        pytest.skip("cannot make a folder unwritable here")
    from rectflow.io import atomic_write_json
    from rectflow.layout import Layout
    from rectflow.params import load_params
    from rectflow.preflight import WorkspaceError
    from tasks.runner import _run_module

    ws = copy_base("coupled", tmp_path_factory, tiny_overrides, tmp_path / "ws")
    p = load_params(ws / "params.yaml", tiny_overrides)

    class Late:
        def run(self, p, layout):  # noqa: ARG002
            _unwritable(ws / "models", True)
            atomic_write_json(ws / "models" / "rf2.json", {})
            return {}

    try:
        with pytest.raises(WorkspaceError) as e:
            _run_module(Late(), "reflow", p, Layout(ws), {})
    finally:
        _unwritable(ws / "models", False)
    assert "models" in str(e.value) and "cannot be written" in str(e.value) and "\n" not in str(e.value)


# ---- rectflow run: a dvc.lock DVC refuses mid-flow is one line, never retried -----------------------


def test_run_with_a_dvc_lock_dvc_refuses_is_one_line_and_not_retried(tmp_path):
    """A dvc.lock that passes rectflow's own check but not DVC's (an md5 that is a number): the flow's
    first stage refuses it, and ``rectflow run`` ends with that one line, exit 2, no traceback (in
    quiet mode Prefect's records of the refusal stay off the console), and DVC is run once, not retried."""
    from tests.workspace import clone_workspace, rectflow

    ws = clone_workspace(tmp_path / "ws")
    (ws / "dvc.lock").write_text('schema: "2.0"\nstages:\n  prepare:\n    cmd: rectflow stage prepare\n'
                                 "    outs: [{path: x, md5: 3}]\n")
    r = rectflow("run", cwd=ws, timeout=300, RECTFLOW_THREADS="1")
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("rectflow: error:")]
    assert len(errors) == 1 and "dvc.lock" in errors[0] and "DVC cannot read it" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Retries" not in r.stderr
    assert r.stderr.count("validation failed") == 2  # DVC's own line and ours: one attempt


# ---- rectflow run exits as its stage did: 2 for bad input, 1 for a failure (DVC says only 'failed') ---


@pytest.mark.parametrize("case", ["nan-loss", "data-nan"])
def test_run_exits_with_the_status_of_the_stage_that_stopped_it(case: str, tmp_path, tiny_overrides):
    """A NaN loss in pretrain is a failure (exit 1), a NaN in the data file is bad input (exit 2),
    although DVC exits 1 for both: the stage reports its status to the flow. Neither is retried,
    and each ends with exactly the stage's own line. (A FIFO as the data file no longer reaches a
    stage: ``rectflow run`` refuses it before Prefect starts, as a missing one.)"""
    from tests.workspace import clone_workspace, rectflow

    ws = clone_workspace(tmp_path / "ws", tiny_overrides)
    if case == "nan-loss":
        extra, code, words = ["pretrain.lr=1e30"], 1, "loss became NaN or infinite at step"
    else:
        save_npy(ws, "nan.npy", with_nan(rng_rows(100, 2), float("nan")))
        extra, code, words = ["data.target=file", "data.target_path=inputs/nan.npy"], 2, "contains NaN"
    r = rectflow("run", *sets(extra), cwd=ws, timeout=400, RECTFLOW_THREADS="1")
    assert r.returncode == code, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("rectflow: error:")]
    assert errors and all(words in e for e in errors), r.stderr[-3000:]
    assert len(set(errors)) == 1, errors  # the stage's line (passed through) and the run's: the same line
    assert "Traceback" not in r.stderr and "Retries" not in r.stderr
    stage = "pretrain" if case == "nan-loss" else "prepare"
    assert r.stderr.count(f"Running stage '{stage}'") + r.stdout.count(f"Running stage '{stage}'") == 1


# ---- settings that bound a wait are finite (#15 kind 8) ---------------------------------------------


@pytest.mark.parametrize("var,value,words", [
    ("RECTFLOW_LOCK_TIMEOUT", "inf", "finite"),
    ("RECTFLOW_LOCK_TIMEOUT", "nan", "finite"),
    ("RECTFLOW_DIST_TIMEOUT", "1e300", "less than or equal to 604800"),
    ("RECTFLOW_S3_READ_TIMEOUT_S", "inf", "finite"),
    ("RECTFLOW_S3_CONNECT_TIMEOUT_S", "1e9", "less than or equal to 3600"),
    ("RECTFLOW_S3_MAX_ATTEMPTS", "1000000", "less than or equal to 100"),
])
def test_settings_that_bound_a_wait_are_finite(var: str, value: str, words: str, tmp_path_factory, tiny_overrides,
                                               tmp_path):
    """A wait taken from the environment is bounded: an infinite or absurd value is one line naming
    the variable, exit 2, nothing written (the S3 ones where couple reads its storage settings)."""
    ws = copy_base("coupled", tmp_path_factory, tiny_overrides, tmp_path / "ws")
    (ws / "data/couplings").rename(ws / "round-backup")  # couple has a round to make
    before = snapshot(ws)
    env = ENV | {var: value, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-logged"}
    r = cli(ws, ["stage", "couple", *sets(tiny_overrides + S3)], env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rectflow: error:"), r.stderr[-2000:]
    assert var.removeprefix("RECTFLOW_S3_").lower() in lines[0].lower() and words in lines[0], lines[0]
    assert snapshot(ws) == before
