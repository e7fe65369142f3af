"""Running the flow backwards: reconstruction against NFE, and 2-RF++ inversion pairs (issue #18).

For each task and seed, one workspace runs ``rectflow run`` three times: with ``couple.source``
``noise`` (the default recipe), ``inversion`` (every pair is a real training row and its inversion by
the round's flow) and ``mixed`` (``couple.inversion_fraction`` 0.5). Only couple and what follows
rerun: rf1 is the same flow in all three. Reported per run: rf2's and the one-step student's W2
(and FD for images) at 1 NFE, the student's ratio to rf1 at 100 Euler steps, rf2's straightness,
the stage times, and evaluate's reconstruction table (invert the held-out data, regenerate it, at
equal NFE) for rf1 and rf2 with Euler, Heun, midpoint and RK45.

Run: ``python -m benchmarks.inversion [--quick] [--tasks moons digits] [--seeds 0 1 2]``. Each run
uses the snapshot's own code (``PYTHONPATH`` = the workspace), so editing the tree meanwhile is safe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.overhead import clone_worktree, rectflow_cmd

NAME = "inversion"
MODES = ("noise", "inversion", "mixed")
STAGES = ("prepare", "pretrain", "couple", "reflow", "distill", "quantize", "evaluate")


@dataclass(frozen=True)
class InversionConfig:
    tasks: tuple[str, ...] = ("moons", "digits")
    seeds: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"moons": (0, 1, 2), "digits": (0,)})
    extra: tuple[str, ...] = ()
    keep: str | None = None  # a folder to keep the workspaces in (else a temporary one)


def _quick() -> InversionConfig:
    from tests.support.tiny import TINY

    grid = "evaluate.grid=[{models: flows, solver: euler, steps: [1, 4, 100]}, {models: students, solver: euler}]"
    return InversionConfig(tasks=("moons",), seeds={"moons": (0,)}, extra=(*TINY, grid))


def _run(ws: Path) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(ws)}
    r = subprocess.run([*rectflow_cmd(), "run"], cwd=ws, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"rectflow run in {ws} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]), seconds


def _figures(ws: Path, res: dict[str, Any], seconds: float) -> dict[str, Any]:
    ev = json.loads((ws / "metrics" / "eval.json").read_text())
    summ = json.loads((ws / "metrics" / "evaluate.json").read_text())

    def row(model: str, nfe: int) -> dict[str, Any]:
        return next(r for r in ev["rows"] if r["model"] == model and r["solver"] == "euler" and r["nfe"] == nfe
                    and r.get("schedule", "uniform") == "uniform")

    out: dict[str, Any] = {"seconds": round(seconds, 1), "executed": res["executed"]}
    for key, (model, nfe) in {"rf1_100": ("rf1", 100), "rf2_1": ("rf2", 1), "rf2_4": ("rf2", 4),
                              "distilled_1": ("distilled", 1)}.items():
        r = row(model, nfe)
        out[f"w2/{key}"] = r["w2"]
        if "fd" in r:
            out[f"fd/{key}"] = r["fd"]
    out["distilled_w2_over_rf1_euler100"] = summ.get("distilled_w2_over_rf1_euler100")
    if "fd/distilled_1" in out:
        out["distilled_fd_over_rf1_euler100"] = out["fd/distilled_1"] / out["fd/rf1_100"]
    out["straightness/rf2"] = summ.get("straightness/rf2")
    out["transport_cost/round-1"] = summ.get("transport_cost/round-1")
    out["stage_seconds"] = {s: json.loads((ws / "metrics" / f"{s}.json").read_text()).get("wall_seconds")
                            for s in STAGES if s in res["executed"]}
    out["reconstruction"] = ev.get("reconstruction", [])
    man = json.loads((ws / "data" / "couplings" / "round-1" / "manifest.json").read_text())
    out["pairs_from"] = man.get("pairs_from")
    return out


def run_one(cfg: InversionConfig, task: str, seed: int, tmp: Path) -> dict[str, Any]:
    from flows.pipeline import record_overrides

    ws = clone_worktree(tmp / f"{task}-seed{seed}")
    base = [*cfg.extra, f"seed={seed}", f"data.target={task}"]
    out: dict[str, Any] = {"task": task, "seed": seed}
    for mode in MODES:
        record_overrides(ws / "params.yaml", [*base, f"couple.source={mode}", "couple.inversion_fraction=0.5"])
        res, seconds = _run(ws)
        out[mode] = _figures(ws, res, seconds)
        f = out[mode]
        print(f"[inversion] {task} seed {seed} {mode}: {seconds:.0f} s, rf2 W2@1 {f['w2/rf2_1']:.4f}, distilled "
              f"W2 {f['w2/distilled_1']:.4f}" + (f", FD {f['fd/distilled_1']:.3f}" if "fd/distilled_1" in f else ""),
              flush=True)
    return out


def collect(ws: Path, earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a finished workspace as its mode's run, merged with an earlier run of the same
    task and seed (its other modes kept)."""
    import yaml

    p = yaml.safe_load((ws / "params.resolved.yaml").read_text())
    task, seed, mode = p["data"]["target"], p["seed"], p["couple"]["source"]
    out = next((dict(r) for r in earlier if (r["task"], r["seed"]) == (task, seed)), {"task": task, "seed": seed})
    out[mode] = _figures(ws, {"executed": list(STAGES)}, float("nan"))
    return out


def _recon(run: dict[str, Any], model: str, solver: str, steps: int | None) -> float | None:
    return next((r["mse"] for r in run["reconstruction"] if r["model"] == model and r["solver"] == solver
                 and r["steps"] == steps), None)


def _sci(xs: list[float]) -> str:
    """Mean ± std in 3 significant digits (errors span many decades)."""
    m, sd = common.mean_std(xs)
    return f"{m:.3g}" + (f" ± {sd:.2g}" if len(xs) > 1 else "")


def markdown(data: dict[str, Any]) -> str:
    runs = data["result"]["runs"]
    lines = ["## Running the flow backwards: reconstruction and inversion pairs", "",
             f"`{data['command']}`. " + common.env_lines(data["environment"]), "",
             "Reconstruction: evaluate inverts the held-out target rows (t: 1 → 0) and regenerates them with "
             "the same solver and steps; MSE per dimension, mean ± std over seeds, from the `noise` run "
             "(rf2 made from noise pairs, the default).", ""]
    for task in data["config"]["tasks"]:
        rs = [r for r in runs if r["task"] == task and "noise" in r]
        if not rs:
            continue
        table = []
        steps_list = sorted({r["steps"] for r in rs[0]["noise"]["reconstruction"] if r["steps"] is not None})
        for solver in ("euler", "heun", "midpoint", "rk45"):
            for steps in ([None] if solver == "rk45" else steps_list):
                cells = []
                for model in ("rf1", "rf2"):
                    vals = [v for r in rs if (v := _recon(r["noise"], model, solver, steps)) is not None]
                    nfe = [x["nfe"] for r in rs for x in r["noise"]["reconstruction"] if x["model"] == model
                           and x["solver"] == solver and x["steps"] == steps]
                    cells.append(f"{_sci(vals) if vals else '–'}"
                                 + (f" (NFE {round(sum(nfe) / len(nfe))})" if solver == "rk45" and nfe else ""))
                ratio = [b / a for r in rs if (a := _recon(r["noise"], "rf1", solver, steps)) and
                         (b := _recon(r["noise"], "rf2", solver, steps)) is not None]
                table.append([solver, "adaptive" if steps is None else steps, *cells, common.fmt_pm(ratio, 4)])
        equal = []  # the same NFE per direction: Euler at n steps against the 2-NFE steppers at n / 2
        for nfe in (2, 4, 8):
            if nfe in steps_list and nfe // 2 in steps_list:
                for model in ("rf1", "rf2"):
                    cells = [_sci([v for r in rs if (v := _recon(r["noise"], model, solver, k)) is not None])
                             for solver, k in (("euler", nfe), ("heun", nfe // 2), ("midpoint", nfe // 2))]
                    equal.append([nfe, model, *cells])
        lines += [f"**{task}**, seeds {', '.join(str(r['seed']) for r in rs)}:", "",
                  common.md_table(["solver", "steps (NFE: × 1 Euler, × 2 Heun, midpoint)", "rf1 MSE", "rf2 MSE",
                                   "rf2 / rf1"], table), "",
                  "At equal NFE per direction:", "",
                  common.md_table(["NFE", "flow", "Euler", "Heun", "midpoint (RF-Solver)"], equal), ""]
    lines += ["Inversion pairs (`couple.source`), same rf1; W2 (and FD) at 1 NFE, and the student against rf1 "
              "at 100 Euler steps:", ""]
    for task in data["config"]["tasks"]:
        rs = [r for r in runs if r["task"] == task]
        if not rs:
            continue
        images = any("fd/distilled_1" in r[m] for r in rs for m in MODES if m in r)
        table = []
        missing = [m for m in MODES if any(m not in r for r in rs)]
        for mode in (m for m in MODES if m not in missing):
            row = [mode, common.fmt_pm([r[mode]["w2/rf2_1"] for r in rs], 4),
                   common.fmt_pm([r[mode]["w2/distilled_1"] for r in rs], 4)]
            if images:
                row += [common.fmt_pm([r[mode]["fd/rf2_1"] for r in rs], 3),
                        common.fmt_pm([r[mode]["fd/distilled_1"] for r in rs], 3),
                        common.fmt_pm([r[mode]["distilled_fd_over_rf1_euler100"] for r in rs], 3)]
            else:
                row += [common.fmt_pm([r[mode]["distilled_w2_over_rf1_euler100"] for r in rs], 3)]
            pf = rs[0][mode].get("pairs_from") or {}
            row += [f"{pf['inverted_pairs']:,} of {pf['real_rows']:,} rows" if pf else "–"]
            row += [_sci([r[mode]["straightness/rf2"] for r in rs]),
                    common.fmt_pm([sum(v for k, v in r[mode]["stage_seconds"].items() if k in
                                       ("couple", "reflow", "distill")) for r in rs], 0)]
            table.append(row)
        head = ["couple.source", "rf2 W2 @1", "student W2 @1"]
        head += ["rf2 FD @1", "student FD @1", "student FD / rf1 FD @100"] if images else ["student W2 / rf1 @100"]
        lines += [f"**{task}**:", "", common.md_table([*head, "round-1 inverted pairs (of real training rows)",
                                                      "rf2 straightness", "couple+reflow+distill s"], table), "",
                  "(Stage seconds were taken with other jobs on the same cores: see each run's record.)", ""]
        if missing:
            lines += [f"({task}: {', '.join(missing)} not measured yet.)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.inversion", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", nargs="+", choices=("moons", "digits", "8gaussians", "checkerboard"))
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--keep", help="keep the workspaces in this folder")
    ap.add_argument("--collect", type=Path, metavar="WORKSPACE",
                    help="add the figures of a finished workspace (its couple.source's run of its task and seed) "
                         "to the results instead of running anything")
    args = ap.parse_args(argv)
    cfg = _quick() if args.quick else InversionConfig()
    from dataclasses import replace

    if args.tasks:
        cfg = replace(cfg, tasks=tuple(args.tasks))
    if args.seeds:
        cfg = replace(cfg, seeds={t: tuple(args.seeds) for t in cfg.tasks})
    env = common.environment()
    command = ("python -m benchmarks.inversion " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    # The runs of tasks not run now are kept from the last results (one task per invocation is fine).
    old = common.result_path(NAME, args.quick)
    kept = [] if not old.is_file() else [r for r in json.loads(old.read_text())["result"]["runs"]
                                         if args.collect or r["task"] not in cfg.tasks]
    runs: list[dict[str, Any]] = []

    def data() -> dict[str, Any]:
        tasks = list(dict.fromkeys([*(r["task"] for r in kept), *cfg.tasks]))
        return {"benchmark": NAME, "command": command, "config": asdict(cfg) | {"tasks": tasks}, "environment": env,
                "environment_after": {"loadavg": common.loadavg()}, "result": {"runs": kept + runs}}

    if args.collect:
        runs.append(collect(args.collect, kept))
        kept[:] = [r for r in kept if (r["task"], r["seed"]) != (runs[0]["task"], runs[0]["seed"])]
        cfg = replace(cfg, tasks=(runs[0]["task"],))
    else:
        with tempfile.TemporaryDirectory(prefix="rectflow-inversion-") as tmp:
            where = Path(args.keep) if args.keep else Path(tmp)
            for task in cfg.tasks:
                for seed in cfg.seeds.get(task, (0,)):
                    runs.append(run_one(cfg, task, seed, where))
                    common.write_result(NAME, data(), args.quick)  # what is done is kept if a later run fails
    common.publish(NAME, data(), markdown(data()), args.quick)
    return data()


if __name__ == "__main__":
    main()
