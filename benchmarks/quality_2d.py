"""2D quality suite: W2 against NFE for rectflow's methods and its peers, several seeds.

(One script of ~580 lines on purpose: every method of the comparison, run by hand, side by side.)

Tasks: N→moons, N→8gaussians, N→checkerboard, N→scurve, 8gaussians→moons (N: standard Gaussian).
Per (task, seed), in a temporary workspace and through the pipeline's own stages
(:func:`tasks.runner.run_stage`: prepare, pretrain, couple, reflow, distill):

- ``1-RF``: ``rf1`` (independent pairs); ``1-RF + minibatch OT``: ``rf1`` of a second workspace with
  ``pretrain.coupling=minibatch_ot``; ``2-RF``: ``rf2`` (one reflow on ``couple``'s RK45 pairs);
  ``2-RF + distill``: the one-step student ``distilled``; ``2-RF + Bellman`` (and ``1-RF + Bellman``):
  the flow with its BOSS K-step schedule (:mod:`rectflow.schedule`, saved as
  ``models/NAME.schedule.json``) instead of K uniform Euler steps.
- Peers, trained with the same network (:class:`rectflow.nets.MLPVelocity`, same architecture and
  initial weights), batch, steps and optimizer (AdamW, warm-up, clipping, EMA: ``params.pretrain``)
  on the same prepared data, each with its own library's coupling and path: torchcfm's
  ``ConditionalFlowMatcher`` (I-CFM) and ``ExactOptimalTransportConditionalFlowMatcher`` (OT-CFM),
  Meta's flow_matching ``AffineProbPath(CondOTScheduler())`` (FM). Both libraries use rectflow's
  time convention (x_t = t·x1 + (1 − t)·x0 with x0 the source, target x1 − x0): checked in
  :func:`check_peer_conventions`.

Every model is evaluated on the same Z0 (the evaluate stage's noise) against the same held-out
target samples: exact W2 (:func:`rectflow.metrics.w2`) after Euler with NFE 1, 2, 4, 8, 100 and
adaptive RK45 (rtol = atol = 1e-5, measured NFE). ``floor`` is the W2 between two independent
samples of the data of the same size: no model can be expected to go below it.

Run: ``python -m benchmarks.quality_2d [--jobs N] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "quality_2d"
TASKS = ("gaussian:moons", "gaussian:8gaussians", "gaussian:checkerboard", "gaussian:scurve", "8gaussians:moons")
NFE_COLUMNS = ("1", "2", "4", "8", "100", "rk45")
METHODS = (
    "1-RF", "1-RF + minibatch OT", "2-RF", "2-RF + distill", "2-RF + Bellman", "1-RF + Bellman",
    "I-CFM (torchcfm)", "OT-CFM (torchcfm)", "FM (flow_matching)",
)
PEERS = {"icfm": "I-CFM (torchcfm)", "otcfm": "OT-CFM (torchcfm)", "fm": "FM (flow_matching)"}


def task_label(task: str) -> str:
    src, tgt = task.split(":")
    return f"{'N' if src == 'gaussian' else src}→{tgt}"


@dataclass
class QualityConfig:
    """One setting of the suite. ``steps`` is used for pretrain, reflow, distill and every peer."""

    tasks: tuple[str, ...] = TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 2000
    batch: int = 512
    hidden: int = 64
    depth: int = 3
    n_train: int = 50_000
    n_test: int = 5_000
    n_pairs: int = 20_000
    couple_solver: str = "rk45"
    couple_steps: int = 100
    n_eval: int = 2000
    nfes: tuple[int, ...] = (1, 2, 4, 8, 100)
    rk45: bool = True
    bellman_ks: tuple[int, ...] = (2, 4, 8)
    bellman_samples: int = 2000
    peers: tuple[str, ...] = ("icfm", "otcfm", "fm")
    cfm_sigma: float = 0.0
    rf1_ot: bool = True  # the "1-RF + minibatch OT" row (a second pretraining with exact OT per batch)
    # rectflow's own settings for the fine-tuning stages (pretrain and the peers keep params.pretrain's
    # lr 1e-3, the published 2D protocol): measured on N→scurve and N→8gaussians (BENCHMARKS.md, "2D
    # chain variants"), reflow and distill at params.yaml's lr 5e-4 / 2e-4 stop short in 2000 steps.
    reflow_lr: float = 2e-3
    distill_lr: float = 2e-3
    reflow_time_dist: str = "u_shaped"
    extra: tuple[str, ...] = field(default_factory=tuple)  # further --set overrides for every stage

    def overrides(self, task: str, seed: int, coupling: str = "independent") -> list[str]:
        src, tgt = task.split(":")
        shard = min(self.n_pairs, 10_000)
        ov = [
            f"seed={seed}", f"data.source={src}", f"data.target={tgt}",
            f"data.n_train={self.n_train}", f"data.n_test={self.n_test}",
            "model.kind=mlp", f"model.hidden={self.hidden}", f"model.depth={self.depth}",
            f"pretrain.steps={self.steps}", f"pretrain.batch_size={self.batch}", f"pretrain.coupling={coupling}",
            f"couple.n_pairs={self.n_pairs}", f"couple.shard_size={shard}", f"couple.batch_size={shard}",
            f"couple.solver={self.couple_solver}", f"couple.steps={self.couple_steps}",
            "reflow.rounds=1", f"reflow.steps={self.steps}", f"reflow.batch_size={self.batch}",
            f"reflow.lr={self.reflow_lr}", f"reflow.time_dist={self.reflow_time_dist}",
            "distill.k=1", f"distill.steps={self.steps}", f"distill.batch_size={self.batch}",
            f"distill.lr={self.distill_lr}",
        ]
        return ov + list(self.extra)


QUICK = QualityConfig(
    tasks=("gaussian:moons", "8gaussians:moons"), seeds=(0,), steps=300, batch=256, hidden=64, depth=3,
    n_train=5000, n_test=1000, n_pairs=2000, couple_solver="euler", couple_steps=50, n_eval=500,
    bellman_ks=(2, 4), bellman_samples=500,
)


# ---- peers ---------------------------------------------------------------------------------------


def check_peer_conventions() -> None:
    """torchcfm and flow_matching must put the source at t = 0 with target velocity x1 − x0."""
    import torch
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

    x0, x1 = torch.randn(5, 2), torch.randn(5, 2) + 3
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    want = t[:, None] * x1 + (1 - t[:, None]) * x0
    tt, xt, ut = ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow(x0, x1, t=t)
    assert torch.allclose(xt, want) and torch.allclose(ut, x1 - x0), "torchcfm's time convention differs"
    ps = AffineProbPath(scheduler=CondOTScheduler()).sample(x_0=x0, x_1=x1, t=t)
    assert torch.allclose(ps.x_t, want) and torch.allclose(ps.dx_t, x1 - x0), "flow_matching's convention differs"


def train_peer(kind: str, model, source, target, cfg, seed: int, sigma: float = 0.0) -> dict[str, Any]:
    """Train ``model`` in place with a peer library's coupling and path; same optimizer as rectflow.

    ``cfg`` is rectflow's ``params.pretrain`` (steps, batch, AdamW lr / weight decay, linear warm-up and lr schedule,
    gradient clipping, EMA of the weights with the same decay ramp as :func:`rectflow.train.train`).
    Returns the wall time and final loss. ``kind``: ``icfm`` | ``otcfm`` | ``fm``.
    """
    import numpy as np
    import torch
    from torch import nn

    from rectflow.train import learning_rate

    if kind in ("icfm", "otcfm"):
        from torchcfm.conditional_flow_matching import (
            ConditionalFlowMatcher,
            ExactOptimalTransportConditionalFlowMatcher,
        )

        fm = (ConditionalFlowMatcher if kind == "icfm" else ExactOptimalTransportConditionalFlowMatcher)(sigma=sigma)

        def pairs(x0, x1, gen):
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            return t, xt, ut
    elif kind == "fm":
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        path = AffineProbPath(scheduler=CondOTScheduler())

        def pairs(x0, x1, gen):
            t = torch.rand(x0.shape[0], generator=gen)
            ps = path.sample(x_0=x0, x_1=x1, t=t)
            return t, ps.x_t, ps.dx_t
    else:
        raise ValueError(f"peer: unknown {kind!r}")

    torch.manual_seed(seed)  # torchcfm draws t and ε from the global generators, its OT plan from numpy's
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed * 1000 + 5)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    ema = [p.detach().clone() for p in params] if cfg.ema > 0 else None
    loss_sum = torch.zeros(())
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        x0 = source.sample(cfg.batch_size, gen).reshape(cfg.batch_size, *target.shape)
        x1 = target.sample(cfg.batch_size, gen)
        lr = learning_rate(cfg, step)  # the same warm-up and schedule as rectflow's loop
        for g in opt.param_groups:
            g["lr"] = lr
        t, xt, ut = pairs(x0, x1, gen)
        loss = (model(xt, t) - ut).pow(2).flatten(1).mean(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        opt.step()
        if ema is not None:
            decay = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step >= cfg.steps - 50:
            loss_sum += loss.detach()
    seconds = time.perf_counter() - t0
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    model.eval()
    return {"seconds": seconds, "final_loss": float(loss_sum) / min(50, cfg.steps)}


# ---- one (task, seed) ----------------------------------------------------------------------------


def evaluate_model(model, z0, ref, nfes, rk45: bool, schedules: dict[int, Any] | None = None) -> list[dict[str, Any]]:
    """W2 of ``model``'s samples from ``z0`` against ``ref``: Euler at each NFE (or the given schedules), RK45."""
    import torch

    from rectflow.metrics import w2
    from rectflow.solvers import solve

    out = []
    with torch.inference_mode():
        if schedules is not None:
            runs = [(str(k), dict(solver="euler", times=t)) for k, t in sorted(schedules.items())]
        else:
            runs = [(str(k), dict(solver="euler", steps=k)) for k in nfes]
            if rk45:
                runs.append(("rk45", dict(solver="rk45", rtol=1e-5, atol=1e-5)))
        for label, kw in runs:
            sol = solve(model, z0, **kw)
            out.append({"nfe": label, "nfe_measured": int(sol.nfe), "w2": w2(sol.x.float(), ref)})
    return out


def run_task(task: str, seed: int, cfg: QualityConfig, workdir: Path) -> dict[str, Any]:
    """Everything for one (task, seed) in ``workdir``; returns W2 rows, the floor and wall times."""
    import torch

    from rectflow.params import load_params
    from rectflow.data import load_prepared
    from rectflow.layout import Layout
    from rectflow.metrics import w2
    from rectflow.nets import arch_from_params, build_model
    from rectflow.models import load_model
    from rectflow.schedule import bellman_schedules, load_schedule, save_schedule
    from tasks.evaluate import eval_noise

    t_task = time.perf_counter()
    main, ot_root = workdir / "main", workdir / "ot"
    ov = cfg.overrides(task, seed)
    seconds: dict[str, float] = {}
    for stage in ("prepare", "pretrain", "couple", "reflow", "distill"):
        rec = common.run_stage(stage, main, ov)
        seconds[stage] = float(rec["wall_seconds"])
    seconds["rectflow_chain"] = sum(seconds[s] for s in ("pretrain", "couple", "reflow", "distill"))
    if cfg.rf1_ot:
        ov_ot = cfg.overrides(task, seed, coupling="minibatch_ot")
        common.run_stage("prepare", ot_root, ov_ot)
        seconds["pretrain_minibatch_ot"] = float(common.run_stage("pretrain", ot_root, ov_ot)["wall_seconds"])

    p = load_params(common.PARAMS, ov)
    lay, lay_ot = Layout(main), Layout(ot_root)
    target_test = load_prepared(lay.prepared, "target", "test")
    n = min(cfg.n_eval, len(target_test.data))
    ref = target_test.data[:n]
    shape = tuple(target_test.shape)
    z0 = eval_noise(p, lay, n, shape)
    target_train = load_prepared(lay.prepared, "target", "train")
    floor = w2(target_train.data[:n], ref)

    rows: list[dict[str, Any]] = []

    def add(method: str, results: list[dict[str, Any]]) -> None:
        rows.extend({"method": method} | r for r in results)

    models = {name: load_model(lay.model(name), "cpu")[0] for name in ("rf1", "rf2", "distilled")}
    add("1-RF", evaluate_model(models["rf1"], z0, ref, cfg.nfes, cfg.rk45))
    if cfg.rf1_ot:
        add("1-RF + minibatch OT", evaluate_model(load_model(lay_ot.model("rf1"), "cpu")[0], z0, ref, cfg.nfes, cfg.rk45))
    add("2-RF", evaluate_model(models["rf2"], z0, ref, cfg.nfes, cfg.rk45))
    add("2-RF + distill", evaluate_model(models["distilled"], z0, ref, (1,), False))

    # BOSS schedules from a teacher trajectory on noise that is not the evaluation noise
    source = load_prepared(lay.prepared, "source", "train")
    zs = source.sample(cfg.bellman_samples, torch.Generator().manual_seed(seed + 4242)).reshape(-1, *shape)
    schedules: dict[str, dict[str, list[float]]] = {}
    for flow, method in (("rf2", "2-RF + Bellman"), ("rf1", "1-RF + Bellman")):
        t0 = time.perf_counter()
        sched = bellman_schedules(models[flow], zs, cfg.bellman_ks)
        seconds[f"bellman_{flow}"] = time.perf_counter() - t0
        save_schedule(lay.model(flow), sched, meta={"grid_points": 100, "samples": cfg.bellman_samples})
        sched = load_schedule(lay.model(flow))  # what `sample --schedule bellman` would read
        schedules[flow] = {str(k): [round(x, 4) for x in v.tolist()] for k, v in sched.items()}
        add(method, evaluate_model(models[flow], z0, ref, cfg.nfes, False, schedules=sched))

    if cfg.peers:
        check_peer_conventions()
        src_train = load_prepared(lay.prepared, "source", "train")
        arch = arch_from_params(p.model, shape)
        for kind in cfg.peers:
            torch.manual_seed(p.seed)  # the same initial weights as rf1 (tasks/pretrain.py)
            net = build_model(arch)
            info = train_peer(kind, net, src_train, target_train, p.pretrain, p.seed, cfg.cfm_sigma)
            seconds[f"peer_{kind}"] = info["seconds"]
            add(PEERS[kind], evaluate_model(net, z0, ref, cfg.nfes, cfg.rk45))
    return {
        "task": task, "seed": seed, "floor_w2": floor, "rows": rows, "seconds": seconds,
        "schedules": schedules, "task_seconds": time.perf_counter() - t_task,
    }


# ---- the suite -----------------------------------------------------------------------------------


def _job(task: str, seed: int, cfg_dict: dict[str, Any], base: str, threads: int, quiet: bool, keep: bool) -> dict[str, Any]:
    common.set_threads(threads)
    cfg = QualityConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    workdir = Path(tempfile.mkdtemp(prefix=f"q2d-{task.replace(':', '-')}-s{seed}-", dir=base))
    log = workdir / "log.txt"
    saved = None
    if quiet:  # stage progress lines of parallel jobs go to the job's log, not the terminal
        saved = os.dup(2)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        return run_task(task, seed, cfg, workdir)
    except Exception:
        tail = log.read_text()[-2000:] if log.is_file() else ""
        return {"task": task, "seed": seed, "error": traceback.format_exc() + "\n" + tail}
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def run_suite(cfg: QualityConfig, jobs: int = 1, keep: bool = False) -> dict[str, Any]:
    """Every (task, seed) of ``cfg``, ``jobs`` at a time in separate processes; returns the raw results."""
    jobs = max(1, jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    base = tempfile.mkdtemp(prefix="rectflow-quality-")
    work = [(task, seed) for task in cfg.tasks for seed in cfg.seeds]
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    cfg_dict = asdict(cfg)
    partial = common.RESULTS / f"{NAME}.partial.jsonl"
    partial.unlink(missing_ok=True)
    try:
        if jobs == 1:
            for task, seed in work:
                results.append(_job(task, seed, cfg_dict, base, threads, False, keep))
                _report(results[-1], len(results), len(work), t0)
        else:
            # Each job gets its share of the cores: torch's threads (set in the job) and the BLAS /
            # OpenMP pools of numpy and POT (inherited from the environment at start-up), or 15 jobs
            # on 16 cores run 15 × 16 BLAS threads (ot.dist, W2) and every figure is skewed.
            saved = {var: os.environ.get(var) for var in _THREAD_VARS}
            os.environ.update({var: str(threads) for var in _THREAD_VARS})
            try:
                ctx = mp.get_context("spawn")
                with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                    futs = [pool.submit(_job, task, seed, cfg_dict, base, threads, True, keep) for task, seed in work]
                    for f in as_completed(futs):
                        results.append(f.result())
                        _report(results[-1], len(results), len(work), t0)
            finally:
                for var, val in saved.items():
                    if val is None:
                        os.environ.pop(var, None)
                    else:
                        os.environ[var] = val
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    order = {w: i for i, w in enumerate(work)}
    results.sort(key=lambda r: order[(r["task"], r["seed"])])
    partial.unlink(missing_ok=True)
    return {"results": results, "wall_seconds": time.perf_counter() - t0, "jobs": jobs, "threads_per_job": threads}


def _report(r: dict[str, Any], done: int, total: int, t0: float) -> None:
    try:  # what is done so far, in case the run is cut short
        partial = common.RESULTS / f"{NAME}.partial.jsonl"
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "a") as f:
            f.write(json.dumps(common._json_safe(r)) + "\n")
    except OSError:
        pass
    what = "FAILED" if "error" in r else f"{r['task_seconds']:.0f} s"
    print(f"[quality_2d] {done}/{total} {task_label(r['task'])} seed {r['seed']}: {what} "
          f"({time.perf_counter() - t0:.0f} s elapsed)", file=sys.stderr, flush=True)
    if "error" in r:
        print(r["error"], file=sys.stderr, flush=True)


def aggregate(raw: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std over seeds of W2 per (task, method, NFE), the acceptance checks, the timings."""
    ok = [r for r in raw["results"] if "error" not in r]
    tasks = list(dict.fromkeys(r["task"] for r in raw["results"]))
    out: dict[str, Any] = {"tasks": {}}
    for task in tasks:
        rs = [r for r in ok if r["task"] == task]
        if not rs:
            continue
        w2s: dict[str, dict[str, list[float]]] = {}
        nfe_meas: dict[str, dict[str, list[int]]] = {}
        for r in rs:
            for row in r["rows"]:
                w2s.setdefault(row["method"], {}).setdefault(row["nfe"], []).append(row["w2"])
                nfe_meas.setdefault(row["method"], {}).setdefault(row["nfe"], []).append(row["nfe_measured"])
        secs: dict[str, list[float]] = {}
        for r in rs:
            for k, v in r["seconds"].items():
                secs.setdefault(k, []).append(v)

        def m(method: str, nfe: str) -> float:
            return common.mean_std(w2s.get(method, {}).get(nfe, []))[0]

        student, teacher, otcfm = m("2-RF + distill", "1"), m("1-RF", "100"), m("OT-CFM (torchcfm)", "1")
        chain, ot_train = common.mean_std(secs.get("rectflow_chain", []))[0], common.mean_std(secs.get("peer_otcfm", []))[0]
        out["tasks"][task] = {
            "seeds": [r["seed"] for r in rs],
            "floor_w2": [r["floor_w2"] for r in rs],
            "w2": w2s,
            "nfe_measured": nfe_meas,
            "seconds": secs,
            "acceptance": {
                "distilled_w2": student, "rf1_euler100_w2": teacher,
                "ratio": student / teacher if teacher else math.nan,
                "ratio_ok": bool(student <= 1.05 * teacher),
                "otcfm_nfe1_w2": otcfm, "below_otcfm": bool(student < otcfm) if not math.isnan(otcfm) else None,
                "chain_seconds": chain, "otcfm_train_seconds": ot_train,
                "chain_faster": bool(chain < ot_train) if not math.isnan(ot_train) else None,
            },
        }
    return out


def markdown(agg: dict[str, Any], cfg: QualityConfig, raw: dict[str, Any], env: dict[str, Any], command: str,
             notes: list[str] | None = None) -> str:
    lines = [
        "## 1. 2D quality suite",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Setting: MLP {cfg.depth}×{cfg.hidden} (rectflow.nets.MLPVelocity, time embedding 64) for every method; "
        f"batch {cfg.batch}; {cfg.steps} steps for pretrain, reflow, distill and each peer (AdamW and the "
        f"rest of `params.pretrain`: lr 1e-3, warm-up 200, clip 1, EMA 0.999), except rectflow's reflow "
        f"(lr {cfg.reflow_lr:g}, p(t) {cfg.reflow_time_dist}) and distill (lr {cfg.distill_lr:g}); "
        f"{cfg.n_train} training samples; "
        f"couple: {cfg.n_pairs} pairs by {cfg.couple_solver}"
        + (f" ({cfg.couple_steps} steps)" if cfg.couple_solver != "rk45" else " (rtol = atol = 1e-5)")
        + f"; seeds {list(cfg.seeds)}; W2 by exact OT between {cfg.n_eval} generated and {cfg.n_eval} held-out "
        f"samples, the same Z0 for every model. Peers: torchcfm 1.0.7 (σ = {cfg.cfm_sigma}), flow_matching "
        "1.0.10. Bellman: BOSS schedule from a 100-step teacher trajectory on "
        f"{cfg.bellman_samples} other source samples, K = {list(cfg.bellman_ks)} (K = 1 is plain Euler). "
        "Cells: W2, mean ± std over seeds; `rk45` also gives the mean measured NFE. `floor`: W2 between "
        "two independent data samples of the same size.",
        "",
        common.env_lines(env) + f" {raw['jobs']} job(s) in parallel, {raw['threads_per_job']} thread(s) each; "
        f"whole suite {raw['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    for task, a in agg["tasks"].items():
        lines += [f"### {task_label(task)} (floor {common.fmt_pm(a['floor_w2'])})", ""]
        rows = []
        for method in METHODS:
            if method not in a["w2"]:
                continue
            cells = []
            for col in NFE_COLUMNS:
                vals = a["w2"][method].get(col)
                if not vals:
                    cells.append("")
                    continue
                cell = common.fmt_pm(vals)
                if col == "rk45":
                    cell += f" ({common.mean_std(a['nfe_measured'][method][col])[0]:.0f})"
                cells.append(cell)
            rows.append([method, *cells])
        lines += [common.md_table(["method", *(f"NFE {c}" if c != "rk45" else "rk45 (NFE)" for c in NFE_COLUMNS)], rows), ""]
    lines += ["### Acceptance", ""]
    acc_rows = []
    for task, a in agg["tasks"].items():
        c = a["acceptance"]
        acc_rows.append([
            task_label(task), f"{c['distilled_w2']:.3f}", f"{c['rf1_euler100_w2']:.3f}",
            f"{c['ratio']:.3f} {'✓' if c['ratio_ok'] else '✗'}",
            f"{c['otcfm_nfe1_w2']:.3f} {'✓' if c['below_otcfm'] else '✗'}" if c["below_otcfm"] is not None else "–",
            f"{c['chain_seconds']:.1f}", f"{c['otcfm_train_seconds']:.1f} {'✓' if c['chain_faster'] else '✗'}"
            if c["chain_faster"] is not None else "–",
        ])
    lines += [common.md_table(
        ["task", "2-RF + distill W2 (NFE 1)", "1-RF W2 (NFE 100)", "ratio (≤ 1.05)", "OT-CFM W2 (NFE 1)",
         "rectflow chain s", "OT-CFM training s"], acc_rows), ""]
    lines += [
        "Ratio: mean over seeds of the student's W2 / mean of the teacher's. Chain: pretrain + couple + "
        "reflow (with its second couple) + distill, each stage's `wall_seconds`; OT-CFM: its training loop, "
        "same batch, same process. Times were taken with the jobs running side by side.",
    ]
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    failed = [r for r in raw["results"] if "error" in r]
    if failed:
        lines += ["", f"**{len(failed)} job(s) failed**: " + ", ".join(f"{task_label(r['task'])}/{r['seed']}" for r in failed)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality_2d", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-sized run (2 tasks, 1 seed, 300 steps)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="(task, seed) jobs in parallel")
    ap.add_argument("--tasks", nargs="+", default=None, help=f"subset of {' '.join(TASKS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--n-pairs", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=None)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-ot", action="store_true", help="skip the '1-RF + minibatch OT' pretraining")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra KEY=VALUE for every stage")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspaces")
    ap.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                    help="no run: rebuild the report (results JSON, BENCHMARKS.md) from a saved quality_2d.json")
    args = ap.parse_args(argv)
    if args.report_only:
        return report_from(args.report_only, quick=args.quick)
    cfg = QUICK if args.quick else QualityConfig()
    changes: dict[str, Any] = {}
    for key in ("steps", "batch", "hidden", "depth", "n_pairs", "n_eval"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.tasks:
        bad = [t for t in args.tasks if t not in TASKS and ":" not in t]
        if bad:
            ap.error(f"--tasks: unknown {bad}; expected SOURCE:TARGET such as {TASKS[0]}")
        changes["tasks"] = tuple(args.tasks)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.no_peers:
        changes["peers"] = ()
    if args.no_ot:
        changes["rf1_ot"] = False
    if args.extra:
        changes["extra"] = tuple(args.extra)
    cfg = replace(cfg, **changes)
    common.set_threads()
    env = common.environment()
    raw = run_suite(cfg, jobs=args.jobs, keep=args.keep)
    agg = aggregate(raw)
    command = "python -m benchmarks.quality_2d " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(agg, cfg, raw, env, command.strip())
    data = {"benchmark": NAME, "command": command.strip(), "config": asdict(cfg), "environment": env,
            "environment_after": {"loadavg": common.loadavg()}, "summary": agg, "raw": raw}
    path = common.write_result(NAME, data, quick=args.quick)
    if not args.quick:
        common.write_section(NAME, md)
    print(md)
    print(f"\nresults: {path}", file=sys.stderr)
    return data


def report_from(path: Path, quick: bool = False) -> dict[str, Any]:
    """Re-render a saved run (e.g. one made on another machine): same JSON, fresh summary and section."""
    data = json.loads(Path(path).read_text())
    # runs saved before these keys existed trained reflow and distill with params.yaml's values
    data["config"] = {"reflow_lr": 5e-4, "distill_lr": 2e-4, "reflow_time_dist": "uniform"} | data["config"]
    cfg = QualityConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()})
    data["summary"] = aggregate(data["raw"])
    md = markdown(data["summary"], cfg, data["raw"], data["environment"], data["command"], data.get("notes"))
    common.publish(NAME, data, md, quick)
    return data


if __name__ == "__main__":
    main()
