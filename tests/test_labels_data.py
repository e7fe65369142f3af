"""Labels as data (class-conditional runs): the built-in sets' natural labels, labels read from a
user's files (a Parquet column, a ``.npz`` key ``y``, class sub-folders of images), every refusal of
bad labels as one line naming the file or key, ``data.conditional``'s resolution, and prepare's label
files and ``meta.json`` record as ``load_prepared`` reads them back. In process, a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rectflow.data import (
    CLASSES,
    EIGHT_CENTERS,
    DataError,
    checkerboard_squares,
    generate_2d,
    generate_2d_labelled,
    load_digits,
    load_labelled_file,
    load_prepared,
    prepared_classes,
)
from rectflow.layout import Layout
from rectflow.params import load_params
from rectflow.tables import data_version
from tests.conftest import ROOT

SMALL = ["data.n_train=600", "data.n_test=100"]


def params(tmp_path: Path, *overrides: str):  # noqa: ANN201 - rectflow.config.Params
    """The repository's params.yaml with ``overrides`` (the profile off: these tests are about data)."""
    return load_params(ROOT / "params.yaml", ["profile=none", *overrides])


def one_line(e: pytest.ExceptionInfo[DataError], *names: str) -> str:
    """The refusal's message, checked: one line that names each of ``names``."""
    msg = str(e.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


# ---- the built-in sets' labels ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moons", "8gaussians", "checkerboard", "scurve", "circles", "swissroll", "gaussian"])
@pytest.mark.parametrize("noise", [None, 0.3])
def test_generate_2d_is_the_labelled_sets_rows_bit_for_bit(name: str, noise: float | None) -> None:
    x, y = generate_2d_labelled(name, 1001, 3, noise)
    assert x.dtype == np.float32 and x.shape == (1001, 2)
    assert x.tobytes() == generate_2d(name, 1001, 3, noise).tobytes()
    if name in CLASSES:
        assert y is not None and y.dtype == np.int64 and y.shape == (1001,)
        assert 0 <= y.min() and y.max() < CLASSES[name]
    else:
        assert y is None


def test_labels_cost_no_draw() -> None:
    """8gaussians and checkerboard draw what the unlabelled generators drew (their code, inlined)."""
    from rectflow.data import _rng

    rng = _rng(5, "8gaussians")
    s = 1 / np.sqrt(2)
    centers = 5 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    old = centers[rng.integers(0, 8, 500)] + 0.1 ** 0.25 * rng.standard_normal((500, 2))
    assert generate_2d("8gaussians", 500, 5).tobytes() == old.astype(np.float32).tobytes()
    rng = _rng(5, "checkerboard")
    x1 = rng.random(500) * 4 - 2
    x2 = rng.random(500) - rng.integers(0, 2, 500) * 2 + np.floor(x1) % 2
    assert generate_2d("checkerboard", 500, 5).tobytes() == (np.stack([x1, x2], 1) * 2).astype(np.float32).tobytes()


def test_eight_gaussians_label_is_the_mode() -> None:
    x, y = generate_2d_labelled("8gaussians", 5000, 0)
    nearest = ((x[:, None].astype(np.float64) - EIGHT_CENTERS[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == y).mean() >= 0.99
    assert set(np.unique(y)) == set(range(8))


@pytest.mark.parametrize("name", ["moons", "circles"])
def test_moons_and_circles_labels_are_sklearns(name: str) -> None:
    from sklearn.datasets import make_circles, make_moons

    from rectflow.data import _rng

    seed = int(_rng(2, name).integers(2**31))
    _, want = (make_moons(700, noise=0.2, random_state=seed) if name == "moons"
               else make_circles(700, factor=0.5, noise=0.05, random_state=seed))
    x, y = generate_2d_labelled(name, 700, 2)
    np.testing.assert_array_equal(y, want)
    if name == "moons":  # 0 the upper moon, 1 the lower one
        assert x[y == 0, 1].mean() > x[y == 1, 1].mean()
    else:  # 0 the outer circle (radius 3), 1 the inner one (1.5)
        r = np.linalg.norm(x, axis=1)
        assert r[y == 0].mean() > 2.5 > 2 > r[y == 1].mean()


def test_checkerboard_labels_are_its_squares() -> None:
    x, y = generate_2d_labelled("checkerboard", 4000, 1)
    np.testing.assert_array_equal(y, checkerboard_squares(x))
    assert set(np.unique(y)) == set(range(8))
    col, row = np.floor(x[:, 0] / 2).astype(int) + 2, np.floor(x[:, 1] / 2).astype(int) + 2  # 2-wide squares
    assert ((col + row) % 2 == 0).all()  # the filled squares of the board
    for label in range(8):  # every label is one square
        squares = {(c, r) for c, r in zip(col[y == label], row[y == label], strict=True)}
        assert len(squares) == 1 and squares.pop()[0] == label // 2


# ---- labels of user files ---------------------------------------------------------------------------


def write_parquet(path: Path, label: object, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"a": rng.standard_normal(n), "label": label, "b": rng.standard_normal(n)}), path)
    return path


def write_images(folder: Path, classes: dict[str, int], size: int = 4) -> Path:
    rng = np.random.default_rng(1)
    for name, count in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


def test_parquet_label_column_round_trip(tmp_path: Path) -> None:
    y = np.arange(40) % 5
    x, labels, names = load_labelled_file(write_parquet(tmp_path / "t.parquet", pa.array(y, pa.int32())), "label")
    assert x.shape == (40, 2) and names is None  # the label column is not a dimension
    assert labels is not None and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, y)
    x_only, none, _ = load_labelled_file(tmp_path / "t.parquet", "label", read_labels=False)
    assert none is None and x_only.tobytes() == x.tobytes()


def test_parquet_folder_label_column(tmp_path: Path) -> None:
    (tmp_path / "days").mkdir()
    write_parquet(tmp_path / "days" / "1.parquet", pa.array(np.zeros(40, np.int64)))
    write_parquet(tmp_path / "days" / "2.parquet", pa.array([0] * 39 + [-1]))
    with pytest.raises(DataError) as e:
        load_labelled_file(tmp_path / "days", "label")
    assert one_line(e, "2.parquet", "'label'").endswith("got -1 at row 39")  # the row in its own file


def test_npz_labels_round_trip(tmp_path: Path) -> None:
    y = np.array([2, 0, 1] * 10, np.uint8)
    np.savez(tmp_path / "d.npz", x=np.ones((30, 3)), y=y)
    x, labels, names = load_labelled_file(tmp_path / "d.npz")
    assert x.shape == (30, 3) and names is None and labels is not None and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, y)
    np.savez(tmp_path / "only.npz", y=np.ones((30, 3)))  # y alone is the data, as before
    assert load_labelled_file(tmp_path / "only.npz")[1] is None


def test_class_subfolders_round_trip(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs", {"dog": 2, "cat": 3})
    (folder / ".hidden").mkdir()
    x, y, names = load_labelled_file(folder)
    assert x.shape == (5, 1, 4, 4) and names == ["cat", "dog"]
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1])
    first = np.asarray(Image.open(folder / "cat" / "0.png"), np.float32) / 127.5 - 1
    np.testing.assert_allclose(x[0, 0], first, atol=1e-6)
    version = data_version(folder)["digest"]
    (folder / "dog" / "1.png").rename(folder / "cat" / "9.png")  # an image changes class: a new version
    assert data_version(folder)["digest"] != version
    with pytest.raises(DataError) as e:
        load_labelled_file(folder, classes=1)
    one_line(e, str(folder), "data.classes: 1")


# ---- refusals: one line naming the file (column, key) or the key of params ----------------------------


@pytest.mark.parametrize("label, why", [
    (pa.array([0.0] * 39 + [float("nan")]), "type double"),  # NaN: a float column
    (pa.array([0] * 39 + [None], pa.int64()), "got a null at row 39"),
    (pa.array(["a"] * 40), "type string"),
    (pa.array([1.0] * 40), "type double"),  # integral floats are floats
    (pa.array([0.5] * 40), "type double"),
    (pa.array([3] * 7 + [-1] * 33), "got -1 at row 7"),
])
def test_bad_parquet_labels(tmp_path: Path, label: pa.Array, why: str) -> None:
    path = write_parquet(tmp_path / "x.parquet", label)
    with pytest.raises(DataError) as e:
        load_labelled_file(path, "label", classes=10)
    msg = one_line(e, str(path), "column 'label'", "labels must be integers in [0, 10)", why)
    if why.startswith("got -1"):
        assert msg == f"{path}: column 'label': labels must be integers in [0, 10), got -1 at row 7 (data.classes: 10)"


def test_label_at_or_above_data_classes(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "x.parquet", pa.array(np.arange(40) % 4))
    assert load_labelled_file(path, "label", classes=4)[1].max() == 3
    with pytest.raises(DataError) as e:
        load_labelled_file(path, "label", classes=3)
    one_line(e, str(path), "[0, 3)", "got 3 at row 3", "data.classes: 3")
    with pytest.raises(DataError) as e:
        load_labelled_file(write_parquet(tmp_path / "y.parquet", pa.array(np.zeros(40, np.int64))), "lbl")
    one_line(e, "y.parquet", "no column 'lbl'", "data.label_column")


@pytest.mark.parametrize("y, why", [
    (np.zeros(29, np.int64), "expected labels of shape (30,)"),
    (np.zeros((30, 1), np.int64), "expected labels of shape (30,)"),
    (np.ones(30), "got dtype float64"),
    (np.array(["a"] * 30), "got dtype <U1"),
    (np.array([0] * 29 + [-2]), "got -2 at row 29"),
])
def test_bad_npz_labels(tmp_path: Path, y: np.ndarray, why: str) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((30, 2)), y=y)
    with pytest.raises(DataError) as e:
        load_labelled_file(tmp_path / "d.npz")
    one_line(e, f"{tmp_path / 'd.npz'}: key 'y'", why)
    assert load_labelled_file(tmp_path / "d.npz", read_labels=False)[1] is None  # data.conditional: false


def test_label_column_on_a_file_that_is_not_parquet(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.ones((30, 2)))
    with pytest.raises(DataError) as e:
        load_labelled_file(tmp_path / "d.npy", "label")
    one_line(e, "data.label_column", "d.npy")


def test_empty_class_subfolder(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs", {"a": 2})
    (folder / "b").mkdir()
    with pytest.raises(DataError) as e:
        load_labelled_file(folder)
    one_line(e, str(folder / "b"), "class sub-folder")


def test_conditional_true_needs_labels(tmp_path: Path) -> None:
    from tasks.prepare import load_sides

    with pytest.raises(DataError) as e:
        load_sides(params(tmp_path, "data.target=scurve", "data.conditional=true", *SMALL))
    assert one_line(e, "data.conditional: true", "'scurve'", "no labels").startswith(
        "data.conditional: true, but data.target 'scurve' carries no labels (")
    np.save(tmp_path / "d.npy", np.ones((30, 2)))
    with pytest.raises(DataError) as e:
        load_sides(params(tmp_path, "data.target=file", f"data.target_path={tmp_path / 'd.npy'}",
                          "data.conditional=true"))
    one_line(e, "data.conditional", "d.npy")


def test_source_and_target_class_counts_must_agree(tmp_path: Path) -> None:
    from tasks.prepare import load_sides

    rng = np.random.default_rng(0)

    def npz(name: str, y: np.ndarray) -> str:
        np.savez(tmp_path / name, x=rng.standard_normal((len(y), 2)), y=y)
        return str(tmp_path / name)

    def sides(source: str, target: str, *more: str):  # noqa: ANN202
        return load_sides(params(tmp_path, "data.source=file", f"data.source_path={source}", "data.target=file",
                                 f"data.target_path={target}", *more))

    three, five, four = (npz(name, np.arange(60) % k) for name, k in (("src.npz", 3), ("tgt.npz", 5), ("4.npz", 4)))
    with pytest.raises(DataError) as e:
        sides(three, five)
    one_line(e, "src.npz", "tgt.npz", "3 classes", "has 5")
    with pytest.raises(DataError) as e:  # K given, but the source lacks classes the target has
        sides(three, five, "data.classes=5")
    one_line(e, "src.npz", "no training row of class 3")
    both = sides(five, four, "data.classes=5")  # the target lacks the last class: K given, the labels agree
    assert both.conditional and both.source.classes == both.target.classes == 5
    assert both.source.labels is not None
    unlabelled = sides(three, five, "data.conditional=false")
    assert not unlabelled.conditional and unlabelled.source.labels is None and unlabelled.target.labels is None
    with pytest.raises(DataError) as e:  # data.label_column names a Parquet column of every file side
        sides(three, str(write_parquet(tmp_path / "t.parquet", pa.array(np.arange(40) % 3))), "data.label_column=label")
    one_line(e, "data.label_column", "src.npz", "not Parquet")


# ---- data.conditional and prepare ---------------------------------------------------------------------


def prepare(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    from tasks.prepare import run

    run(params(tmp_path, *overrides), Layout(tmp_path))
    prepared = tmp_path / "data" / "prepared"
    return prepared, json.loads((prepared / "meta.json").read_text())


def test_unconditional_prepare_has_no_labels(tmp_path: Path) -> None:
    prepared, meta = prepare(tmp_path, "data.target=8gaussians", *SMALL)  # auto: built-in sets stay unconditional
    assert "labels" not in meta and "labels_sha256" not in meta["target"]["files"]["train"]
    assert not list(prepared.glob("*-y.npy")) and prepared_classes(prepared) == 0
    assert load_prepared(prepared, "target", "train").labels is None


def test_conditional_8gaussians_prepare(tmp_path: Path) -> None:
    prepared, meta = prepare(tmp_path, "data.source=moons", "data.target=8gaussians", "data.conditional=true", *SMALL)
    assert meta["labels"]["classes"] == 8 and meta["labels"]["sides"] == ["target"]  # a built-in source: none
    assert meta["labels"]["names"] is None and prepared_classes(prepared) == 8
    for split, n in (("train", 600), ("test", 100)):
        y = np.load(prepared / f"target-{split}-y.npy")
        assert y.dtype == np.int64 and y.shape == (n,)
        target = load_prepared(prepared, "target", split)
        assert target.classes == 8 and target.labels is not None
        np.testing.assert_array_equal(target.labels.numpy(), y)
        nearest = ((target.data.numpy()[:, None] - EIGHT_CENTERS[None]) ** 2).sum(-1).argmin(1)
        assert (nearest == y).mean() >= 0.99
        assert load_prepared(prepared, "source", split).labels is None
    train = np.load(prepared / "target-train-y.npy")
    np.testing.assert_allclose(meta["labels"]["frequencies"], np.bincount(train, minlength=8) / 600)
    # rows unchanged by the labels: the unconditional run's rows, byte for byte
    again, _ = prepare(tmp_path / "u", "data.source=moons", "data.target=8gaussians", *SMALL)
    assert (again / "target-train.npy").read_bytes() == (prepared / "target-train.npy").read_bytes()
    # a damaged label file is refused by its sha256
    y = np.load(prepared / "target-test-y.npy")
    y[0] = (y[0] + 1) % 8
    np.save(prepared / "target-test-y.npy", y)
    with pytest.raises(DataError) as e:
        load_prepared(prepared, "target", "test")
    one_line(e, "target-test-y.npy", "sha256")


def test_conditional_digits_prepare(tmp_path: Path) -> None:
    prepared, meta = prepare(tmp_path, "data.target=digits", "data.conditional=true")
    x, y = load_digits()
    by_image = {row.tobytes(): label for row, label in zip(x, y, strict=True)}
    assert meta["labels"]["classes"] == 10 and meta["labels"]["sides"] == ["target"]
    assert meta["features"]["trained_on"] == "labels" and meta["features"]["output_labels"] == list(range(10))
    for split in ("train", "test"):
        d = load_prepared(prepared, "target", split)
        assert d.labels is not None and d.classes == 10
        assert d.labels.tolist() == [by_image[row.tobytes()] for row in d.data.numpy()]


def test_conditional_npz_prepare_and_source_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 2))
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    path = str(tmp_path / "d.npz")
    prepared, meta = prepare(tmp_path, "data.source=file", f"data.source_path={path}", "data.target=file",
                             f"data.target_path={path}")  # auto: the file carries labels
    assert meta["labels"]["sides"] == ["source", "target"] and meta["labels"]["classes"] == 4
    for side in ("source", "target"):
        for split in ("train", "test"):
            d = load_prepared(prepared, side, split)
            assert d.labels is not None
            rows = d.data.numpy()
            np.testing.assert_array_equal(d.labels.numpy(), (rows[:, 0] > 0) + 2 * (rows[:, 1] > 0))
            assert "labels_sha256" in meta[side]["files"][split]
    before = {p.name for p in prepared.iterdir()}
    _, meta = prepare(tmp_path, "data.target=file", f"data.target_path={path}", "data.conditional=false")
    assert "labels" not in meta and before - {p.name for p in prepared.iterdir()} == {
        "source-train.npy", "source-test.npy", "source-train-y.npy", "source-test-y.npy", "target-train-y.npy",
        "target-test-y.npy"}  # no stale label file of the earlier run


def test_conditional_image_folder_trains_the_feature_net_on_labels(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs", {"a": 12, "b": 12}, size=8)
    prepared, meta = prepare(tmp_path, "data.target=file", f"data.target_path={folder}")
    assert meta["labels"]["names"] == ["a", "b"] and meta["labels"]["classes"] == 2
    assert meta["features"]["trained_on"] == "labels" and meta["features"]["output_labels"] == [0, 1]
    assert load_prepared(prepared, "target", "train").labels is not None
