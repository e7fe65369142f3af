"""Conditional generation (#16): the guidance-input student against dedicated students, and the
cost of guided coupling against plain batched forwards.

1. **Students** on N(0, I) → 8gaussians conditioned on the mode, per seed: prepare and pretrain once
   (a conditional rf1 with label dropout), then three chains from that rf1: pairs guided at w = 1
   and at w = 3 (each with its own rf2 and one-step student, "dedicated"), and pairs each at its
   own w ~ U(distill.guidance_range) with rf2 and the student taking w as input
   (``distill.guidance_input``). Every student is sampled at 1 NFE with labels i mod 8: the
   guidance-input one told w = 1 and w = 3, a dedicated one as it is (its pairs' scale is learned;
   no guidance on top). W2 against the held-out points and the share of samples nearest their
   requested mode.
2. **Guided couple cost**: ``tasks.couple.solve_pairs`` at w = 2 (both branches, one batched forward
   of 2B rows per step) against a bare loop of the same number of network forwards of 2B rows,
   for the MLP and the digits U-Net, under ``torch.inference_mode``.

Run: ``python -m benchmarks.conditional [--quick] [--seeds 0 1 2]``; results go to
``benchmarks/results/conditional.json`` and the section below in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

NAME = "conditional"
CHAINS = {"dedicated w=1": ["couple.guidance=1.0"], "dedicated w=3": ["couple.guidance=3.0"],
          "guidance input": ["distill.guidance_input=true", "distill.guidance_range=[0.0, 5.0]"]}


def _base(quick: bool) -> list[str]:
    steps = (200, 150, 150, 4000) if quick else (2000, 1500, 1500, 20000)
    return ["data.target=8gaussians", "data.conditional=true", f"data.n_train={steps[3]}", "data.n_test=5000",
            f"pretrain.steps={steps[0]}", "pretrain.batch_size=512", "pretrain.log_every=100",
            f"couple.n_pairs={steps[3]}", f"couple.shard_size={steps[3] // 2}", "couple.solver=euler",
            "couple.steps=100", f"reflow.steps={steps[1]}", "reflow.batch_size=512", f"distill.steps={steps[2]}",
            "distill.batch_size=512", "bellman.n_samples=256", "bellman.grid_points=20"]


@torch.inference_mode()
def _student(ws: Path, w: float, n: int = 5000) -> dict[str, float]:
    """W2 and nearest-mode accuracy of ``models/distilled`` at 1 NFE, labels i mod 8, scale ``w``."""
    from rectflow import metrics
    from rectflow.data import EIGHT_CENTERS, load_prepared
    from rectflow.guidance import Guided
    from rectflow.models import load_model
    from rectflow.solvers import solve

    model, _ = load_model(ws / "models" / "distilled")
    z0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(4242))
    y = torch.arange(n) % 8
    x = solve(Guided(model, y, w), z0, "euler", 1).x
    centres = torch.as_tensor(EIGHT_CENTERS, dtype=torch.float32)
    nearest = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    test = load_prepared(ws / "data" / "prepared", "target", "test").data
    return {"w2": metrics.w2(x, test[:n]), "mode_accuracy": float((nearest == y).float().mean())}  # type: ignore[index]


def students(seed: int, quick: bool, tmp: Path) -> dict[str, Any]:
    over = _base(quick) + [f"seed={seed}"]
    base = tmp / f"base-{seed}"
    for stage in ("prepare", "pretrain"):
        common.run_stage(stage, base, over)
    out: dict[str, Any] = {}
    for chain, extra in CHAINS.items():
        ws = tmp / f"{chain.replace(' ', '-').replace('=', '')}-{seed}"
        shutil.copytree(base, ws, ignore=shutil.ignore_patterns(".rectflow"))
        t0 = time.perf_counter()
        for stage in ("couple", "reflow", "distill"):
            common.run_stage(stage, ws, over + extra)
        if chain == "guidance input":  # one student, told the scale
            out[chain] = {f"w{w:g}": _student(ws, w) for w in (1.0, 3.0)}
        else:  # a dedicated student learned its pairs' scale: it runs at w = 1 (no guidance on top)
            out[chain] = {f"w{chain[-1]}": _student(ws, 1.0)}
        out[chain]["seconds"] = time.perf_counter() - t0
    return out


@torch.inference_mode()
def couple_cost(quick: bool) -> list[dict[str, Any]]:
    """Seconds of solve_pairs at w = 2 against a bare loop of the same forwards of 2B rows."""
    from rectflow.config import validate
    from rectflow.nets import build_model
    from tasks.couple import solve_pairs

    rows = []
    cases = [("mlp", {"kind": "mlp", "shape": [2], "hidden": 256, "depth": 3, "time_embed": 64, "classes": 8},
              20000 if not quick else 2000, 20),
             ("unet (digits)", {"kind": "unet", "shape": [1, 8, 8], "channels": 32, "channel_mult": [1, 2],
                                "attention": True, "time_embed": 64, "dropout": 0.0, "classes": 10},
              2500 if not quick else 250, 10 if not quick else 2)]
    for name, arch, n, steps in cases:
        torch.manual_seed(0)
        model = build_model(arch).eval()
        p = validate({"couple": {"batch_size": n, "solver": "euler", "steps": steps}})
        z0 = torch.randn(n, *arch["shape"])
        y = torch.arange(n) % arch["classes"]
        solve_pairs(model, z0[: max(1, n // 10)], p, torch.device("cpu"), y=y[: max(1, n // 10)], guidance=2.0)  # warm
        best_guided, best_bare = float("inf"), float("inf")
        z2, y2 = torch.cat([z0, z0]), torch.cat([y, torch.full_like(y, arch["classes"])])
        for _ in range(3):
            t0 = time.perf_counter()
            _, nfe = solve_pairs(model, z0, p, torch.device("cpu"), y=y, guidance=2.0)
            best_guided = min(best_guided, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for k in range(steps):
                model(z2, torch.full((2 * n,), k / steps), y=y2)
            best_bare = min(best_bare, time.perf_counter() - t0)
        rows.append({"network": name, "rows": n, "steps": steps, "nfe": nfe, "guided_s": best_guided,
                     "bare_2b_forwards_s": best_bare, "ratio": best_guided / best_bare})
    return rows


def markdown(data: dict[str, Any]) -> str:
    env = data["env"]
    seeds = sorted(data["students"], key=int)
    lines = [f"## Conditional generation: guidance-input student and guided couple cost (#16)", "",
             common.env_lines(env), "", "Command: `python -m benchmarks.conditional --seeds "
             + " ".join(seeds) + "`.", "",
             "One-step students on N(0, I) → 8gaussians (labels: the modes), 1 NFE, 5,000 samples, labels i mod 8; "
             "W2 against 5,000 held-out points, mode accuracy = share nearest their requested mode (mean ± std "
             "over seeds).", ""]
    table = []
    for chain in CHAINS:
        for w in ("w1", "w3"):
            vals = [data["students"][s][chain].get(w) for s in seeds]
            if not all(vals):
                continue
            table.append([chain, w[1:], common.fmt_pm([v["w2"] for v in vals], 4),
                          common.fmt_pm([v["mode_accuracy"] for v in vals], 4),
                          common.fmt_pm([data["students"][s][chain]["seconds"] for s in seeds], 0)])
    lines.append(common.md_table(["student", "w", "W2", "mode accuracy", "couple + reflow + distill, s"], table))
    ratios = []
    for w, dedicated in (("w1", "dedicated w=1"), ("w3", "dedicated w=3")):
        for s in seeds:
            gi, de = data["students"][s]["guidance input"][w], data["students"][s][dedicated][w]
            ratios.append([w[1:], s, f"{gi['w2'] / de['w2']:.3f}", f"{gi['mode_accuracy'] / de['mode_accuracy']:.4f}"])
    lines += ["", "Guidance-input student over the dedicated one, per seed:", "",
              common.md_table(["w", "seed", "W2 ratio", "accuracy ratio"], ratios), "",
              "Guided couple (w = 2: one forward of 2B rows per step) against a bare loop of the same forwards:", "",
              common.md_table(["network", "rows B", "steps", "NFE (forwards)", "guided s", "bare 2B forwards s", "ratio"],
                              [[r["network"], r["rows"], r["steps"], r["nfe"], f"{r['guided_s']:.3f}",
                                f"{r['bare_2b_forwards_s']:.3f}", f"{r['ratio']:.3f}"] for r in data["couple_cost"]])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conditional", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    data: dict[str, Any] = {"env": common.environment(), "students": {}, "couple_cost": couple_cost(args.quick)}
    with tempfile.TemporaryDirectory(prefix="rectflow-cond-") as tmp:
        for seed in args.seeds:
            data["students"][str(seed)] = students(seed, args.quick, Path(tmp))
            common.write_result(NAME, data, args.quick)
    common.publish(NAME, data, markdown(data), args.quick)
    return data


if __name__ == "__main__":
    main()
