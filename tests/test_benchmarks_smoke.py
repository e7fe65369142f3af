"""The quality benchmark's core (one task, one seed, every method) on a tiny setting: it runs and
its numbers are sane. The real figures come from ``make bench`` (BENCHMARKS.md)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.quality_2d import METHODS, QualityConfig, aggregate, markdown, run_task  # noqa: E402

TINY = QualityConfig(
    tasks=("gaussian:moons",), seeds=(0,), steps=150, batch=128, hidden=32, depth=2,
    n_train=3000, n_test=400, n_pairs=600, couple_solver="euler", couple_steps=20, n_eval=300,
    nfes=(1, 100), rk45=False, bellman_ks=(2,), bellman_samples=300,
)


def _have_peers() -> bool:
    try:
        import flow_matching  # noqa: F401
        import torchcfm  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.timeout(120)
def test_quality_core_runs_and_is_sane(tmp_path):
    import dataclasses

    cfg = TINY if _have_peers() else dataclasses.replace(TINY, peers=())
    common.set_threads(1)
    r = run_task("gaussian:moons", 0, cfg, tmp_path)
    w2 = {(row["method"], row["nfe"]): row["w2"] for row in r["rows"]}
    assert all(math.isfinite(v) and v > 0 for v in w2.values())
    # a 1-RF needs many steps: 100 Euler steps beat one on the curved Gaussian → moons flow
    assert w2[("1-RF", "100")] < w2[("1-RF", "1")]
    # reflow straightens: one step of 2-RF beats one step of 1-RF; the student lands near its teacher
    assert w2[("2-RF", "1")] < w2[("1-RF", "1")]
    assert w2[("2-RF + distill", "1")] < w2[("1-RF", "1")]
    assert ("2-RF + Bellman", "2") in w2 and ("1-RF + Bellman", "2") in w2
    assert r["floor_w2"] > 0 and r["floor_w2"] < w2[("1-RF", "1")]
    sched = r["schedules"]["rf2"]["2"]
    assert sched[0] == 0.0 and sched[-1] == 1.0 and sched[0] < sched[1] < sched[2]
    assert r["seconds"]["rectflow_chain"] > 0
    if cfg.peers:
        assert ("OT-CFM (torchcfm)", "1") in w2 and ("FM (flow_matching)", "100") in w2
        assert w2[("I-CFM (torchcfm)", "100")] < w2[("I-CFM (torchcfm)", "1")]
    # the report is built from these results without error
    raw = {"results": [r], "wall_seconds": 1.0, "jobs": 1, "threads_per_job": 2}
    agg = aggregate(raw)
    acc = agg["tasks"]["gaussian:moons"]["acceptance"]
    assert acc["ratio"] > 0
    md = markdown(agg, cfg, raw, common.environment(), "python -m benchmarks.quality_2d")
    assert "N→moons" in md and all(m in METHODS for m in agg["tasks"]["gaussian:moons"]["w2"])


def test_bench_section_replacement(tmp_path, monkeypatch):
    md = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(common, "BENCHMARKS_MD", md)
    common.write_section("a", "first A")
    common.write_section("b", "first B")
    common.write_section("a", "second A")
    text = md.read_text()
    assert "second A" in text and "first A" not in text and "first B" in text
    assert text.index("bench:a") < text.index("bench:b")


@pytest.mark.timeout(300)
def test_ablation_digits_quick(tmp_path, monkeypatch):
    """The digits reflow ablation, smoke-sized: 2 time distributions × 2 losses × 2 seeds, FD at
    NFE 1 and 2 from a shared workspace whose own rf2 is never written; results go to the quick JSON."""
    import json

    from benchmarks import ablation_digits

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    monkeypatch.setenv("RECTFLOW_THREADS", "1")
    work = tmp_path / "work"
    data = ablation_digits.main(["--quick", "--work-dir", str(work)])
    res = data["result"]
    cells = res["cells"]
    assert len(cells) == 8
    assert {(c["time_dist"], c["loss"]) for c in cells} == {
        (td, loss) for td in ("uniform", "u_shaped") for loss in ("l2", "pseudo_huber")}
    assert sorted(c["seed"] for c in cells) == [0, 0, 0, 0, 1, 1, 1, 1]
    for c in cells:
        assert c["reflow"]["time_dist"] == c["time_dist"] and c["reflow"]["loss"] == c["loss"]
        assert c["reflow"]["steps"] == 20 and c["train"]["train_seconds"] > 0
        assert sorted(r["nfe"] for r in c["rows"]) == [1, 2]
        assert all(math.isfinite(r["fd"]) and r["fd"] >= 0 and math.isfinite(r["w2"]) for r in c["rows"])
        assert (work / "cells" / f"{c['time_dist']}-{c['loss']}-s{c['seed']}" / "models" / "rf2.safetensors").is_file()
    # each cell trained its own rf2; the seeds differ; the shared workspace's rf2 was never written
    assert len({c["train"]["sha256"] for c in cells}) == 8
    assert not (work / "base" / "models" / "rf2.json").exists()
    assert len(res["fd_net_sha256"]) == 64
    assert [r["nfe"] for r in res["reference"]["rf1"]] == [1, 2, 100]
    assert math.isfinite(res["reference"]["floor"]["fd"]) and res["reference"]["floor"]["fd"] >= 0
    summ = data["summary"]
    assert set(summ) == {"uniform/l2", "uniform/pseudo_huber", "u_shaped/l2", "u_shaped/pseudo_huber"}
    for a in summ.values():
        assert set(a["fd"]) == {"1", "2"} and all(len(v) == 2 for v in a["fd"].values())
    # quick: NAME.quick.json only, BENCHMARKS.md untouched
    saved = json.loads((tmp_path / "results" / "ablation_digits.quick.json").read_text())
    assert len(saved["result"]["cells"]) == 8
    assert not (tmp_path / "results" / "ablation_digits.json").exists()
    assert not (tmp_path / "BENCHMARKS.md").exists()
    assert "| uniform | l2 |" in ablation_digits.markdown(data)


@pytest.mark.timeout(300)
def test_students_quick(tmp_path, monkeypatch):
    """The students benchmark, smoke-sized: every method's row on the same pairs, the small ones
    under a quarter of the teacher's parameters; results go to the quick JSON only."""
    import json

    from benchmarks import students

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    monkeypatch.setenv("RECTFLOW_THREADS", "1")
    data = students.main(["--quick", "--seeds", "0"])
    rows = {r["student"]: r for r in data["runs"][0]["rows"]}
    assert set(rows) == {"regression (teacher size)", "regression (small)", "slimflow (small)", "meanflow (small)",
                         "meanflow (teacher size)"}
    assert rows["slimflow (small)"]["method"] == "slimflow" and rows["meanflow (small)"]["method"] == "meanflow"
    assert rows["regression (teacher size)"]["init"] == "teacher" and rows["regression (small)"]["init"] == "random"
    for label, r in rows.items():
        assert math.isfinite(r["w2_1"]) and r["latency_ms_b1"] > 0 and r["bytes"] > 0
        assert (r["param_ratio"] <= 0.25) == ("small" in label)
    assert rows["meanflow (small)"]["params"] == rows["regression (small)"]["params"]
    assert json.loads((tmp_path / "results" / "students.quick.json").read_text())["aggregate"]
    assert not (tmp_path / "BENCHMARKS.md").exists()
    assert "| slimflow (small) |" in students.markdown(data)


def test_students_overrides_reach_only_the_trained_rows():
    """--set lands after each trained row's own overrides (so it wins); the reused workspace's
    student is taken as it is; a --set outside distill, or a bad --label, is one argparse line."""
    from benchmarks import students

    cfg = students.StudentsConfig(target="digits", small=students.SMALL["digits"], reuse="/ws",
                                  only=["regression (teacher size)", "regression (small)"],
                                  overrides=["distill.adversarial.weight=0.05"])
    rows = dict(students.students(cfg))
    assert rows["regression (teacher size)"] is None
    assert rows["regression (small)"][-1] == "distill.adversarial.weight=0.05"
    assert rows["regression (small)"][0] == "distill.student={channels: 16, attention: false}"
    online = students.students(students.StudentsConfig(target="digits", small=students.SMALL["digits"],
                                                       only=["online (small)"]))
    assert [label for label, _ in online] == ["regression (teacher size)", "online (small)"]  # its teacher first
    assert online[1][1][-1] == f"distill.teacher_model={students.TEACHER_STEM}"
    assert "online (small)" not in dict(students.students(students.StudentsConfig(target="digits")))  # asked by name
    for argv in (["--set", "pretrain.steps=3"], ["--set", "distill.lr"], ["--set", "distill.no_such_key=1"],
                 ["--set", "distill.lr=-1"], ["--label", "Bad Label"]):
        with pytest.raises(SystemExit) as e:
            students.main(argv)
        assert e.value.code == 2


@pytest.mark.timeout(120)
def test_unet_benchmark_quick(tmp_path, monkeypatch):
    """The U-Net benchmark, smoke-sized: peaks, FLOPs per sample, every eager variant and the loop
    comparison; MFU cells and the loop ratio are finite; results go to the quick JSON only."""
    import json

    from benchmarks import unet

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    data = unet.main(["--quick", "--batches", "16", "--fwd-batch", "32"])
    assert data["flops"]["train"] > 2 * data["flops"]["forward"] > 0  # backward ≈ 2× forward
    assert data["flops"]["params"] == 485_185  # the images profile's U-Net
    assert {(v["precision"], v["channels_last"], v["compiled"]) for v in data["variants"]} == {
        (p, cl, False) for p in ("fp32", "bf16") for cl in (False, True)}
    assert all(v["forward_samples_per_s"] > 0 and v["train"]["16"]["samples_per_s"] > 0 for v in data["variants"])
    assert [(r["batch"], r["precision"]) for r in data["loops"]] == [(16, "fp32"), (16, "bf16")]
    assert all(0 < r["fraction_of_bare"] < 10 for r in data["loops"])
    assert "| fp32 | NCHW | eager |" in unet.markdown(data)
    assert json.loads((tmp_path / "results" / "unet.quick.json").read_text())["peaks"]["conv_bf16"] > 0
    assert not (tmp_path / "BENCHMARKS.md").exists()


@pytest.mark.timeout(120)
def test_throughput_training_loops_quick():
    """The MLP training comparison (benchmarks.common's shared loops), smoke-sized: both loops run
    for each precision in interleaved rounds and every figure is a positive rate."""
    import dataclasses

    from benchmarks import throughput

    cfg = dataclasses.replace(throughput.ThroughputConfig(), train_settings=[(32, 2, 64)], train_steps=10,
                              repeats=2, bf16=True)
    rows = throughput.training_benchmark(cfg)
    assert [(r["hidden"], r["precision"]) for r in rows] == [(32, "fp32"), (32, "bf16")]
    assert all(len(r["bare_all"]) == len(r["train_all"]) == 2 for r in rows)
    assert all(x > 0 for r in rows for x in r["bare_all"] + r["train_all"])


def test_fd_noise_subset_figures_against_closed_form():
    """FD between N(0, I) and N(μ, I) in 4 dims is |μ|² = 4 (for μ = 1): the large-sample figure is
    close to it, every subset is scored on the same rows of each model, the reference's ratios are 1."""
    import numpy as np

    from benchmarks.fd_noise import subset_figures

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((20_000, 4))
    feats = {"same": rng.standard_normal((8_000, 4)), "shifted": rng.standard_normal((8_000, 4)) + 1.0}
    out = subset_figures(feats, ref, 2_000, "same")
    assert abs(out["same"]["fd_all"]) < 0.02 and abs(out["shifted"]["fd_all"] - 4.0) < 0.15
    assert len(out["shifted"]["fd_subsets"]) == 4 and out["same"]["ratio_subsets"] == [1.0] * 4
    assert out["shifted"]["ratio_all"] == out["shifted"]["fd_all"] / out["same"]["fd_all"]
    # FD∞: fitted on subsets of 2,000, 4,000 and 8,000; the finite-sample bias (~ trace terms / m) goes
    assert out["same"]["fd_inf_sizes"] == [2_000, 4_000, 8_000]
    assert abs(out["same"]["fd_inf"]) < abs(out["same"]["fd_subsets"][0]) and abs(out["same"]["fd_inf"]) < 0.01
    assert abs(out["shifted"]["fd_inf"] - 4.0) < 0.15 and out["same"]["ratio_inf"] == 1.0
    with pytest.raises(ValueError, match="fewer than one subset"):
        subset_figures({"same": feats["same"][:10]}, ref, 2_000, "same")


def test_workspace_benchmarks_refuse_bad_workspaces_with_one_line(tmp_path, capsys):
    """fd_noise and students --reuse check every workspace before their first (minutes-long)
    measurement: a missing file or a run of the wrong seed is one line naming it, exit 2."""
    from benchmarks import fd_noise, students

    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(SystemExit) as e:
        fd_noise.main(["--workspaces", str(ws), "--quick"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "params.resolved.yaml is missing" in err and str(ws) in err
    (ws / "params.resolved.yaml").write_text("seed: 1\ndata: {target: digits}\n")
    with pytest.raises(SystemExit) as e:
        students.main(["--target", "digits", "--seeds", "0", "--reuse", str(ws), "--quick"])
    assert e.value.code == 2
    assert "a run of seed 1, not of seed 0" in capsys.readouterr().err
    (ws / "params.resolved.yaml").write_text("seed: [\n")
    with pytest.raises(SystemExit) as e:
        students.main(["--target", "digits", "--seeds", "0", "--reuse", str(ws), "--quick"])
    assert e.value.code == 2 and "params.resolved.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        fd_noise.main(["--workspaces", str(tmp_path / "nope")])
    assert e.value.code == 2 and "not a directory" in capsys.readouterr().err
    from benchmarks import reflow_fit

    with pytest.raises(SystemExit) as e:
        reflow_fit.main(["--workspace", str(ws)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--workspace " in err and "data/prepared/features.safetensors is missing" in err
    with pytest.raises(SystemExit) as e:
        fd_noise.main(["--workspaces", str(ws), "--label", "Bad label"])
    assert e.value.code == 2 and "--label 'Bad label'" in capsys.readouterr().err


def test_fd_noise_feature_cache_round_trips_by_key(tmp_path, monkeypatch):
    """The feature cache: made once per key (then read back bit for bit), remade with use_cache off,
    written through a temporary name that does not stay behind."""
    import numpy as np

    from benchmarks import fd_noise

    monkeypatch.setattr(fd_noise, "CACHE", tmp_path / "cache")
    calls = []

    def make():
        calls.append(1)
        return np.arange(12, dtype=np.float32).reshape(3, 4) * len(calls)

    a = fd_noise.cached_features("k1", make)
    b = fd_noise.cached_features("k1", make)
    assert len(calls) == 1 and np.array_equal(a, b) and b.dtype == np.float32
    c = fd_noise.cached_features("k1", make, use_cache=False)
    assert len(calls) == 2 and np.array_equal(c, 2 * a)
    fd_noise.cached_features("k2", make)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1.npy", "k2.npy"]


def test_reflow_fit_markdown_renders_only_the_parts_run():
    """reflow_fit --parts: a run of one part publishes that part's table alone (no KeyError on the
    parts not run), with the rf2 ÷ rf1 column of the reconstruction part as computed."""
    from benchmarks import reflow_fit

    env = common.environment()
    rows = [{"data": "held-out target rows", "n": 3, "steps": 4, "rf1": 0.1, "rf2": 0.02, "ratio": 0.2}]
    md = reflow_fit.markdown({"seed": 0, "label": None, "env": env, "command": "x", "fit": None, "accuracy": None,
                              "reconstruction": {"n": 3, "rows": rows}})
    assert "| held-out target rows | 4 | 0.1 | 0.02 | 0.200 |" in md
    assert "FD, pairs' noise" not in md and "Round-1 solvers" not in md
    with pytest.raises(SystemExit) as e:
        reflow_fit.main(["--workspace", "/nonexistent", "--parts", "nothing"])
    assert e.value.code == 2


def test_fd_noise_conditional_model_gets_evaluate_labels_and_scale(tmp_path, monkeypatch):
    """A conditional model in fd_noise generates row i for label i mod K (evaluate's labels), at
    evaluate's guidance scale (rf1: couple.guidance), and is cached apart from other scales; 5,003
    rows cross the 2,500-row chunks, which stay a multiple of K."""
    import numpy as np
    import torch

    from benchmarks import fd_noise
    from rectflow.config import Params
    from rectflow.guidance import Guided
    from rectflow.nets import build_model, save_model

    monkeypatch.setattr(fd_noise, "CACHE", tmp_path / "cache")
    monkeypatch.setattr("rectflow.fd.extract_features", lambda net, x: x.reshape(len(x), -1))
    arch = {"kind": "mlp", "shape": [2], "hidden": 16, "depth": 2, "time_embed": 8, "classes": 3}
    torch.manual_seed(0)
    net = build_model(arch)
    save_model(tmp_path / "rf1", net.state_dict(), arch, {"role": "flow"})
    z = torch.randn(5003, 2)
    p = Params.model_validate({"couple": {"guidance": 2.0}})
    got, nfe = fd_noise.model_features(tmp_path / "rf1", z, 1, None, "0" * 64, p=p)
    y = torch.arange(5003) % 3
    with torch.inference_mode():
        want = z + Guided(net, y, 2.0)(z, torch.zeros(5003))
    assert nfe == 1 and np.allclose(got, want.numpy(), atol=1e-6)
    at_one, _ = fd_noise.model_features(tmp_path / "rf1", z, 1, None, "0" * 64)  # no params: w = 1
    with torch.inference_mode():
        assert np.allclose(at_one, (z + Guided(net, y, 1.0)(z, torch.zeros(5003))).numpy(), atol=1e-6)
    assert sorted(f.name.split("-w")[-1] for f in (tmp_path / "cache").iterdir()) == ["1.npy", "2.npy"]
