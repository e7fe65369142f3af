"""Params resolved once, by key presence: defaults < profile < params.yaml < --set (rectflow/params.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rectflow.config import Params, ParamsError
from rectflow.params import PROFILES_DIR, read_yaml, resolve

PROFILE = read_yaml(PROFILES_DIR / "images.yaml")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_the_images_profile_applies_to_image_targets_only_and_says_so(tmp_path):
    path = _write(tmp_path, "data: {target: digits}\n")
    res = resolve(path)
    assert res.profile == "images" and "auto" in res.note() and "image" in res.note()
    assert res.params.pretrain.batch_size == PROFILE["pretrain"]["batch_size"] == 128
    assert res.params.couple.reflowed.n_pairs == PROFILE["couple"]["reflowed"]["n_pairs"]
    moons = resolve(_write(tmp_path, "data: {target: moons}\n"))
    assert moons.profile is None and moons.params.pretrain.batch_size == Params().pretrain.batch_size


def test_a_key_that_is_named_wins_even_at_its_default_value(tmp_path):
    """The old budget counted a stage value equal to the built-in default as unset."""
    default = Params().pretrain.batch_size
    path = _write(tmp_path, f"data: {{target: digits}}\npretrain: {{batch_size: {default}}}\n")
    assert resolve(path).params.pretrain.batch_size == default
    assert resolve(_write(tmp_path, "data: {target: digits}\n"), [f"pretrain.batch_size={default}"]).params.pretrain.batch_size == default


def test_nested_sections_merge_key_by_key_and_lists_replace(tmp_path):
    path = _write(tmp_path, "data: {target: digits}\ncouple: {reflowed: {steps: 30}}\n"
                            "evaluate: {grid: [{models: flows, solver: euler, steps: [3]}]}\n")
    p = resolve(path).params
    assert p.couple.reflowed.steps == 30  # the user's
    assert p.couple.reflowed.n_pairs == PROFILE["couple"]["reflowed"]["n_pairs"]  # the profile's
    assert [e.steps for e in p.evaluate.grid] == [[3]]
    assert p.evaluate.n_samples == PROFILE["evaluate"]["n_samples"]


def test_overrides_win_over_params_yaml_and_profile_none_turns_it_off(tmp_path):
    path = _write(tmp_path, "data: {target: digits}\npretrain: {batch_size: 64}\n")
    assert resolve(path, ["pretrain.batch_size=1024"]).params.pretrain.batch_size == 1024
    off = resolve(path, ["profile=none"])
    assert off.profile is None and off.params.pretrain.batch_size == 64 and off.params.distill.batch_size == 1024


def test_a_profile_file_by_path(tmp_path):
    prof = tmp_path / "mine.yaml"
    prof.write_text("pretrain: {steps: 7}\n")
    p = resolve(_write(tmp_path, f"profile: {prof}\n")).params
    assert p.pretrain.steps == 7


@pytest.mark.parametrize("doc, needle", [
    ("images: {pretrain: {steps: 3}}\n", "images: the images budget is the profile"),
    ("profile: nosuch\n", "profile: 'nosuch' not found"),
    ("data: {target: digits}\ndata: {target: moons}\n", "duplicate key 'data' at line 2"),
    ("pretrain: {steps: true}\n", "pretrain.steps: Input should be a valid integer"),
    ("model: {hidden: yes}\n", "model.hidden: Input should be a valid integer"),
    ("pretrain: {steps: 0.5}\n", "pretrain.steps: Input should be a valid integer"),
    ("model: {attention: 1}\n", "model.attention: Input should be a valid boolean"),
])
def test_bad_documents_are_one_line(tmp_path, doc, needle):
    with pytest.raises(ParamsError) as e:
        resolve(_write(tmp_path, doc))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_1_2_scalars(tmp_path):
    p = resolve(_write(tmp_path, "pretrain: {lr: 1e-3, weight_decay: 0}\n")).params
    assert p.pretrain.lr == 1e-3 and isinstance(p.pretrain.lr, float) and p.pretrain.weight_decay == 0.0


def test_a_bad_profile_key_names_the_profile_file(tmp_path):
    prof = tmp_path / "bad.yaml"
    prof.write_text("pretrain: {stpes: 7}\n")
    with pytest.raises(ParamsError, match=r"profile .*bad.yaml.*pretrain.stpes: unknown key"):
        resolve(_write(tmp_path, f"profile: {prof}\n"))
    prof.write_text("data: {target: moons}\n")
    with pytest.raises(ParamsError, match="data: a profile cannot set it"):
        resolve(_write(tmp_path, f"profile: {prof}\n"))


def test_a_check_across_sections_that_fails_only_with_the_profile_says_so(tmp_path):
    with pytest.raises(ParamsError, match=r"couple.reflowed: 20 steps > bellman.grid_points \(10\).*images profile"):
        resolve(_write(tmp_path, "data: {target: digits}\nbellman: {grid_points: 10}\ndistill: {pairs_round: null}\n"))
    # with the profile's own distill.pairs_round (1) no round 2 is made, and its settings are not checked
    assert resolve(_write(tmp_path, "data: {target: digits}\nbellman: {grid_points: 10}\n")).params.distill.pairs_round == 1


def test_resolved_digits_params_are_the_images_profile(root):
    """The default digits run resolves to the images profile's values (round 1: 40k bf16 midpoint pairs;
    round 2: its own solver, Euler, not round 1's midpoint)."""
    p = resolve(root / "params.yaml", ["data.target=digits"]).params
    assert (p.pretrain.steps, p.pretrain.batch_size, p.pretrain.lr, p.pretrain.precision) == (4000, 128, 5e-4, "bf16")
    c = p.couple
    assert (c.n_pairs, c.solver, c.steps, c.precision, c.shard_size) == (40_000, "midpoint", 16, "bf16", 2500)
    r2 = p.couple.for_round(2)
    assert (r2.n_pairs, r2.solver, r2.steps, r2.precision, r2.schedule) == (120_000, "euler", 20, "bf16", "bellman")
    assert (p.reflow.lr, p.reflow.time_dist, p.reflow.loss) == (2e-4, "u_shaped", "pseudo_huber")
    assert (p.distill.lr, p.distill.adversarial.weight, p.evaluate.rtol, p.bellman.n_samples) == (1e-4, 0.01, 1e-4, 256)


def test_digits_trains_with_the_batch_size_the_user_names(tmp_path, root):
    """Through the real CLI: `--set pretrain.batch_size=1024` on digits trains with 1024 (the images
    profile's 128 does not win over a named key), as the stage's record states."""
    import json
    import shutil
    import subprocess
    import sys

    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    common = ["--set", "data.target=digits", "--set", "pretrain.steps=2", "--set", "pretrain.log_every=1",
              "--set", "pretrain.checkpoint_every=1", "--set", "bellman.n_samples=16"]
    for stage, extra in (("prepare", []), ("pretrain", ["--set", "pretrain.batch_size=1024"])):
        r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", stage, *common, *extra], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "metrics/pretrain.json").read_text())
    assert rec["batch_size"] == 1024 and rec["lr"] == 5e-4  # the named key, and the profile's lr
