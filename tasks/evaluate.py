"""Stage 7, evaluate: every model × solver × NFE of ``evaluate.grid`` on the same noise.

Writes ``metrics/eval.json`` (``{"rows": [...]}``, one row per (model, solver, schedule, nfe);
docs/contract.md), ``metrics/evaluate.json`` (a flat summary for ``dvc metrics``), ``plots/nfe_w2.csv``
(W2 against Euler NFE per flow, a DVC plot) and ``plots/trajectories.png`` (1-RF vs the last flow:
paths in the plane for vectors, strips of images along t for images). A grid entry with ``schedule: bellman`` runs each flow on its saved BOSS grid for K = each
of its ``steps`` (``models/NAME.schedule.json``); its rows have ``schedule: bellman`` (others
``uniform``, or ``adaptive`` for RK45) and ``-bellman`` in summary keys, sample file names and
plot columns, so they never collide with the uniform rows of the same model, solver and NFE.
Every row uses the same Z0 (``evaluate.n_samples`` draws from π0 with a fixed seed) and the same
held-out target samples; NFE is what the solver measured, not what was requested.

``eval.json``'s ``reconstruction`` rows (``evaluate.reconstruction``): each flow inverts the held-out
target rows (t: 1 → 0) and regenerates them with the same solver and steps; MSE per dimension (PSNR
for images), in ``plots/reconstruction.csv`` and ``.png`` against NFE, and ``recon_*`` summary keys.
For images, its ``inpainting`` rows: the held-out images completed under three fixed masks by the
last flow and the one-step student (:func:`_inpainting`, ``plots/inpainting.png``).
"""

from __future__ import annotations

import csv
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from rectflow import metrics
from rectflow.config import GridEntry, Params
from rectflow.data import load_prepared
from rectflow.errors import RunFailedError
from rectflow.io import atomic_path, atomic_write_json
from rectflow.layout import Layout
from rectflow.nets import build_model, count_params
from rectflow.models import load_model
from rectflow.schedule import schedule_times
from rectflow.solvers import solve
from tasks._common import device
from rectflow.stages import flow_names, student_names, variant_names
from tasks.classes import EvalLabels, bind_eval_labels, class_grid, class_report, eval_labels, judge

GUIDANCE_STEPS = 100  # Euler steps of the guidance curve's teacher (rf1)


def guidance_of(p: Params, name: str, card: dict[str, Any] | None = None) -> float:
    """The guidance scale a conditional model is evaluated at: rf1 at ``couple.guidance`` (the
    teacher of the pairs, as the pairs saw it); the reflowed flows and the students at 1 (they
    learned the guided field from those pairs: InstaFlow's guidance-free student), except models
    that take w as an input (``distill.guidance_input``), also at ``couple.guidance``."""
    takes_w = bool(card and card["arch"].get("guidance_input"))
    return p.couple.guidance if name == "rf1" or takes_w else 1.0

EVAL_SEED_OFFSET = 10_007


def eval_noise(p: Params, layout: Layout, n: int, shape: tuple[int, ...],
               seed_offset: int = EVAL_SEED_OFFSET) -> torch.Tensor:
    """The evaluation Z0 ``(n, *shape)``, identical for every model: N(0, I) from the fixed seed
    ``p.seed + seed_offset`` (benchmarks pass their own offset for a draw of their own), or the
    source's test rows (cycled to ``n``) when the source is a data set."""
    src = load_prepared(layout.prepared, "source", "test")
    g = torch.Generator().manual_seed(p.seed + seed_offset)
    if src.is_gaussian:
        return torch.randn((n, *shape), generator=g)
    idx = torch.arange(n) % len(src.data)  # type: ignore[arg-type]
    return src.data[idx].reshape(n, *shape)  # type: ignore[index]


def model_groups(p: Params, layout: Layout) -> dict[str, list[str]]:
    flows = flow_names(p)
    variants = variant_names(p)
    students = []
    for name, _ in student_names(p.distill.k):  # each student, then its variants
        students += [name, *(v for v in variants if v.rpartition("-")[0] == name)]
    return {"flows": flows, "students": students, "all": flows + students}


def expand_grid(
    grid: list[GridEntry], groups: dict[str, list[str]], steps_of: dict[str, int],
) -> list[tuple[str, str, int | None, str]]:
    """(model, solver, steps, schedule) rows of the grid; steps None means adaptive (rk45), whose
    schedule is ``adaptive``; fixed-step rows have ``uniform`` or ``bellman``."""
    out: list[tuple[str, str, int | None, str]] = []
    for e in grid:
        names = groups[e.models] if isinstance(e.models, str) else e.models
        for m in names:
            if e.solver == "rk45":
                out.append((m, "rk45", None, "adaptive"))
            else:
                for s in e.steps or [steps_of.get(m, 1)]:
                    out.append((m, e.solver, s, e.schedule))
    return out


def row_tag(row: dict[str, Any]) -> str:
    """``-bellman`` for a row on a BOSS schedule, else empty: what keeps rows of the same model,
    solver and NFE apart in summary keys, file names and plot columns."""
    return "-bellman" if row.get("schedule") == "bellman" else ""


def run(p: Params, layout: Layout) -> dict:
    dev = device()
    e = p.evaluate
    target = load_prepared(layout.prepared, "target", "test")
    assert target.data is not None
    ref = target.data[: e.n_samples]
    shape = tuple(target.shape)
    z0 = eval_noise(p, layout, e.n_samples, shape).to(dev)
    images = len(shape) == 3
    firsts: dict[tuple[str, str, int], torch.Tensor] = {}
    groups = model_groups(p, layout)
    cache: dict[str, tuple[nn.Module, dict[str, Any]]] = {}

    def get(name: str) -> tuple[nn.Module, dict[str, Any]]:
        if name not in cache:  # a conditional model comes bound to the evaluation labels (tasks.classes)
            model, card = load_model(layout.model(name), dev)
            cache[name] = (bind_eval_labels(model, card, guidance_of(p, name, card)), card)
        return cache[name]

    steps_of = {m: get(m)[1]["meta"].get("steps", 1) for m in groups["students"]}
    classes = int(get(groups["flows"][0])[1]["arch"].get("classes", 0))
    judged: list[Any] = []

    def judge_() -> Any:  # the classifier of label accuracy, built once, only for a conditional run
        if not judged:
            judged.append(judge(layout, classes, dev))
        return judged[0]

    straight: dict[str, float] = {}
    rows = []
    fd_ctx = _fd_context(p, layout, dev) if len(shape) == 3 else None
    fid_ctx = None
    if images and e.inception:  # the user's own Inception-v3 file: FID against the training split
        from rectflow.fid import fid_scorer

        train = load_prepared(layout.prepared, "target", "train").data
        assert train is not None
        fid_ctx = fid_scorer(e.inception, train, dev)
    elif e.inception:
        print(f"[evaluate] evaluate.inception ignored: the target has shape {shape}, not (c, h, w) images",
              file=sys.stderr, flush=True)
    lat_noise = torch.randn((e.latency_batch, *shape), generator=torch.Generator().manual_seed(p.seed + 1)).to(dev)
    for name, solver, steps, schedule in expand_grid(e.grid, groups, steps_of):
        model, card = get(name)
        role = card["meta"].get("role", "flow")
        times = None
        if schedule == "bellman":  # the flow's own BOSS grid for K = steps (a ModelError naming the file)
            assert steps is not None
            times = schedule_times(layout.model(name), steps, card["meta"].get("sha256"))
        # A flow's uniform Euler row at evaluate.straightness_steps is the trajectory S(Z) is measured
        # on: its velocities are kept and the flow is not integrated a second time for it.
        shared = role == "flow" and solver == "euler" and steps == e.straightness_steps and schedule == "uniform"
        velocity = metrics.VelocityRecorder(model) if shared and name not in straight else model
        with torch.inference_mode():
            try:
                sol = solve(velocity, z0, solver, steps, times=times, rtol=e.rtol, atol=e.atol)
            except RunFailedError as err:
                raise RunFailedError(f"evaluate: {name} with {solver}: {err}") from None
            x = sol.x.float()
            bad = int((~torch.isfinite(x.reshape(len(x), -1)).all(1)).sum())
            if bad:  # never a NaN in metrics/eval.json: the row would be meaningless (and not JSON)
                raise RunFailedError(f"evaluate: {name} with {solver}{'' if steps is None else f', {steps} steps'} "
                                     f"made {bad} of {len(x)} samples NaN or infinite: models/{name} diverges "
                                     "(retrain it)")
            if isinstance(velocity, metrics.VelocityRecorder):
                straight[name] = metrics.straightness_of(z0, sol.x, velocity.vs)
                velocity.vs.clear()
            lat = metrics.latency_ms(
                lambda: solve(model, lat_noise, solver, steps, times=times, rtol=e.rtol, atol=e.atol), e.latency_batch
            )
            lat1 = None if role != "student" else metrics.latency_ms(  # deployment's other end: one sample
                lambda: solve(model, lat_noise[:1], solver, steps, times=times), 1, repeats=20, warmup=3)
        row = {
            "model": name, "solver": solver, "schedule": schedule, "nfe": int(sol.nfe),
            "w2": metrics.w2(x, ref), "mmd": metrics.mmd(x, ref, e.mmd_bandwidth),
            "straightness": None, "transport_cost": metrics.transport_cost(z0, x),  # (set below)
            "latency_ms": lat, "params": count_params(build_model(card["arch"])),
            "bytes": layout.model(name).with_suffix(".safetensors").stat().st_size,
        }
        if lat1 is not None:
            row["latency_b1_ms"] = lat1
        if isinstance(model, EvalLabels):  # a conditional run: its scale, label accuracy, per-class quality
            row |= {"guidance": model.w} | class_report(x, eval_labels(len(x), classes), classes, judge_())
        if fd_ctx is not None:
            row |= fd_ctx(x)
        if fid_ctx is not None:
            row |= fid_ctx(x)
        if images:
            from rectflow.imaging import save_grid_png

            if schedule != "bellman":
                firsts[(name, solver, row["nfe"])] = x[:64].cpu()
            png = layout.plots / "samples" / f"{name}-{solver}-nfe{row['nfe']}{row_tag(row)}.png"
            save_grid_png(x[:64].cpu().numpy(), png, scale=3)
        rows.append(row)
        print(f"[evaluate] {name:>16} {solver + row_tag(row):>16} nfe={row['nfe']:>4} w2={row['w2']:.4f}"
              + (f" acc={row['accuracy']:.3f}" if "accuracy" in row else ""), file=sys.stderr, flush=True)
    for row in rows:  # each flow's S(Z): from its grid row above, else from its own Euler run
        if get(row["model"])[1]["meta"].get("role", "flow") == "flow":
            if row["model"] not in straight:
                with torch.inference_mode():
                    straight[row["model"]] = metrics.straightness(get(row["model"])[0], z0, e.straightness_steps)
            row["straightness"] = straight[row["model"]]
    recon = _reconstruction(p, groups["flows"], get, target.data, images, target.labels)
    extra: dict[str, Any] = {"reconstruction": recon}
    if classes:
        extra["guidance"] = _guidance_curve(p, layout, groups, get, z0, ref, classes, judge_(), fd_ctx, images)
    if images:
        labels = None if target.labels is None else target.labels[: e.n_samples].to(dev)
        extra["inpainting"] = _inpainting(p, layout, groups["flows"][-1], get, ref.to(dev), fd_ctx, labels)
    atomic_write_json(layout.metrics / "eval.json", {"rows": rows, **extra})
    summary = _summary(p, layout, rows, z0, ref) | _recon_summary(recon, groups["flows"])
    for r in extra.get("inpainting", []):
        summary[f"inpaint_mse/{r['model']}/{r['mask']}"] = r["masked_mse"]
        if r.get("fd") is not None:
            summary[f"inpaint_fd/{r['model']}/{r['mask']}"] = r["fd"]
    _plots(p, layout, rows, groups, z0)
    _recon_plots(layout, recon)
    if images:
        _side_by_side(p, layout, groups, z0[:64], firsts, get)
    return summary


def _guidance_curve(p: Params, layout: Layout, groups: dict[str, list[str]], get, z0: torch.Tensor,  # type: ignore[no-untyped-def]
                    ref: torch.Tensor, classes: int, j: Any, fd_ctx, images: bool) -> list[dict[str, Any]]:
    """Rows (model, guidance, nfe, accuracy, w2 | fd, per_class) of rf1 at :data:`GUIDANCE_STEPS`
    Euler steps for every w of ``evaluate.guidance`` (and of students that take w as an input, at
    their own steps), on the evaluation noise and labels; ``plots/guidance.csv`` and ``.png``
    (accuracy and quality against w); for images, ``plots/classes/NAME-wW.png`` class grids."""
    y = eval_labels(len(z0), classes).to(z0.device)
    grid_n = classes * 8  # 8 samples of each class for the class grids
    out = []
    takers = [(m, get(m)[1]["meta"].get("steps", 1)) for m in groups["students"]
              if get(m)[1]["arch"].get("guidance_input")]
    for name, steps in [("rf1", GUIDANCE_STEPS), *takers]:
        model = get(name)[0]
        for w in p.evaluate.guidance:
            v = EvalLabels(model.inner, classes, w) if isinstance(model, EvalLabels) else model
            with torch.inference_mode():
                sol = solve(v, z0, "euler", steps)
            x = sol.x.float()
            if not bool(torch.isfinite(x).all()):
                raise RunFailedError(f"evaluate: {name} at guidance {w:g} made NaN or infinite samples")
            row = {"model": name, "guidance": float(w), "solver": "euler", "nfe": int(sol.nfe),
                   "w2": metrics.w2(x, ref)} | class_report(x, y, classes, j)
            if fd_ctx is not None:
                row |= fd_ctx(x)
            if images:
                class_grid(x[:grid_n], y[:grid_n], classes, layout.plots / "classes" / f"{name}-w{w:g}.png")
            out.append(row)
            print(f"[evaluate] {name:>16} {f'guidance w={w:g}':>16} nfe={row['nfe']:>4} acc={row['accuracy']:.3f} "
                  + (f"fd={row['fd']:.3f}" if "fd" in row else f"w2={row['w2']:.4f}"), file=sys.stderr, flush=True)
    if images:  # the last flow and every student at their own settings, one row per class
        last = groups["flows"][-1]
        for name, steps in [(last, 1), *[(m, get(m)[1]["meta"].get("steps", 1)) for m in groups["students"]]]:
            with torch.inference_mode():
                x = solve(get(name)[0], z0[:grid_n], "euler", steps).x.float()
            class_grid(x, y[:grid_n], classes, layout.plots / "classes" / f"{name}-nfe{steps}.png")
    _guidance_plots(layout, out, "fd" if fd_ctx is not None else "w2")
    return out


def _guidance_plots(layout: Layout, rows: list[dict[str, Any]], quality: str) -> None:
    """``plots/guidance.csv`` (model, w, nfe, accuracy, quality) and ``plots/guidance.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(layout.plots / "guidance.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "guidance", "nfe", "accuracy", quality])
            for r in rows:
                w.writerow([r["model"], r["guidance"], r["nfe"], r["accuracy"], r[quality]])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        axes[0].plot([r["guidance"] for r in mine], [r["accuracy"] for r in mine], "o-", label=name)
        axes[1].plot([r["guidance"] for r in mine], [r[quality] for r in mine], "o-", label=name)
    axes[0].set(xlabel="guidance scale w", ylabel="label accuracy")
    axes[1].set(xlabel="guidance scale w", ylabel=quality.upper())
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(layout.plots / "guidance.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _reconstruction(p: Params, flows: list[str], get, test: torch.Tensor, images: bool,  # type: ignore[no-untyped-def]
                    labels: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Rows (flow, solver, steps, nfe, mse[, psnr]) of ``evaluate.reconstruction``: the first ``n``
    held-out target rows inverted and regenerated by each flow with each solver at each step count
    (a conditional flow guided by the rows' own ``labels``)."""
    r = p.evaluate.reconstruction
    x1 = test[: r.n]
    out = []
    for name in flows:
        model, _ = get(name)
        x = x1.to(next(model.parameters()).device)
        if isinstance(model, EvalLabels) and labels is not None:
            model = model.guided(labels[: r.n].to(x.device))
        for solver in r.solvers:
            for steps in ([None] if solver == "rk45" else r.steps):
                with torch.inference_mode():
                    try:
                        m = metrics.reconstruction(model, x, solver, steps, rtol=p.evaluate.rtol, atol=p.evaluate.atol,
                                                   data_range=2.0 if images else None)
                    except RunFailedError as err:
                        raise RunFailedError(f"evaluate: reconstruction by {name} with {solver}: {err}") from None
                if not np.isfinite(m["mse"]):
                    raise RunFailedError(f"evaluate: {name} inverted with {solver}{'' if steps is None else f', {steps} steps'} "
                                         f"gives a NaN or infinite reconstruction: models/{name} diverges backwards")
                out.append({"model": name, "solver": solver, "steps": steps, "n": len(x1)} | m)
                print(f"[evaluate] {name:>16} {'reconstruct ' + solver:>22} nfe={m['nfe']:>4} mse={m['mse']:.3g}",
                      file=sys.stderr, flush=True)
    return out


def _inpainting(p: Params, layout: Layout, teacher: str, get, x: torch.Tensor, fd_ctx,  # type: ignore[no-untyped-def]
                labels: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Rows (model, mask, nfe, masked_mse, fd) of FlowChef inpainting (:mod:`rectflow.steer`) of the
    held-out images ``x`` under the fixed masks, by ``teacher`` at ``evaluate.inpaint_steps`` steered
    Euler steps and by the one-step student with one correction; ``plots/inpainting.png``: per mask,
    rows of truth, masked input, teacher's and student's completions. A conditional run completes
    each image under its own label (``labels``)."""
    from rectflow.imaging import save_grid_png
    from rectflow.steer import inpainting_report, standard_masks

    fd_fn = (lambda y: fd_ctx(y, se=False)["fd"]) if fd_ctx is not None else None
    def own(model):  # type: ignore[no-untyped-def]  # a conditional model completes each image under its own label
        return model.guided(labels) if isinstance(model, EvalLabels) and labels is not None else model

    rep = inpainting_report((teacher, own(get(teacher)[0])), ("distilled", own(get("distilled")[0])), x,
                            standard_masks(tuple(x.shape[1:]), seed=p.seed), steps=p.evaluate.inpaint_steps,
                            fd_fn=fd_fn, seed=p.seed + EVAL_SEED_OFFSET)
    save_grid_png(rep.grid, layout.plots / "inpainting.png", nrow=rep.nrow, scale=3)
    if fd_fn is not None:  # the floor: FD of the held-out images themselves at this sample size
        rep.rows.append({"model": "held-out", "mask": "none", "nfe": 0, "masked_mse": 0.0, "fd": fd_fn(x)})
    for r in rep.rows:
        print(f"[evaluate] {r['model']:>16} {'inpaint ' + r['mask']:>22} nfe={r['nfe']:>4} "
              f"mse={r['masked_mse']:.4f}" + (f" fd={r['fd']:.3f}" if r.get("fd") is not None else ""),
              file=sys.stderr, flush=True)
    return rep.rows


def _recon_summary(recon: list[dict[str, Any]], flows: list[str]) -> dict[str, float]:
    """``recon_mse/FLOW/SOLVER/NFE`` (NFE of one direction) and, for the last flow against rf1 at the
    same solver and steps, ``recon_ratio/SOLVER/NFE`` (rf1's NFE): what straightening buys backwards."""
    out: dict[str, float] = {f"recon_mse/{r['model']}/{r['solver']}/{r['nfe']}": r["mse"] for r in recon}
    first = {(r["solver"], r["steps"]): r for r in recon if r["model"] == flows[0]}
    for r in recon:
        base = first.get((r["solver"], r["steps"]))
        if r["model"] == flows[-1] != flows[0] and r["steps"] is not None and base and base["mse"] > 0:
            out[f"recon_ratio/{r['solver']}/{base['nfe']}"] = r["mse"] / base["mse"]
    return out


def _recon_plots(layout: Layout, recon: list[dict[str, Any]]) -> None:
    """``plots/reconstruction.csv`` (MSE against NFE of one direction, a column per flow and
    solver, a DVC plot) and ``plots/reconstruction.png`` (the same, log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, float]] = {}
    for r in recon:
        curves.setdefault(f"{r['model']}-{r['solver']}", {})[int(r["nfe"])] = r["mse"]
    nfes = sorted({n for c in curves.values() for n in c})
    with atomic_path(layout.plots / "reconstruction.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["nfe", *curves])
            for n in nfes:
                w.writerow([n, *[c.get(n, "") for c in curves.values()]])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, c in curves.items():
        xs = sorted(c)
        ax.plot(xs, [max(c[x], 1e-12) for x in xs], marker="o" if len(xs) > 1 else "*", ms=4, label=label)
    ax.set(xscale="log", yscale="log", xlabel="NFE per direction", ylabel="reconstruction MSE per dimension",
           title="invert held-out data, then regenerate")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(layout.plots / "reconstruction.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _side_by_side(p: Params, layout: Layout, groups: dict[str, list[str]], z0: torch.Tensor,
                  firsts: dict[tuple[str, str, int], torch.Tensor], get) -> None:  # type: ignore[no-untyped-def]
    """1-RF at 1 step | last flow at 1 step | distilled | 1-RF at 100 steps, from the same noise."""
    from rectflow.imaging import side_by_side_png

    last = groups["flows"][-1]
    panels = []
    for title, name, steps in (("1-RF, 1 step", "rf1", 1), (f"{len(groups['flows'])}-RF, 1 step", last, 1),
                               ("distilled, 1 step", "distilled", 1), ("1-RF, 100 steps", "rf1", 100)):
        x = firsts.get((name, "euler", steps))
        if x is None:
            with torch.inference_mode():
                x = solve(get(name)[0], z0, "euler", steps).x.float().cpu()
        panels.append((title, x.numpy()))
    side_by_side_png(panels, layout.plots / "side_by_side.png", scale=3)


def _fd_context(p: Params, layout: Layout, dev: torch.device):
    """Image data: a frozen feature net for Fréchet distance (see rectflow.fd); None if unavailable."""
    from tasks.features import fd_scorer

    return fd_scorer(p, layout, dev)


def _summary(p: Params, layout: Layout, rows: list[dict], z0: torch.Tensor, ref: torch.Tensor) -> dict:
    from rectflow.pairs import read_manifest

    def pick(model: str, solver: str, nfe: int | None = None) -> dict | None:
        """The first row of ``model`` with ``solver`` (at ``nfe``) on the uniform grid (or adaptive)."""
        return next((r for r in rows if r["model"] == model and r["solver"] == solver and not row_tag(r)
                     and (nfe is None or r["nfe"] == nfe)), None)

    out: dict[str, Any] = {}
    for r in rows:
        out[f"w2/{r['model']}/{r['solver']}{row_tag(r)}/{r['nfe']}"] = round(r["w2"], 5)
    last = f"rf{p.reflow.rounds + 1}"
    teacher, student = pick("rf1", "euler", 100), pick("distilled", "euler", 1)
    if teacher and student:
        out["distilled_w2_over_rf1_euler100"] = student["w2"] / teacher["w2"]
    s1, s2 = pick("rf1", "euler"), pick(last, "euler")
    if s1 and s2 and s1["straightness"]:
        out["straightness/rf1"] = s1["straightness"]
        out[f"straightness/{last}"] = s2["straightness"]
        out["straightness_ratio"] = s2["straightness"] / s1["straightness"]
    m = min(len(ref), len(z0))
    perm = torch.randperm(len(ref), generator=torch.Generator().manual_seed(0))[:m]
    out["transport_cost/independent"] = metrics.transport_cost(z0.cpu()[:m], ref[perm])

    for k in p.coupled_rounds():
        man = read_manifest(layout.round_dir(k))
        out[f"transport_cost/round-{k}"] = sum(s["cost_sum"] for s in man["shards"]) / man["n_pairs"]
    return out


def _plots(p: Params, layout: Layout, rows: list[dict], groups: dict[str, list[str]], z0: torch.Tensor) -> None:
    """``plots/nfe_w2.csv``: W2 against Euler NFE, one column per flow (uniform steps), then one per
    flow evaluated on its BOSS schedule (``rf1-bellman``, …; only when such rows exist)."""
    flows = groups["flows"]
    by = {(r["model"] + row_tag(r), r["nfe"]): r["w2"] for r in rows if r["solver"] == "euler" and r["model"] in flows}
    columns = flows + [f"{m}-bellman" for m in flows if any(c == f"{m}-bellman" for c, _ in by)]
    nfes = sorted({nfe for (_, nfe) in by})
    with atomic_path(layout.plots / "nfe_w2.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["nfe", *columns])
            for nfe in nfes:
                w.writerow([nfe, *[by.get((m, nfe), "") for m in columns]])
    _pareto_png(layout, rows, "fd" if z0.ndim == 4 else "w2")
    if z0.ndim == 4:
        _image_trajectory_png(layout, [flows[0], flows[-1]], z0[:8])
    else:
        _trajectory_png(p, layout, [flows[0], flows[-1]], z0[:300])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better on each)."""
    return [i for i, (a, b) in enumerate(points)
            if not any((c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i)]


def _pareto_png(layout: Layout, rows: list[dict], quality: str) -> None:
    """``plots/pareto.png``: quality (W2, or FD for images) of every evaluated row against its
    latency per sample (at ``evaluate.latency_batch``) and against its weights' bytes; each panel's
    Pareto front joined and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get(quality) is not None and r.get("schedule", "uniform") != "bellman"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (key, label) in zip(axes, (("latency_ms", "latency per sample (ms)"), ("bytes", "weights (bytes)"))):
        xy = [(float(r[key]), float(r[quality])) for r in pts]
        students = [r["model"].startswith("distilled") for r in pts]
        ax.scatter([x for (x, _), s in zip(xy, students) if not s], [y for (_, y), s in zip(xy, students) if not s],
                   s=14, c="tab:blue", label="flows (rf1, rf2, …) at every NFE run")
        ax.scatter([x for (x, _), s in zip(xy, students) if s], [y for (_, y), s in zip(xy, students) if s],
                   s=18, c="tab:red", label="students and their variants")
        front = sorted(pareto_front(xy), key=lambda i: xy[i][0])
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="0.3", lw=1, label="Pareto front")
        for i in front:
            ax.annotate(f"{pts[i]['model']} {pts[i]['solver']} {pts[i]['nfe']}", xy[i], fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(quality.upper())
        ax.legend(fontsize=7)
    fig.suptitle(f"{quality.upper()} against latency and size, every model")
    fig.tight_layout()
    with atomic_path(layout.plots / "pareto.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _image_trajectory_png(layout: Layout, names: list[str], z0: torch.Tensor, columns: int = 6) -> None:
    """``plots/trajectories.png`` for images: per flow, each row one sample's 100-step Euler path
    shown at ``columns`` evenly spaced times t = 0 … 1 (left to right), flows side by side."""
    from rectflow.imaging import side_by_side_png

    panels = []
    idx = torch.linspace(0, 100, columns).round().long()
    for name in names:
        model, _ = load_model(layout.model(name), z0.device)
        with torch.inference_mode():
            traj = solve(model, z0, "euler", 100, trajectory=True).trajectory  # (101, n, c, h, w)
        assert traj is not None
        strip = traj[idx].transpose(0, 1).reshape(-1, *z0.shape[1:])  # row i: sample i at each time
        panels.append((f"{name}: t = 0 -> 1, Euler 100", strip.float().cpu().numpy()))
    side_by_side_png(panels, layout.plots / "trajectories.png", nrow=columns, scale=3)


def _trajectory_png(p: Params, layout: Layout, names: list[str], z0: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 5), squeeze=False)
    z0 = z0.reshape(len(z0), -1)
    dim = z0.shape[1]
    for ax, name in zip(axes[0], names):
        model, _ = load_model(layout.model(name), z0.device)
        with torch.inference_mode():
            traj = solve(model, z0, "euler", 100, trajectory=True).trajectory.cpu().numpy()  # type: ignore[union-attr]
        if dim == 1:  # x against t
            xs, ys = np.broadcast_to(np.linspace(0, 1, len(traj))[:, None], traj[:, :, 0].shape), traj[:, :, 0]
        else:  # the first two coordinates (all of them for 2D data)
            xs, ys = traj[:, :, 0], traj[:, :, 1]
        ax.plot(xs, ys, color="0.6", lw=0.4, alpha=0.6)
        ax.scatter(xs[0], ys[0], s=3, c="tab:blue", label="Z0 (t = 0)")
        ax.scatter(xs[-1], ys[-1], s=3, c="tab:red", label="Z1 (t = 1)")
        what = "" if dim == 2 else (" (x against t)" if dim == 1 else f" (coordinates 0, 1 of {dim})")
        ax.set_title(f"{name}: 100-step Euler trajectories{what}")
        if dim == 2:
            ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(layout.plots / "trajectories.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def score_one_step(p: Params, layout: Layout, stem) -> float | None:  # type: ignore[no-untyped-def]
    """W2 of a student model (at its own step count) on this workspace's evaluation noise and data.

    Used to compare registry versions like for like; None if the model's data shape differs.
    """
    dev = device()
    target = load_prepared(layout.prepared, "target", "test")
    assert target.data is not None
    model, card = load_model(stem, dev)
    if tuple(card["arch"]["shape"]) != tuple(target.shape):
        return None
    model = bind_eval_labels(model, card, 1.0)  # a conditional student: on the evaluation labels
    z0 = eval_noise(p, layout, p.evaluate.n_samples, tuple(target.shape)).to(dev)
    with torch.inference_mode():
        x = solve(model, z0, "euler", int(card["meta"].get("steps", 1))).x.float()
    return metrics.w2(x, target.data[: p.evaluate.n_samples])
