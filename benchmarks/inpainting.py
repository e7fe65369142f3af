"""Inpainting on a finished digits workspace: FlowChef steering (rectflow/steer.py) against baselines.

On the held-out digits (``data/prepared/target-test.npy``) and the three masks of
:func:`rectflow.steer.standard_masks` (bottom half, centre square, 50% random pixels hidden), runs
:func:`rectflow.steer.inpainting_report` with the last flow (``rf2``) and ``rf1`` at 20 Euler steps
and the one-step ``distilled`` student with one correction, all from the same noise. Each row:
masked-region MSE (hidden pixels only, against the true digits) and FD of the completed images to the
training digits (the workspace's frozen feature network, ``data/prepared/features``; FD on the 180
test images is biased upwards: the test digits themselves score the floor, reported as ``truth``).

Baselines on the same hidden pixels: ``unsteered`` (the same models with η = 0: a plain sample from
the same noise, known pixels pasted), ``mean-fill`` (the per-pixel mean of the training digits) and
``nn-fill`` (the training digit nearest on the known pixels, copied into the hole). A sweep of η
for the flow and the student shows how the defaults were chosen.

Run: ``python -m benchmarks.inpainting --workspace /tmp/base`` (writes
``benchmarks/results/inpainting.json`` and ``.png``, prints a markdown table).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "inpainting"
STEPS = 20
SWEEP = (0.1, 0.25, 0.5, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, required=True, help="a finished digits workspace")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    common.set_threads(args.threads)

    import numpy as np
    import torch

    from rectflow.fd import extract_features, frechet_distance, load_feature_net
    from rectflow.imaging import save_grid_png
    from rectflow.models import load_model
    from rectflow.steer import (
        FLOW_STRENGTH,
        STUDENT_STRENGTH,
        inpaint,
        inpaint_one_step,
        inpainting_report,
        masked_mse,
        standard_masks,
    )

    ws = args.workspace
    x_test = torch.from_numpy(np.load(ws / "data/prepared/target-test.npy"))
    train = torch.from_numpy(np.load(ws / "data/prepared/target-train.npy"))
    feat_net = load_feature_net(ws / "data/prepared/features")
    ref = extract_features(feat_net, train.numpy())

    def fd(x: torch.Tensor) -> float:
        return frechet_distance(extract_features(feat_net, x.numpy()), ref)

    nets = {name: load_model(ws / "models" / name)[0] for name in ("rf2", "rf1", "distilled")}
    masks = standard_masks(tuple(x_test.shape[1:]))
    z0 = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(0))  # inpainting_report's seed 0

    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    grid = None
    for teacher in ("rf2", "rf1"):
        t0 = time.perf_counter()
        rep = inpainting_report((teacher, nets[teacher]), ("distilled", nets["distilled"]), x_test, masks, STEPS, fd)
        timings[f"report {teacher}+distilled, 3 masks (s)"] = time.perf_counter() - t0
        rows += [r for r in rep.rows if teacher == "rf2" or r["model"] == teacher]
        grid = rep.grid if grid is None else grid
    assert grid is not None
    n = len(x_test)
    for name, fn in (("rf2", lambda m: inpaint(nets["rf2"], m * x_test, m, z0, STEPS)),
                     ("distilled", lambda m: inpaint_one_step(nets["distilled"], m * x_test, m, z0, 1))):
        best = min(common.timed(fn, masks["half"])[1] for _ in range(3))  # best of 3: the machine is shared
        timings[f"{name} ms per image (n = {n}, best of 3)"] = 1e3 * best / n

    baselines: list[dict[str, Any]] = []
    mean = train.mean(0)
    for mask_name, m in masks.items():
        y, known = m * x_test, m.bool()
        dist = (m * (x_test[:, None] - train[None])).square().flatten(2).sum(-1)  # (n_test, n_train) on known pixels
        fills = {"unsteered rf2": inpaint(nets["rf2"], y, m, z0, STEPS, strength=0.0).x,
                 "unsteered rf1": inpaint(nets["rf1"], y, m, z0, STEPS, strength=0.0).x,
                 "unsteered distilled": inpaint_one_step(nets["distilled"], y, m, z0, 0).x,
                 "distilled, 3 corrections": inpaint_one_step(nets["distilled"], y, m, z0, 3).x,
                 "mean-fill": torch.where(known, x_test, mean),
                 "nn-fill": torch.where(known, x_test, train[dist.argmin(1)])}
        for name, x in fills.items():
            baselines.append({"model": name, "mask": mask_name, "masked_mse": masked_mse(x, x_test, m), "fd": fd(x)})

    sweep: list[dict[str, Any]] = []
    for eta in SWEEP:
        for mask_name, m in masks.items():
            y = m * x_test
            sweep.append({"strength": eta, "mask": mask_name,
                          "rf2": masked_mse(inpaint(nets["rf2"], y, m, z0, STEPS, eta).x, x_test, m),
                          "distilled": masked_mse(inpaint_one_step(nets["distilled"], y, m, z0, 1, eta).x, x_test, m)})

    common.RESULTS.mkdir(parents=True, exist_ok=True)
    png = common.RESULTS / f"{NAME}.png"
    save_grid_png(grid, png, nrow=8, scale=4)
    env = common.environment()
    out = {"environment": env, "workspace": str(ws), "n_test": n, "steps": STEPS, "seed": 0,
           "strength": {"flow": FLOW_STRENGTH, "student": STUDENT_STRENGTH}, "fd_truth": fd(x_test),
           "rows": rows, "baselines": baselines, "sweep": sweep, "timings": timings,
           "grid": f"{png.name}: per mask (half, centre, random) 4 rows of 8 test digits: truth, masked input, "
                   "rf2 (20 steps), distilled (1 correction)"}
    table = [[r["model"], r["mask"], r.get("nfe", ""), f"{r['masked_mse']:.4f}", f"{r['fd']:.2f}"]
             for r in sorted(rows + baselines, key=lambda r: (r["mask"], r["masked_mse"]))]
    md = "\n".join([
        "## Inpainting on digits (FlowChef steering)", "",
        f"`python -m benchmarks.inpainting --workspace {ws}`. " + common.env_lines(env), "",
        f"{n} held-out digits, masks of `rectflow.steer.standard_masks` (bottom half, centre square, 50% random "
        "pixels hidden); masked MSE over the hidden pixels only; FD of the completions to the training digits "
        f"(the workspace's feature network; the true test digits score **{out['fd_truth']:.2f}**, the floor at "
        f"this sample size). Flows: {STEPS} steered Euler steps, η = {FLOW_STRENGTH:g}; the student: one "
        f"correction, η = {STUDENT_STRENGTH:g}. Baselines on the same pixels: unsteered samples from the same "
        "noise, the training mean, the nearest training digit on the known pixels.", "",
        common.md_table(["model", "mask", "NFE", "masked MSE", "FD"], table), "",
        "η sweep (masked MSE):", "",
        common.md_table(["η", "mask", "rf2, 20 steps", "distilled, 1 correction"],
                        [[s["strength"], s["mask"], f"{s['rf2']:.4f}", f"{s['distilled']:.4f}"] for s in sweep]),
        "", "Timings: " + "; ".join(f"{k}: {v:.3g}" for k, v in timings.items()) + ".", "",
        f"![inpainting examples](benchmarks/results/{png.name}) (per mask: truth, masked input, rf2, distilled)",
    ])
    common.publish(NAME, out, md, quick=False)
    print(png)

if __name__ == "__main__":
    main()
